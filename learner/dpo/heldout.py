"""Held-out figures of a Group-DPO candidate per group: preference accuracy and mean implicit-reward margin.

For a held-out pair (winner ``w``, loser ``l``, prompt ``x`` with the group
prefix) the implicit reward margin of the candidate ``π`` against the
incumbent ``π_ref`` (the reference it was trained from) is::

    m = β [(log π(w|x) − log π_ref(w|x)) − (log π(l|x) − log π_ref(l|x))]

Accuracy is the share of pairs with ``m > 0``, ties counted ½, so the incumbent
measured against itself scores exactly 0.5 with mean margin 0: a candidate
that moved towards the held-out winners of a group scores above 0.5 there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from learner.data import ProductRecord
from learner.dpo.data import pair_group, usable_pairs
from learner.gate import GroupFigures
from features.group import GroupFeatures
from learner.model.gmllm import GMLLM
from infra.contracts.messages import PreferencePair


def pair_logprobs(
    gmllm: GMLLM,
    pairs: Sequence[PreferencePair],
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    one_size: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(log π(winner|x), log π(loser|x))`` for each pair (all must be usable)."""
    groups = [pair_group(p, features, one_size) for p in pairs]
    winners = [(g, products[p.product_id], p.winner_prompt) for g, p in zip(groups, pairs, strict=True)]
    losers = [(g, products[p.product_id], p.loser_prompt) for g, p in zip(groups, pairs, strict=True)]
    return gmllm.completion_logprobs(winners), gmllm.completion_logprobs(losers)


def accuracy(margins: np.ndarray) -> float:
    """Share of margins above 0, ties counted ½ (NaN when empty).

    >>> accuracy(np.array([1.0, -1.0, 0.0, 2.0]))
    0.625
    """
    if len(margins) == 0:
        return float("nan")
    return float(np.mean((margins > 0) + 0.5 * (margins == 0)))


def heldout_figures(
    candidate: GMLLM,
    incumbent: GMLLM,
    pairs: Sequence[PreferencePair],
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    beta: float,
    one_size: bool = False,
) -> tuple[dict[str, GroupFigures], dict[str, GroupFigures]]:
    """Per-group figures of ``(candidate, incumbent)`` on held-out ``pairs``; the incumbent's are 0.5 / 0 by definition."""
    kept, _ = usable_pairs(pairs, features, products, one_size)
    if not kept:
        return {}, {}
    new_w, new_l = pair_logprobs(candidate, kept, features, products, one_size)
    old_w, old_l = pair_logprobs(incumbent, kept, features, products, one_size)
    margins = beta * ((new_w - old_w) - (new_l - old_l))
    groups = np.array([p.group_id for p in kept])
    new: dict[str, GroupFigures] = {}
    old: dict[str, GroupFigures] = {}
    for group in sorted(set(groups.tolist())):
        mask = groups == group
        count = int(mask.sum())
        new[group] = GroupFigures(group, count, accuracy(margins[mask]), float(margins[mask].mean()))
        old[group] = GroupFigures(group, count, 0.5, 0.0)
    return new, old
