"""Preference pairs as a TRL DPO dataset for the G-MLLM, and pairs mined from a logged traffic log.

A row holds what TRL's ``DPOTrainer`` reads for a vision model — ``prompt``
(the generation input of :func:`learner.model.inputs.generation_input`, with
its ``<image>`` placeholder), ``images`` (the product image), ``chosen`` and
``rejected`` (the winner's and loser's canonical prompt, EOS appended: TRL does
not add it for a processor) — plus ``group_id``, which
:class:`learner.dpo.trainer.GroupDPOTrainer` balances on.

In one-size-fits-all mode every pair gets the same neutral prefix
(:func:`one_size_prefix`, the category only), so the model cannot tell
groups apart: the baseline Group-DPO must beat.

>>> from infra.contracts.messages import PreferencePair
>>> from learner.data import ProductRecord
>>> pair = PreferencePair(pair_id="x", ts=0, group_id="mugs/g0", category="mugs", product_id="p1",
...     winner_creative_id="w", loser_creative_id="l", winner_prompt="A", loser_prompt="B",
...     winner_impressions=100, winner_clicks=9, loser_impressions=100, loser_clicks=1,
...     winner_ctr=0.09, loser_ctr=0.01, prob_winner_better=0.99, evidence_level=0)
>>> rows = preference_rows([pair], {"mugs/g0": "group mugs/g0"}, {"p1": ProductRecord("p1", "mugs", "Mug")}, "<eos>")
>>> rows["prompt"][0].splitlines()[0], rows["chosen"][0], rows["group_id"][0]
('group mugs/g0', 'A<eos>', 'mugs/g0')
>>> preference_rows([pair], {}, {"p1": ProductRecord("p1", "mugs", "Mug")}, "<eos>", one_size=True)["prompt"][0].splitlines()[0]
'group mugs/all | one size for all of mugs'
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from features.group import GroupFeatures, read_group_features
from infra.contracts.messages import PreferencePair
from learner.data import ProductRecord, TrafficLog
from learner.model.inputs import generation_input
from streams.ctr import CreativeStats
from streams.pairs import PairMiner, PairMinerConfig


def one_size_prefix(category: str) -> str:
    """The group prefix of one-size-fits-all training and serving: the category, no group."""
    return f"group {category}/all | one size for all of {category}"


def category_features(traffic: TrafficLog) -> dict[str, GroupFeatures]:
    """Features of each whole category (``<category>/all``), computed like a group's: the fair one-size prefix."""
    records = [replace(r, group_id=f"{r.category}/all") for r in traffic.records]
    return read_group_features(TrafficLog(traffic.products, traffic.users, records, dict(traffic.meta)))


@dataclass(frozen=True)
class SkippedPairs:
    """Pairs left out of a dataset, by reason (unknown group features or product)."""

    unknown_group: int = 0
    unknown_product: int = 0

    @property
    def total(self) -> int:
        """All pairs left out."""
        return self.unknown_group + self.unknown_product


def usable_pairs(
    pairs: Sequence[PreferencePair],
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    one_size: bool = False,
) -> tuple[list[PreferencePair], SkippedPairs]:
    """The pairs whose product (and, unless ``one_size``, group features) are known; counts of the rest."""
    kept: list[PreferencePair] = []
    no_group = no_product = 0
    for pair in pairs:
        if pair.product_id not in products:
            no_product += 1
        elif not one_size and pair.group_id not in features:
            no_group += 1
        else:
            kept.append(pair)
    return kept, SkippedPairs(no_group, no_product)


def pair_prompt(
    pair: PreferencePair,
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    one_size: bool = False,
) -> str:
    """The DPO prompt of ``pair``: group prefix (or the one-size prefix), image placeholder, product text."""
    return generation_input(pair_group(pair, features, one_size), products[pair.product_id])


def pair_group(
    pair: PreferencePair, features: Mapping[str, GroupFeatures | str], one_size: bool = False
) -> GroupFeatures | str:
    """What the model is conditioned on for ``pair``: its group's features, or the one-size prefix."""
    return one_size_prefix(pair.category) if one_size else features[pair.group_id]


