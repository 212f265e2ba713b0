"""Held-out figures of a G-MLLM that need no simulator: click AUC, prompt parse rates, creative choice.

>>> weighted_auc([0.1, 0.9], positives=[0, 1], negatives=[1, 0])
1.0
>>> weighted_auc([0.5, 0.5], positives=[1, 0], negatives=[0, 1])
0.5
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from infra.settings import GenerationSettings
from learner.data import Cell, ProductRecord
from features.group import GroupFeatures
from learner.model.gmllm import GMLLM, Generation
from infra.contracts.prompt import CreativePrompt, random_prompt


def weighted_auc(scores: Sequence[float], positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC AUC of items carrying ``positives`` clicked and ``negatives`` unclicked impressions each (ties count ½)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if pos.sum() <= 0 or neg.sum() <= 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s, pos, neg = s[order], pos[order], neg[order]
    _, start = np.unique(s, return_index=True)
    pos_by = np.add.reduceat(pos, start)
    neg_by = np.add.reduceat(neg, start)
    neg_below = np.concatenate([[0.0], np.cumsum(neg_by)[:-1]])
    wins = float((pos_by * (neg_below + 0.5 * neg_by)).sum())
    return wins / (pos.sum() * neg.sum())


def click_auc(
    gmllm: GMLLM,
    features: dict[str, GroupFeatures],
    products: dict[str, ProductRecord],
    cells: dict[tuple[str, str, str], Cell],
    batch_size: int = 64,
) -> tuple[float, np.ndarray]:
    """Impression-level AUC of the model's click prediction on held-out ``cells``; also returns the scores."""
    keys = [k for k in cells if k[0] in features and k[1] in products]
    items = [(features[g], products[p], prompt) for g, p, prompt in keys]
    scores = gmllm.click_probability(items, batch_size=batch_size)
    auc = weighted_auc(
        scores, [cells[k].clicks for k in keys], [cells[k].impressions - cells[k].clicks for k in keys]
    )
    return auc, scores


@dataclass(frozen=True)
class CreativeChoice:
    """The creative chosen for a (group, product), the candidates it was chosen from, and how."""

    prompt: CreativePrompt
    candidates: list[Generation]
    scores: list[float]
    fallback: bool


def choose_creative(
    gmllm: GMLLM,
    group: GroupFeatures | str,
    product: ProductRecord,
    settings: GenerationSettings,
    seed: int = 0,
    scorer: GMLLM | None = None,
) -> CreativeChoice:
    """Sample ``settings.candidates`` prompts; keep the one the model's click head scores highest (or the first).

    ``scorer`` reranks with another model's click head instead (e.g. the
    pre-trained base, frozen: a Group-DPO fit trains generation and can
    wear down the click head of the model it trains).

    When no candidate parses (possible only without constrained decoding, or
    when ``max_new_tokens`` is too short) a random prompt seeded by ``seed``
    is used and ``fallback`` is set.
    """
    candidates = gmllm.generate(
        group,
        product,
        n=settings.candidates,
        seed=seed,
        temperature=settings.temperature,
        constrained=settings.constrained,
        max_new_tokens=settings.max_new_tokens,
    )
    valid = [c for c in candidates if c.prompt is not None]
    if not valid:
        return CreativeChoice(random_prompt(random.Random(f"fallback:{seed}")), candidates, [], True)
    if not settings.rerank or len(valid) == 1:
        return CreativeChoice(valid[0].prompt, candidates, [], False)  # type: ignore[arg-type]
    scores = (scorer or gmllm).click_probability([(group, product, c.text) for c in valid]).tolist()
    best = int(np.argmax(scores))
    return CreativeChoice(valid[best].prompt, candidates, scores, False)  # type: ignore[arg-type]


def parse_rate(generations: Sequence[Generation]) -> float:
    """Share of generations whose text is a canonical prompt."""
    return sum(g.valid for g in generations) / len(generations) if generations else float("nan")
