"""Group preference features: who is in a group and which visual creative attributes it clicks on.

:func:`read_group_features` is the one place the learner reads group
features. Until the Feast read API of ``features/`` is wired in, it derives
them from logged traffic (:class:`learner.data.TrafficLog`): the group's share
of its category's impressions, its CTR, the centroid of its members'
attributes, and its CTR on each visual attribute of the creatives it was
shown and on each product (DESIGN.md §1.2). Replacing the body of that function is the only change
needed when the feature store lands.

A group is given to the G-MLLM as a compact text prefix
(:meth:`GroupFeatures.to_text`), e.g.::

    group lipstick/g0 | 38% of lipstick | ctr 3.8% | who age_band=18-24, age_band=25-34 |
    likes primary=pink, style=bright | avoids primary=navy, style=dark

``likes`` and ``avoids`` are the creative attributes whose smoothed CTR in the
group is highest / lowest relative to the group's own CTR (at most one value
per attribute, strongest first).

>>> from learner.data import TrafficLog, TrafficRecord
>>> pink = 'background=solid; palette=pink,white; position=center; scale=0.5; copy=""; style='
>>> navy = 'background=solid; palette=navy,white; position=center; scale=0.5; copy=""; style='
>>> records = [TrafficRecord(0, f"u{i % 2}", "mugs/g0", "mugs", "p1", pink if i % 2 else navy, i % 4 == 1)
...            for i in range(4000)]
>>> log = TrafficLog({}, {"u0": {"age": "old"}, "u1": {"age": "young"}}, records)
>>> features = read_group_features(log)["mugs/g0"]
>>> features.likes[0], features.avoids[0]
('primary=pink', 'primary=navy')
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from learner.data import TrafficLog
from streams.prompt import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SCALES,
    STYLE_WORDS,
    CreativePrompt,
    PromptError,
    parse_prompt,
)

ATTRIBUTE_KEYS: tuple[str, ...] = ("background", "primary", "secondary", "position", "scale", "copy", "style")
"""Visual attribute families of a creative; ``style`` counts each style word present."""

ATTRIBUTE_VOCABULARY: tuple[str, ...] = (
    *(f"background={v}" for v in BACKGROUNDS),
    *(f"primary={v}" for v in COLORS),
    *(f"secondary={v}" for v in COLORS),
    *(f"position={v}" for v in POSITIONS),
    *(f"scale={v}" for v in SCALES),
    "copy=yes",
    "copy=none",
    *(f"style={v}" for v in STYLE_WORDS),
)
"""Every attribute token :func:`creative_attributes` can return, in a fixed order (vector layout)."""

PRIOR_CLICKS = 20.0
"""Strength of the shrinkage of per-attribute CTR towards the group's CTR, in pseudo-clicks."""
LIKE_LIFT = 1.1
"""Smoothed lift at or above which an attribute value is listed as liked (at or below 1/LIKE_LIFT: avoided)."""


@dataclass(frozen=True)
class GroupFeatures:
    """Collective features of one group of one category (see the module docstring)."""

    group_id: str
    category: str
    share: float
    impressions: int
    clicks: int
    who: tuple[str, ...] = ()
    centroid: dict[str, float] = field(default_factory=dict, repr=False)
    lifts: dict[str, float] = field(default_factory=dict, repr=False)
    product_lifts: dict[str, float] = field(default_factory=dict, repr=False)
    likes: tuple[str, ...] = ()
    avoids: tuple[str, ...] = ()

    @property
    def ctr(self) -> float:
        """The group's click-through rate over all logged impressions."""
        return self.clicks / self.impressions if self.impressions else 0.0

    def to_text(self) -> str:
        """The compact structured text prefix the G-MLLM is conditioned on."""
        parts = [
            f"group {self.group_id}",
            f"{round(100 * self.share)}% of {self.category}",
            f"ctr {100 * self.ctr:.1f}%",
        ]
        if self.who:
            parts.append("who " + ", ".join(self.who))
        parts.append("likes " + (", ".join(self.likes) if self.likes else "nothing yet"))
        parts.append("avoids " + (", ".join(self.avoids) if self.avoids else "nothing yet"))
        return " | ".join(parts)

    def vector(self) -> np.ndarray:
        """Numbers for models that take vectors: share, CTR, then log-lift of each :data:`ATTRIBUTE_VOCABULARY` entry."""
        lifts = [math.log(self.lifts.get(token, 1.0)) for token in ATTRIBUTE_VOCABULARY]
        return np.array([self.share, self.ctr, *lifts], dtype=np.float32)


@lru_cache(maxsize=65536)
def creative_attributes(prompt_text: str) -> tuple[str, ...]:
    """Attribute tokens (``primary=pink``, ``style=dark``…) of a canonical prompt; empty if it does not parse.

    >>> creative_attributes('background=dots; palette=red,white; position=left; scale=0.5; copy="Sale"; style=bold')
    ('background=dots', 'primary=red', 'secondary=white', 'position=left', 'scale=0.5', 'copy=yes', 'style=bold')
    """
    try:
        prompt = parse_prompt(prompt_text)
    except PromptError:
        return ()
    return prompt_attributes(prompt)


