"""Pre-training the G-MLLM on logged traffic with the paper's four tasks.

=============  ==============================================  ===============================================
task           input                                           target
=============  ==============================================  ===============================================
``group``      group prefix                                    the group's preferences in words
``click``      group prefix, product image + text, a creative  ``yes`` / ``no`` (soft: the cell's click share)
``product``    product image                                   colour, category, title and price
``generate``   group prefix, product image + text              a logged creative prompt, drawn by its lift
=============  ==============================================  ===============================================

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
Every step trains one task, drawn from the mixture; the loss of each task is
logged and plotted.
"""

from __future__ import annotations

import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.settings import LearnerSettings, PretrainSettings
from learner.data import Cell, TrafficLog
from learner.group_features import GroupFeatures, creative_attributes, read_group_features
from learner.model.gmllm import GMLLM
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


@dataclass
class PretrainResult:
    """What a pre-training run did: steps, time, peak memory and the loss history per task."""

    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    examples_seen: dict[str, int] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        """Optimizer steps per second of training."""
        return self.steps / self.seconds if self.seconds else 0.0

    def final_losses(self) -> dict[str, float]:
        """Last logged loss of each task."""
        last: dict[str, float] = {}
        for row in self.history:
            last.update({task: loss for task, loss in row["loss"].items()})
        return last

    def first_losses(self) -> dict[str, float]:
        """First logged loss of each task."""
        first: dict[str, float] = {}
        for row in self.history:
            for task, loss in row["loss"].items():
                first.setdefault(task, loss)
        return first


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


class Pretrainer:
    """Trains a :class:`GMLLM` on :class:`PretrainData` with the task mixture of :class:`PretrainSettings`."""

    def __init__(self, gmllm: GMLLM, data: PretrainData, settings: PretrainSettings) -> None:
        self.gmllm = gmllm
        self.data = data
        self.settings = settings
        mixture = {t: w for t, w in settings.tasks.items() if w > 0 and t in data.pools}
        if not mixture:
            raise ValueError("no task has both a positive weight and examples in the log")
        self.tasks = sorted(mixture)
        total = sum(mixture.values())
        self.task_p = np.array([mixture[t] / total for t in self.tasks])
        self.rng = np.random.default_rng(settings.seed)

    def batch(self, task: str) -> dict[str, Any]:
        """One training batch of ``task``: padded ids, targets and pixel values."""
        data, gm = self.data, self.gmllm
        items = data.pools[task].draw(self.rng, self.settings.batch_size)
        prompts, completions, targets, products = [], [], [], []
        for item in items:
            snapshot = data.snapshots[self.rng.choice(len(data.snapshots), p=data.snapshot_weights)]
            if task == "group":
                features = snapshot[item[0]]
                prompts.append(gm.encode(task_segments("group", group=features)))
                completions.append(gm.encode_completion(group_description(features)))
            elif task == "product":
                product = data.traffic.products[item[0]]
                prompts.append(gm.encode(task_segments("product", product=product)))
                completions.append(gm.encode_completion(product_description(product)))
                products.append(product)
            elif task == "click":
                group, product_id, prompt, target = item
                product = data.traffic.products[product_id]
                prompts.append(gm.encode(task_segments("click", group=snapshot[group], product=product, creative=prompt)))
                targets.append(target)
                products.append(product)
            else:
                group, product_id, prompt = item
                product = data.traffic.products[product_id]
                prompts.append(gm.encode(task_segments("generate", group=snapshot[group], product=product)))
                completions.append(gm.encode_completion(prompt))
                products.append(product)
        pixels = torch.stack([gm.pixel_values(p) for p in products]) if products else None
        return {"prompts": prompts, "completions": completions, "targets": targets, "pixels": pixels}

    def loss(self, task: str, batch: dict[str, Any]) -> torch.Tensor:
        """Loss of one batch: soft yes/no cross-entropy for ``click``, completion-token cross-entropy otherwise."""
        gm = self.gmllm
        if task == "click":
            logits = gm.answer_logits(batch["prompts"], batch["pixels"])
            logp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(batch["targets"], dtype=torch.float32)
            return -(target * logp[:, gm.yes_id] + (1 - target) * logp[:, gm.no_id]).mean()
        sequences = [p + c for p, c in zip(batch["prompts"], batch["completions"])]
        input_ids, attention = gm.pad(sequences)
        labels = torch.full_like(input_ids, -100)
        for row, (p, c) in enumerate(zip(batch["prompts"], batch["completions"])):
            labels[row, len(p) : len(p) + len(c)] = torch.tensor(c)
        out = gm.model(input_ids=input_ids, attention_mask=attention, pixel_values=batch["pixels"], use_cache=False)
        logits = out.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )

    def train(self, on_step: Callable[[int, str, float], None] | None = None) -> PretrainResult:
        """Run ``settings.steps`` optimizer steps; ``on_step(step, task, loss)`` after each."""
        settings, model = self.settings, self.gmllm.model
        torch.manual_seed(settings.seed)
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings.warmup_steps, settings.steps))
        window: dict[str, list[float]] = defaultdict(list)
        result = PretrainResult(steps=settings.steps, seconds=0.0)
        seen: dict[str, int] = defaultdict(int)
        start = time.perf_counter()
        for step in range(1, settings.steps + 1):
            task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.task_p))]
            loss = self.loss(task, self.batch(task))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            window[task].append(value)
            seen[task] += settings.batch_size
            if on_step is not None:
                on_step(step, task, value)
            if step % settings.log_every == 0 or step == settings.steps:
                result.history.append(
                    {"step": step, "lr": schedule.get_last_lr()[0],
                     "loss": {t: float(np.mean(v)) for t, v in sorted(window.items())}}
                )
                window.clear()
        model.eval()
        result.seconds = time.perf_counter() - start
        result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        result.examples_seen = dict(seen)
        return result


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(
    traffic: TrafficLog,
    settings: LearnerSettings,
    on_step: Callable[[int, str, float], None] | None = None,
) -> tuple[GMLLM, PretrainData, PretrainResult]:
    """Build the G-MLLM (tokenizer trained on this log's texts) and pre-train it on ``traffic``."""
    with torch_threads(settings.threads):
        data = prepare_data(traffic, settings.pretrain)
        corpus = pretraining_corpus(traffic, data.snapshots)
        gmllm = GMLLM.build(settings.model, corpus=corpus, seed=settings.pretrain.seed)
        result = Pretrainer(gmllm, data, settings.pretrain).train(on_step)
    return gmllm, data, result


def plot_losses(result: PretrainResult, path: str | Path, title: str = "G-MLLM pre-training") -> Path:
    """Loss per task against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    tasks = sorted({t for row in result.history for t in row["loss"]})
    for task in tasks:
        points = [(row["step"], row["loss"][task]) for row in result.history if task in row["loss"]]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=task)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (mean over the logging window)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target)
    plt.close(figure)
    return target


def write_run(
    directory: str | Path,
    gmllm: GMLLM,
    result: PretrainResult,
    summary: dict[str, Any],
) -> dict[str, Path]:
    """Save a pre-training run: the model artifact, the loss history (JSON), the loss plot (PNG), a summary."""
    import json

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = gmllm.save(root / "model", extra={"pretrain": {**summary, "final_losses": result.final_losses()}})
    history = root / "history.json"
    history.write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
    plot = plot_losses(result, root / "loss.png")
    summary_file = root / "summary.json"
    summary_file.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return {"model": model_dir, "history": history, "plot": plot, "summary": summary_file}
