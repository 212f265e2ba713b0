"""Group preference features: who is in a group and which visual creative attributes it clicks on.

One concept, :class:`GroupFeatures`, reached by two entry points that share
one derivation (:func:`features_from_rows`) over the rows the stream worker
pushes (:mod:`features.rows`, ``docs/features.md``):

* :func:`store_group_features` — live groups, from the Feast online store the
  stream worker feeds (:class:`features.read.FeatureReader`);
* :func:`read_group_features` — groups of a logged traffic log (pre-training,
  benchmarks, and the learner's fallback for groups the store lacks): the
  log's counts are laid out with the same row builders
  (:func:`features.rows.group_profile_row`,
  :func:`features.rows.group_preferences_row`) and derived the same way.

The learner reads them through one function,
:func:`learner.loop.group_feature_source` (store first, log as fallback).

A group is given to the G-MLLM as a compact text prefix
(:meth:`GroupFeatures.to_text`), e.g.::

    group lipstick/g0 | 38% of lipstick | ctr 3.8% | who age_band=18-24, age_band=25-34 |
    likes primary=pink, style=bright | avoids primary=navy, style=dark

``likes`` and ``avoids`` are the creative attributes whose smoothed CTR in the
group is highest / lowest relative to the group's own CTR (at most one value
per attribute, strongest first).

>>> from types import SimpleNamespace as Row
>>> pink = 'background=solid; palette=pink,white; position=center; scale=0.5; copy=""; style='
>>> navy = 'background=solid; palette=navy,white; position=center; scale=0.5; copy=""; style='
>>> records = [Row(user_id=f"u{i % 2}", group_id="mugs/g0", category="mugs", product_id="p1",
...                prompt=pink if i % 2 else navy, clicked=i % 4 == 1) for i in range(4000)]
>>> log = Row(records=records, users={"u0": {"age": "old"}, "u1": {"age": "young"}})
>>> features = read_group_features(log)["mugs/g0"]
>>> features.likes[0], features.avoids[0]
('primary=pink', 'primary=navy')
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from features.rows import group_preferences_row, group_profile_row
from infra.contracts.prompt import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SCALES,
    STYLE_WORDS,
    CreativePrompt,
    PromptError,
    parse_prompt,
)

if TYPE_CHECKING:
    from features.read import FeatureReader, GroupRows


class LoggedImpression(Protocol):
    """One logged impression (:class:`learner.data.TrafficRecord` is one)."""

    user_id: str
    group_id: str
    category: str
    product_id: str
    prompt: str | None
    clicked: bool


class LoggedTraffic(Protocol):
    """A traffic log (:class:`learner.data.TrafficLog` is one): impressions and each user's attributes."""

    records: Sequence[LoggedImpression]
    users: Mapping[str, Mapping[str, object]]

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
    return prompt.attribute_tokens()


