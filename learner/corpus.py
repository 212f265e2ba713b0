"""The pre-training examples: task pools drawn from the log's (group, product, prompt) cells.

Examples come from the log's (group, product, prompt) cells. *Click*: every
cell is one example whose target is its class-balanced click share
``w·clicks / (w·clicks + non-clicks)``, drawn in proportion to its balanced
weight ``w·clicks + non-clicks`` (``w`` = non-clicks / clicks over the log),
which is the impression-level log-loss with balanced classes. *Generate*: a
cell is drawn with weight ``impressions × lift^sharpness`` where ``lift`` is
the cell's smoothed CTR over its group's CTR, so the model learns to write
what the group clicked. The smoothing shrinks a cell's CTR towards what the
group's per-attribute lifts predict for that creative (a cell holds a few
clicks; an attribute of a group thousands), with ``PRIOR_CLICKS`` pseudo-clicks. Group prefixes are read at several points of the log
(``feature_snapshots``) so that the model does not depend on exact numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from infra.settings import PretrainSettings
from learner.data import Cell, TrafficLog
from features.group import GroupFeatures, creative_attributes, read_group_features
from learner.model.inputs import (
    INSTRUCTIONS,
    NO,
    TASKS,
    YES,
    group_description,
    product_description,
    task_segments,
)

PRIOR_CLICKS = 10.0
"""Pseudo-clicks of the shrinkage of a cell's CTR towards its group's CTR (generation weights)."""


@dataclass
class _Pool:
    """Items of one task and their sampling weights."""

    items: list[tuple[Any, ...]]
    weights: np.ndarray

    def draw(self, rng: np.random.Generator, k: int) -> list[tuple[Any, ...]]:
        index = rng.choice(len(self.items), size=k, p=self.weights)
        return [self.items[i] for i in index]


@dataclass
class PretrainData:
    """Everything pre-training samples from: feature snapshots, products, and per-task pools."""

    snapshots: list[dict[str, GroupFeatures]]
    snapshot_weights: np.ndarray
    traffic: TrafficLog
    pools: dict[str, _Pool]

    @property
    def features(self) -> dict[str, GroupFeatures]:
        """Group features over the whole log (what the model is conditioned on after training)."""
        return self.snapshots[-1]


def split_holdout(traffic: TrafficLog, fraction: float) -> tuple[TrafficLog, TrafficLog]:
    """Split by time: the last ``fraction`` of the records (by timestamp) is held out."""
    records = sorted(traffic.records, key=lambda r: r.ts)
    cut = len(records) - int(round(fraction * len(records)))
    return traffic.subset(records[:cut]), traffic.subset(records[cut:])


def feature_snapshots(traffic: TrafficLog, count: int) -> list[dict[str, GroupFeatures]]:
    """Group features read on the first 1/count, 2/count, … of the log (the last one is the whole log)."""
    records = sorted(traffic.records, key=lambda r: r.ts)
    snapshots = []
    for k in range(1, count + 1):
        part = records[: max(1, round(len(records) * k / count))]
        snapshots.append(read_group_features(traffic.subset(part)))
    return snapshots


def prepare_data(traffic: TrafficLog, settings: PretrainSettings) -> PretrainData:
    """Feature snapshots and the example pools of the four tasks."""
    snapshots = feature_snapshots(traffic, settings.feature_snapshots)
    if len(snapshots) == 1:
        snapshot_weights = np.ones(1)
    else:  # the whole-log features weigh 40 %, the earlier snapshots share the rest
        snapshot_weights = np.full(len(snapshots), 0.6 / (len(snapshots) - 1))
        snapshot_weights[-1] = 0.4
    full = snapshots[-1]
    cells = traffic.cells()
    pools: dict[str, _Pool] = {}
    groups = sorted(full)
    if groups:
        pools["group"] = _Pool([(g,) for g in groups], np.full(len(groups), 1.0 / len(groups)))
    products = sorted(p for p in traffic.products)
    if products:
        pools["product"] = _Pool([(p,) for p in products], np.full(len(products), 1.0 / len(products)))
    click_items, click_weights = _click_items(cells, full, settings.click_prior_clicks)
    if click_items:
        pools["click"] = _Pool(click_items, click_weights)
    generate_items, generate_weights = _generate_items(cells, full, settings.generate_sharpness)
    if generate_items:
        pools["generate"] = _Pool(generate_items, generate_weights)
    return PretrainData(snapshots, snapshot_weights, traffic, pools)


def _click_items(
    cells: dict[tuple[str, str, str], Cell], features: dict[str, GroupFeatures], prior_clicks: float
) -> tuple[list[tuple[Any, ...]], np.ndarray]:
    clicks = sum(c.clicks for c in cells.values())
    shown = sum(c.impressions for c in cells.values())
    if clicks == 0 or clicks == shown:
        return [], np.zeros(0)
    balance = (shown - clicks) / clicks
    items, weights = [], []
    for (group, product, prompt), cell in cells.items():
        observed = float(cell.clicks)
        if prior_clicks > 0 and group in features and features[group].ctr > 0:
            g = features[group]
            prior = g.ctr * attribute_lift(g, prompt)
            rate = (cell.clicks + prior_clicks * prior / g.ctr) / (cell.impressions + prior_clicks / g.ctr)
            observed = rate * cell.impressions
        positive = balance * observed
        negative = cell.impressions - observed
        items.append((group, product, prompt, positive / (positive + negative)))
        weights.append(positive + negative)
    w = np.array(weights, dtype=np.float64)
    return items, w / w.sum()


def _generate_items(
    cells: dict[tuple[str, str, str], Cell], features: dict[str, GroupFeatures], sharpness: float
) -> tuple[list[tuple[Any, ...]], np.ndarray]:
    items, log_weights = [], []
    for (group, product, prompt), cell in cells.items():
        group_ctr = features[group].ctr if group in features else 0.0
        if group_ctr <= 0:
            continue
        prior_lift = attribute_lift(features[group], prompt)
        smoothed = (cell.clicks + PRIOR_CLICKS * prior_lift) / (cell.impressions + PRIOR_CLICKS / group_ctr)
        items.append((group, product, prompt))
        log_weights.append(math.log(cell.impressions) + sharpness * math.log(smoothed / group_ctr))
    if not items:
        return [], np.zeros(0)
    w = np.exp(np.array(log_weights) - max(log_weights))
    return items, w / w.sum()


def attribute_lift(features: GroupFeatures, prompt: str) -> float:
    """The group's expected CTR lift for a creative from its per-attribute lifts (product, clipped to [1/4, 4])."""
    log_lift = sum(math.log(features.lifts.get(token, 1.0)) for token in creative_attributes(prompt))
    return math.exp(min(math.log(4.0), max(-math.log(4.0), log_lift)))


def pretraining_corpus(traffic: TrafficLog, snapshots: list[dict[str, GroupFeatures]]) -> list[str]:
    """Texts the tokenizer is trained on: group prefixes and descriptions, product texts, logged prompts."""
    texts: list[str] = []
    for snapshot in snapshots:
        for features in snapshot.values():
            texts += [features.to_text(), group_description(features)]
    for product in traffic.products.values():
        texts += ["".join(task_segments("generate", group="", product=product)), product_description(product)]
    prompts = sorted({r.prompt for r in traffic.records if r.prompt is not None})
    texts += prompts[:5000]
    if traffic.products and snapshots[-1] and prompts:
        product = next(iter(traffic.products.values()))
        for features in snapshots[-1].values():
            for prompt in prompts[:200]:
                texts.append("".join(task_segments("click", group=features, product=product, creative=prompt)))
    texts += [INSTRUCTIONS[task] for task in TASKS]
    texts += [YES, NO] * 20
    return texts