def preference_rows(
    pairs: Sequence[PreferencePair],
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    eos_token: str,
    one_size: bool = False,
) -> dict[str, list[Any]]:
    """Columns ``prompt, images, chosen, rejected, group_id`` of the pairs (unknown ones must be filtered first)."""
    rows: dict[str, list[Any]] = {"prompt": [], "images": [], "chosen": [], "rejected": [], "group_id": []}
    for pair in pairs:
        rows["prompt"].append(pair_prompt(pair, features, products, one_size))
        rows["images"].append([products[pair.product_id].rgb_image()])
        rows["chosen"].append(pair.winner_prompt + eos_token)
        rows["rejected"].append(pair.loser_prompt + eos_token)
        rows["group_id"].append(pair.group_id)
    return rows


def anchor_preference_rows(
    anchors: Sequence[Any],
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    eos_token: str,
) -> dict[str, list[Any]]:
    """Rows of anchors (``group_id``, ``product_id``, ``prompt``): ``chosen == rejected`` = the anchored creative.

    The DPO term of such a row is constant (its margin is 0 whatever the
    weights), so only the SFT term acts on it: it keeps the creative likely
    for its group (a preservation term, :mod:`learner.dpo.onpolicy`).
    Anchors of unknown groups or products are skipped.
    """
    rows: dict[str, list[Any]] = {"prompt": [], "images": [], "chosen": [], "rejected": [], "group_id": []}
    for anchor in anchors:
        if anchor.group_id not in features or anchor.product_id not in products:
            continue
        product = products[anchor.product_id]
        rows["prompt"].append(generation_input(features[anchor.group_id], product))
        rows["images"].append([product.rgb_image()])
        rows["chosen"].append(anchor.prompt + eos_token)
        rows["rejected"].append(anchor.prompt + eos_token)
        rows["group_id"].append(anchor.group_id)
    return rows


def preference_dataset(
    pairs: Sequence[PreferencePair],
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    eos_token: str,
    one_size: bool = False,
    anchors: Sequence[Any] = (),
) -> Any:
    """A ``datasets.Dataset`` of :func:`preference_rows` then :func:`anchor_preference_rows`.

    Raises ``ValueError`` when no pair is usable.
    """
    from datasets import Dataset

    kept, skipped = usable_pairs(pairs, features, products, one_size)
    if not kept:
        raise ValueError(
            f"no usable preference pair among {len(pairs)}: {skipped.unknown_group} of unknown groups, "
            f"{skipped.unknown_product} of unknown products; check that features and the catalogue cover them"
        )
    rows = preference_rows(kept, features, products, eos_token, one_size)
    if anchors and not one_size:
        for column, values in anchor_preference_rows(anchors, features, products, eos_token).items():
            rows[column].extend(values)
    return Dataset.from_dict(rows)


def creative_id(prompt: str) -> str:
    """A stable id for a logged creative: a hash of its prompt text."""
    return "c" + hashlib.blake2b(prompt.encode(), digest_size=6).hexdigest()


def pairs_from_traffic(
    log: TrafficLog, config: PairMinerConfig | None = None, groups: set[str] | None = None
) -> list[PreferencePair]:
    """Mine preference pairs from a traffic log's (group, product, prompt) cells, as the stream worker would.

    Every (group, product) with at least two logged prompts goes through
    :class:`streams.pairs.PairMiner` with the cells' final counts, until it has
    no pair left to emit.
    ``groups`` keeps only those groups.
    """
    miner = PairMiner(config)
    by_key: dict[tuple[str, str], dict[str, tuple[CreativeStats, str]]] = {}
    for (group, product, prompt), cell in log.cells().items():
        if groups is not None and group not in groups:
            continue
        by_key.setdefault((group, product), {})[creative_id(prompt)] = (
            CreativeStats(cell.impressions, cell.clicks),
            prompt,
        )
    ts = max((r.ts for r in log.records), default=0)
    pairs: list[PreferencePair] = []
    for (group, product), creatives in sorted(by_key.items()):
        if len(creatives) < 2:
            continue
        category = log.products[product].category if product in log.products else group.split("/", 1)[0]
        while found := miner.mine(group, category, product, creatives, ts=ts):
            pairs.extend(found)
    return pairs