def read_group_features(
    traffic: LoggedTraffic, *, max_likes: int = 5, max_avoids: int = 3
) -> dict[str, GroupFeatures]:
    """Features of every group in a traffic log, by group id.

    Parameters
    ----------
    traffic
        Logged impressions with their group ids, users and prompts (a :class:`learner.data.TrafficLog`).
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
    prompt_counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
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
        _count(product_counts[group][record.product_id], record.clicked)
        if record.prompt is not None:
            _count(prompt_counts[group][record.prompt], record.clicked)
            for token in creative_attributes(record.prompt):
                _count(attr_counts[group][token], record.clicked)

    profiles = {
        group: group_profile_row(group, category=category_of[group], rule="", member_count=len(users),
                                 weight=impressions[group], centroid=_centroid(users, traffic))
        for group, users in user_counts.items()
    }
    preferences = {
        group: group_preferences_row(group, prompts={k: tuple(v) for k, v in prompt_counts[group].items()},
                                     attributes={k: tuple(v) for k, v in attr_counts[group].items()},
                                     impressions=impressions[group], clicks=clicks[group])
        for group in impressions
    }
    category_centroid = {
        category: _mixed_centroid(
            (profile["weight"], _row_centroid(profile)) for profile in profiles.values()
            if profile["category"] == category
        )
        for category in category_impressions
    }
    return {
        group: features_from_rows(
            profiles[group], preferences[group], category_impressions=category_impressions[category_of[group]],
            category_centroid=category_centroid[category_of[group]], product_counts=product_counts[group],
            max_likes=max_likes, max_avoids=max_avoids,
        )
        for group in sorted(impressions)
    }


def features_from_rows(
    profile: Mapping[str, Any],
    preferences: Mapping[str, Any],
    *,
    category_impressions: int,
    category_centroid: Mapping[str, float],
    product_counts: Mapping[str, Sequence[int]] | None = None,
    max_likes: int = 5,
    max_avoids: int = 3,
) -> GroupFeatures:
    """One group's :class:`GroupFeatures` from its ``group_profile`` and ``group_creative_preferences`` rows.

    ``category_impressions`` and ``category_centroid`` describe the group's
    whole category (for ``share`` and ``who``); ``product_counts``
    (product -> (impressions, clicks)) gives ``product_lifts`` where known.
    Attribute keys outside :data:`ATTRIBUTE_VOCABULARY` are dropped.
    """
    impressions, clicks = int(preferences["impressions"]), int(preferences["clicks"])
    ctr = clicks / impressions if impressions else 0.0
    keys = preferences.get("attribute_keys") or ()
    shown = preferences.get("attribute_impressions") or ()
    clicked = preferences.get("attribute_clicks") or ()
    counts = {key: (int(n), int(c)) for key, n, c in zip(keys, shown, clicked) if key in _VOCABULARY}
    lifts = _lifts(counts, ctr)
    likes, avoids = _likes_and_avoids(lifts, max_likes, max_avoids)
    centroid = _row_centroid(profile)
    return GroupFeatures(
        group_id=str(profile["group_id"]),
        category=str(profile["category"]),
        share=impressions / category_impressions if category_impressions else 0.0,
        impressions=impressions,
        clicks=clicks,
        who=_who(centroid, category_centroid),
        centroid=centroid,
        lifts=lifts,
        product_lifts=_lifts(product_counts, ctr) if product_counts else {},
        likes=likes,
        avoids=avoids,
    )


def _count(cell: list[int], clicked: bool) -> None:
    cell[0] += 1
    cell[1] += clicked


def _row_centroid(profile: Mapping[str, Any]) -> dict[str, float]:
    keys, values = profile.get("centroid_keys"), profile.get("centroid")
    if keys is None or values is None:
        return {}
    return {str(key): float(share) for key, share in zip(keys, values)}


PROBE_GAP = 16
"""Consecutive unknown ids ``category/g<N>`` after which :func:`store_group_features` stops looking for more groups."""

_GROUP_NUMBER = re.compile(r"/g(\d+)$")
_VOCABULARY = frozenset(ATTRIBUTE_VOCABULARY)


def store_group_features(
    reader: FeatureReader, group_ids: Sequence[str], *, max_likes: int = 5, max_avoids: int = 3
) -> dict[str, GroupFeatures]:
    """Features of ``group_ids`` from the feature store, by group id; a group the store lacks is left out.

    The same :class:`GroupFeatures` as :func:`read_group_features` derives from
    a log of the same events, built from the rows the stream worker pushes
    (``group_profile`` and ``group_creative_preferences``, see ``docs/features.md``):

    * ``impressions``, ``clicks`` (so ``ctr``): the group's totals, counted
      under the group the user had at each impression — as a log labels them;
    * ``share``: the group's impressions over those of every group of its
      category the store knows (retired ones included, as a log counts their
      impressions too). The other groups are found by their ids,
      ``category/g<N>`` counting up from 0 (ids are never reused), up to
      :data:`PROBE_GAP` unknown ids past the highest known one;
    * ``centroid``: the store's centroid, the share of each ``attribute=value``
      among the group's current members weighted by their events (decayed);
      ``who`` compares it, as :func:`read_group_features` does, with the
      category's centroid: the groups' centroids averaged with their
      ``weight`` (the decayed events of their current members, so the average
      is the centroid of all the category's users);
    * ``lifts``, ``likes``, ``avoids``: from the per-attribute impressions and
      clicks, with the same smoothing. The worker counts the attributes of
      :meth:`infra.contracts.prompt.CreativePrompt.attributes` under the learner's
      names (``primary=pink``, ``scale=0.5``, ``copy=yes``…) but no ``style=``
      words, so those never appear here; keys outside
      :data:`ATTRIBUTE_VOCABULARY` are dropped;
    * ``product_lifts``: empty (the store keeps no per-product counts).

    Parameters
    ----------
    reader
        A :class:`features.read.FeatureReader` (cached: repeated calls are cheap).
    group_ids
        Groups to describe (duplicates allowed).
    max_likes, max_avoids
        Most attribute values listed as liked / avoided in the text prefix.

    Returns
    -------
    dict
        Group id to :class:`GroupFeatures`, for the groups that have both rows in
        the store (the caller falls back for the others, e.g. to a log).
    """
    wanted = list(dict.fromkeys(group_ids))
    if not wanted:
        return {}
    rows = reader.read_group_rows(wanted)
    found = [i for i, ok in enumerate(rows.found) if ok]
    if not found:
        return {}
    categories = {str(rows.category[i]) for i in found}
    totals = {category: _store_category(reader, category, rows) for category in sorted(categories)}

    features: dict[str, GroupFeatures] = {}
    for i in found:
        category = str(rows.category[i])
        category_impressions, category_centroid = totals[category]
        features[rows.group_ids[i]] = features_from_rows(
            rows.profile(i), rows.preferences(i), category_impressions=category_impressions,
            category_centroid=category_centroid, max_likes=max_likes, max_avoids=max_avoids,
        )
    return features


def _store_centroid(rows: GroupRows, i: int) -> dict[str, float]:
    keys, values = rows.centroid_keys[i], rows.centroid[i]
    if keys is None or values is None:
        return {}
    return {key: float(share) for key, share in zip(keys, values)}


def _store_category(reader: FeatureReader, category: str, rows: GroupRows) -> tuple[int, dict[str, float]]:
    """Impressions of all the category's groups in the store, and the category's centroid.

    ``rows``: the groups asked for; the category's other groups are found by
    probing ids (see :func:`store_group_features`).
    """
    prefix = f"{category}/g"
    counted: set[str] = set()
    impressions = 0
    parts: list[tuple[float, dict[str, float]]] = []

    def add(rows: GroupRows) -> None:
        nonlocal impressions
        for i, group in enumerate(rows.group_ids):
            own = rows.category[i] if rows.found_profile[i] else category if group.startswith(f"{category}/") else None
            if group in counted or own != category or not (rows.found_profile[i] or rows.found_preferences[i]):
                continue  # unknown, another category's, or seen
            counted.add(group)
            if rows.found_preferences[i]:
                impressions += int(rows.impressions[i])
            if rows.found_profile[i]:
                parts.append((float(rows.weight[i]), _store_centroid(rows, i)))

    add(rows)
    numbers = [int(m.group(1)) for g in counted if g.startswith(prefix) and (m := _GROUP_NUMBER.search(g))]
    last, start = max(numbers, default=-1), 0
    while True:
        end = last + 1 + PROBE_GAP
        probe = reader.read_group_rows([f"{prefix}{n}" for n in range(start, end)])
        hits = [start + i for i in range(len(probe)) if probe.found_profile[i] or probe.found_preferences[i]]
        add(probe)
        last = max([last, *hits])
        if last + 1 + PROBE_GAP <= end:
            break
        start = end
    return impressions, _mixed_centroid(parts)


def _centroid(users: dict[str, int], traffic: LoggedTraffic) -> dict[str, float]:
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


def _mixed_centroid(parts: Iterable[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """The centroid of a union of groups: their centroids averaged with the given (non-negative) weights."""
    weighted = [(weight, centroid) for weight, centroid in parts if weight > 0]
    total = sum(weight for weight, _ in weighted)
    mixed: dict[str, float] = defaultdict(float)
    for weight, centroid in weighted:
        for key, share in centroid.items():
            mixed[key] += weight / total * share
    return dict(mixed)


def _who(centroid: Mapping[str, float], category_centroid: Mapping[str, float]) -> tuple[str, ...]:
    """At most two ``attribute=value`` shared by >= 25 % of the group and > 5 points more common than in its category."""
    over = sorted(
        ((share - category_centroid.get(key, 0.0), key) for key, share in centroid.items() if share >= 0.25),
        reverse=True,
    )
    return tuple(key for gain, key in over[:2] if gain > 0.05)


def _lifts(counts: Mapping[str, Sequence[int]], ctr: float) -> dict[str, float]:
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