def prompt_attributes(prompt: CreativePrompt) -> tuple[str, ...]:
    """Attribute tokens of a parsed prompt (see :func:`creative_attributes`)."""
    base = prompt.attributes()
    tokens = [f"{key}={base[key]}" for key in ATTRIBUTE_KEYS if key != "style"]
    tokens.extend(f"style={word}" for word in prompt.style)
    return tuple(tokens)


def read_group_features(traffic: TrafficLog, *, max_likes: int = 5, max_avoids: int = 3) -> dict[str, GroupFeatures]:
    """Features of every group in ``traffic``, by group id: the learner's one read of group features.

    Parameters
    ----------
    traffic
        Logged impressions with their group ids, users and prompts.
    max_likes, max_avoids
        Most attribute values listed as liked / avoided in the text prefix.

    Returns
    -------
    dict
        Group id to :class:`GroupFeatures`.
    """
    impressions: dict[str, int] = defaultdict(int)
    clicks: dict[str, int] = defaultdict(int)
    category_of: dict[str, str] = {}
    category_impressions: dict[str, int] = defaultdict(int)
    attr_counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    product_counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    user_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in traffic.records:
        group = record.group_id
        impressions[group] += 1
        clicks[group] += record.clicked
        category_of[group] = record.category
        category_impressions[record.category] += 1
        user_counts[group][record.user_id] += 1
        product_cell = product_counts[group][record.product_id]
        product_cell[0] += 1
        product_cell[1] += record.clicked
        if record.prompt is not None:
            counts = attr_counts[group]
            for token in creative_attributes(record.prompt):
                cell = counts[token]
                cell[0] += 1
                cell[1] += record.clicked

    centroids = {group: _centroid(users, traffic) for group, users in user_counts.items()}
    category_centroid: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for group, centroid in centroids.items():
        category = category_of[group]
        weight = impressions[group] / category_impressions[category]
        for key, share in centroid.items():
            category_centroid[category][key] += weight * share

    features: dict[str, GroupFeatures] = {}
    for group in sorted(impressions):
        category = category_of[group]
        ctr = clicks[group] / impressions[group]
        lifts = _lifts(attr_counts[group], ctr)
        likes, avoids = _likes_and_avoids(lifts, max_likes, max_avoids)
        centroid = centroids[group]
        over = sorted(
            ((share - category_centroid[category][key], key) for key, share in centroid.items() if share >= 0.25),
            reverse=True,
        )
        who = tuple(key for gain, key in over[:2] if gain > 0.05)
        features[group] = GroupFeatures(
            group_id=group,
            category=category,
            share=impressions[group] / category_impressions[category],
            impressions=impressions[group],
            clicks=clicks[group],
            who=who,
            centroid=dict(centroid),
            lifts=lifts,
            product_lifts=_lifts(product_counts[group], ctr),
            likes=likes,
            avoids=avoids,
        )
    return features


def _centroid(users: dict[str, int], traffic: TrafficLog) -> dict[str, float]:
    """Impression-weighted share of each ``attribute=value`` among a group's users."""
    totals: dict[str, float] = defaultdict(float)
    weight = 0
    for user, count in users.items():
        attributes = traffic.users.get(user)
        if not attributes:
            continue
        weight += count
        for name, value in attributes.items():
            totals[f"{name}={value}"] += count
    return {key: total / weight for key, total in sorted(totals.items())} if weight else {}


def _lifts(counts: dict[str, list[int]], ctr: float) -> dict[str, float]:
    """Smoothed CTR of each attribute value divided by the group's CTR."""
    if ctr <= 0:
        return {token: 1.0 for token in counts}
    prior_impressions = PRIOR_CLICKS / ctr
    return {
        token: (c + PRIOR_CLICKS) / (n + prior_impressions) / ctr for token, (n, c) in sorted(counts.items())
    }


def _likes_and_avoids(lifts: dict[str, float], max_likes: int, max_avoids: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    best: dict[str, tuple[float, str]] = {}
    worst: dict[str, tuple[float, str]] = {}
    for token, lift in lifts.items():
        key = token.split("=", 1)[0]
        if key not in best or lift > best[key][0]:
            best[key] = (lift, token)
        if key not in worst or lift < worst[key][0]:
            worst[key] = (lift, token)
    likes = sorted((item for item in best.values() if item[0] >= LIKE_LIFT), reverse=True)
    avoids = sorted(item for item in worst.values() if item[0] <= 1.0 / LIKE_LIFT)
    return tuple(t for _, t in likes[:max_likes]), tuple(t for _, t in avoids[:max_avoids])
