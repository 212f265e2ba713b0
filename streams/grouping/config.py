"""Grouping settings, the description of a group, and the attribute encoding (see docs/grouping.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GroupingConfig:
    """Settings of :class:`ProductAwareGrouper`; every count is per category.

    Attributes
    ----------
    max_groups
        Most groups a category may have (default 8). Past it, the groups with
        the most similar click profiles are merged.
    recluster_every
        Events (impressions) of a category between macro steps once warmed up
        (default 5000). Lower reacts sooner.
    first_recluster
        Events before the first macro step (default 500); the gap then doubles
        until it reaches ``recluster_every``.
    recluster_budget
        Most work of a macro step per event since the last one (default 500
        units: a table cell visited is one, a statistical test 12,000 × (1 +
        0.2 per attribute field), a level test alone 3,000; a unit took 15-26
        ns here under load). Work is counted, never timed: the schedule and the
        groups depend on the stream only, not on the machine or its load. A
        category with a large (tuple × creative) table, many-valued attributes
        or costly searches reclusters less often than ``recluster_every`` so
        that learning stays fast; on the example worlds the gap grows to
        10-25k events of a category. Between steps, cheap *looks* re-test
        the candidates closest to significance and run the step early when
        one passes; their work is counted against the same budget.
    split_alpha
        p-value a split must beat (default 1e-4), after a Bonferroni
        adjustment over the attributes tried and the ways to partition the
        split attribute's values. Strict because the test is repeated at every
        macro step: on clicks that ignore the attributes, 30 of 30 seeded
        streams of 40k events stayed one group.
    taste_alpha
        A split must also show different *tastes* (click profiles over the
        creatives up to a level) at this adjusted p-value (default 1e-3), not
        only different click levels: segments that rank creatives alike stay
        one group however differently often they click. ``1.0`` turns the
        gate off: level differences alone may split (groups form sooner, but
        segments that only click more or less often get groups of their own).
    merge_alpha
        Groups whose click profiles do not differ at this level are merged
        into one (default 0.01).
    min_group_clicks
        Each side of a split needs at least this many clicks (default 25); a
        node needs twice as many to be tried.
    match_distance
        A new group keeps the id of the old group it is matched to when their
        attribute centroids are at most this far apart (Euclidean, one-hot
        space; default 0.6 — flipping one binary attribute entirely is 1.41).
    halflife
        Events after which old counts weigh half (default 500_000); ``None``
        never forgets. Forgetting lets groups follow changing behaviour, and
        creatives no longer shown are dropped from the table.
    numeric_attributes
        Attributes whose ``int`` values are continuous, not codes (default none).
    attributes
        Only these attributes are used to group (default ``None``: all; list
        them to leave out ids or other fields that should not define groups).
    max_values
        Values of one attribute tested separately at a node (default 16); the
        rarer rest is tested as one value.
    max_tuples
        Most distinct attribute tuples a category keeps statistics for
        (default 200_000); users of tuples past it are assigned, not learned.
    cache_size
        Most raw attribute tuples whose encoding is cached (default 100_000);
        a full cache is cleared.
    evidence
        Which click profiles a split compares (default ``"both"``):
        ``"creatives"`` (per creative), ``"attributes"`` (pooled over the
        creatives' visual attributes, e.g. ``primary=red``, across creatives
        and products) or ``"both"`` (Bonferroni over the tests). Attribute
        tests need the creatives' attributes (``attributes=`` of the learn
        calls); without them only the per-creative test runs.
    interactions
        Where no single attribute splits a node, try pairs of attributes
        (default ``True``): segments defined by a combination (young in big
        cities with old in small towns) are found. The Bonferroni factor
        covers all pairs and the ways to partition their cells.
    """

    max_groups: int = 8
    recluster_every: int = 5000
    first_recluster: int = 500
    recluster_budget: float = 500.0
    split_alpha: float = 1e-4
    taste_alpha: float = 1e-3
    merge_alpha: float = 0.01
    min_group_clicks: int = 25
    match_distance: float = 0.6
    halflife: int | None = 500_000
    numeric_attributes: tuple[str, ...] = ()
    attributes: tuple[str, ...] | None = None
    max_values: int = 16
    max_tuples: int = 200_000
    cache_size: int = 100_000
    evidence: str = "both"
    interactions: bool = True

    def __post_init__(self) -> None:
        if self.max_groups < 1:
            raise ValueError(f"max_groups must be at least 1, got {self.max_groups}")
        if self.recluster_every < 1 or self.first_recluster < 1:
            raise ValueError("recluster_every and first_recluster must be at least 1")
        if self.recluster_budget <= 0:
            raise ValueError(f"recluster_budget must be positive, got {self.recluster_budget}")
        for name in ("split_alpha", "merge_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        if not 0.0 < self.taste_alpha <= 1.0:
            raise ValueError(f"taste_alpha must lie in (0, 1], got {self.taste_alpha}")
        if self.halflife is not None and self.halflife < 1:
            raise ValueError(f"halflife must be at least 1 event or None, got {self.halflife}")
        if self.match_distance < 0:
            raise ValueError(f"match_distance must not be negative, got {self.match_distance}")
        if self.evidence not in ("creatives", "attributes", "both"):
            raise ValueError(f"evidence must be 'creatives', 'attributes' or 'both', got {self.evidence!r}")
        if self.max_values < 2:
            raise ValueError(f"max_values must be at least 2, got {self.max_values}")


@dataclass(frozen=True)
class GroupInfo:
    """A group of one category as it stands now.

    Attributes
    ----------
    id
        Stable id, ``category/g<N>``.
    weight
        Events of its users (decayed by ``halflife``).
    centroid
        Mean one-hot encoding of its users: feature ``attr=value`` → share.
    created_at
        The category's event count when the id was minted.
    rule
        Which users belong, e.g. ``age_band in {18-24, 25-34}`` or ``all``.
    impressions, clicks
        Impressions with a known creative, and clicks, of its users (decayed).
    """

    id: str
    weight: float
    centroid: dict[str, float]
    created_at: int
    rule: str
    impressions: float
    clicks: float


def encode_value(value: Any, numeric: bool = False) -> str:
    """The token of one attribute value (see the module's encoding rule).

    >>> [encode_value(v) for v in ("25-34", None, True, 3, 0.0, 5.0, -2.5)]
    ['25-34', 'missing', 'true', '3', '[0,1)', '[3,7)', '(-3,-1]']
    >>> encode_value(5, numeric=True)
    '[3,7)'
    """
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and not numeric:
        return str(value)
    if isinstance(value, (int, float)):
        x = float(value)
        if math.isnan(x):
            return "missing"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        k = int(math.floor(math.log2(1.0 + abs(x))))
        low, high = 2**k - 1, 2 ** (k + 1) - 1
        return f"[{low},{high})" if x >= 0 else f"(-{high},-{low}]"
    return str(value)
