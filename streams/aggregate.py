"""Stage 2 of the worker, per category partition: group, count, mine pairs, watch drift.

Stage 1 (:mod:`streams.ingest`) sends, per micro-batch and category, one
:class:`OutcomeBatch` keyed by category to an internal topic. Event time is
only roughly ordered across user partitions, so expiry queues are kept in
arrival order (an entry leaves once it is at the front and older than the
window). One partition owns each category, so one grouping model per category assigns every user
(group ids are the same for every worker) and the counts per
(group, product, creative) are totals, not per-worker partials.

State lives in mappings the Faust app backs with changelog tables:

* ``assigned``: impression id -> ``[group, product, creative, ts, clicked, category, user]``,
  kept for the attribution window; it makes this stage idempotent (a re-sent
  impression or click is recognised and not counted twice);
* ``ctr``: ``"group|product"`` -> ``{creative: [impressions, clicks, prompt]}``;
* ``attr_ctr``: group -> ``{"attribute=value": [impressions, clicks]}``;
* ``user_groups``: ``"category|user"`` -> group, the user's current group;
* ``group_profiles`` (optional): category -> ``{group: profile}``, the group
  profiles last handed to the feature store (:class:`FeatureFeed`).

:class:`FeatureFeed` turns this state into Feast feature rows after every
batch (group profiles, group creative preferences, user -> group, products)
and hands them to the non-blocking pusher of :mod:`features.push`.
"""

from __future__ import annotations

import base64
import pickle
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from features.rows import group_preferences_row, group_profile_row, product_row, user_group_row
from streams.ctr import CreativeStats
from streams.drift import DriftMonitor
from infra.contracts.events import Impression
from streams.grouping import GroupInfo, ProductAwareGrouper
from infra.contracts.messages import DriftAlert, PreferencePair
from streams.pairs import PairMiner
from infra.contracts.prompt import PromptError, parse_prompt

Store = MutableMapping[str, Any]


@dataclass
class OutcomeBatch:
    """What stage 1 accepted for one category in one micro-batch.

    ``impressions`` rows: ``[event_id, user_id, user_attributes, product_id, creative_id, prompt, ts]``;
    ``clicks`` rows: ``[impression_id, ts]``.
    """

    impressions: list[list[Any]] = field(default_factory=list)
    clicks: list[list[Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """JSON wire form (compact; orjson: a sixth of the standard library's time for both directions).

        orjson writes NaN and ±inf as ``null``, so a non-finite attribute value (the event contract's JSON
        parser accepts them) reaches stage 2 as missing: the grouper read NaN as missing already, ±inf had
        tokens of their own (``inf``, ``-inf``).
        """
        return orjson.dumps({"impressions": self.impressions, "clicks": self.clicks})

    @classmethod
    def from_bytes(cls, data: bytes) -> OutcomeBatch:
        """Parse the JSON wire form."""
        payload = orjson.loads(data)
        return cls(impressions=payload["impressions"], clicks=payload["clicks"])


@dataclass(frozen=True)
class AggregateConfig:
    """Windows of stage 2, in event-time milliseconds, and how often grouping is snapshotted."""

    attribution_window_ms: int = 1_800_000
    drift_label_delay_ms: int = 60_000
    snapshot_every: int = 10


@dataclass
class AggregateCounters:
    """What stage 2 counted, for metrics."""

    impressions: int = 0
    clicks: int = 0
    duplicates: int = 0
    pairs: int = 0
    alerts: int = 0


@dataclass
class AggregateResult:
    """Messages to emit after one outcome batch, and what changed (for the feature feed)."""

    pairs: list[PreferencePair] = field(default_factory=list)
    alerts: list[DriftAlert] = field(default_factory=list)
    ctr_delta: dict[tuple[str, str], dict[str, list[Any]]] = field(default_factory=dict)
    """(group, product) -> {creative: [impressions, clicks, prompt]} added by the batch."""
    attr_groups: set[str] = field(default_factory=set)
    """Groups whose ``attr_ctr`` row changed."""
    moved: list[tuple[str, str | None, str]] = field(default_factory=list)
    """(user id, old group or None, new group) of users whose current group changed."""
    as_of_ms: int = 0
    """Event time the state now reflects: the latest impression or click time counted."""


@dataclass
class AggregateStores:
    """The stage's durable state (Faust tables in the worker, dicts in tests)."""

    assigned: Store
    ctr: Store
    attr_ctr: Store
    user_groups: Store
    grouping: Store
    group_profiles: Store | None = None


class AggregateStage:
    """Assigns groups and keeps per-group CTR tables for the categories it owns."""

    def __init__(
        self,
        config: AggregateConfig,
        stores: AggregateStores,
        new_grouper: Callable[[], ProductAwareGrouper],
        miner: PairMiner,
        drift: DriftMonitor,
    ) -> None:
        self.config = config
        self.stores = stores
        self.miner = miner
        self.drift = drift
        self.counters = AggregateCounters()
        self._new_grouper = new_grouper
        self._groupers: dict[str, ProductAwareGrouper] = {}
        self._batches: dict[str, int] = defaultdict(int)
        self._watermark: dict[str, int] = defaultdict(int)
        self._labels: dict[str, deque[tuple[int, str]]] = defaultdict(deque)
        self._expiry: dict[str, deque[tuple[int, str]]] = defaultdict(deque)
        self.rebuild()

    def watermark(self, category: str) -> int:
        """Largest impression time counted for ``category``."""
        return self._watermark[category]

    def rebuild(self) -> None:
        """Recreate the expiry queues from the ``assigned`` store (after recovery).

        Drift labels of impressions from before a restart are not replayed.
        """
        self._expiry.clear()
        entries = sorted((row.ts, k, row.category) for k, row in
                         ((k, Assigned(*v)) for k, v in list(self.stores.assigned.items())))
        for ts, impression_id, category in entries:
            self._expiry[category].append((ts, impression_id))
            self._watermark[category] = max(self._watermark[category], ts)

    def grouper(self, category: str) -> ProductAwareGrouper:
        """The category's grouping model, restored from its last snapshot when there is one."""
        grouper = self._groupers.get(category)
        if grouper is None:
            snapshot = self.stores.grouping.get(category)
            grouper = pickle.loads(base64.b64decode(snapshot)) if snapshot else self._new_grouper()
            self._groupers[category] = grouper
        return grouper

    def apply(self, category: str, batch: OutcomeBatch) -> AggregateResult:
        """Count one outcome batch of ``category``; return the pairs and alerts it produced."""
        grouper = self.grouper(category)
        ctr_delta: dict[tuple[str, str], dict[str, list[Any]]] = defaultdict(dict)
        prompt_delta: dict[tuple[str, str], list[int]] = {}
        assigned = self.stores.assigned
        user_groups = self.stores.user_groups
        expiry, labels = self._expiry[category], self._labels[category]
        watermark = self._watermark[category]
        moved: list[tuple[str, str | None, str]] = []
        latest_click = 0
        for event_id, user_id, user, product, creative, prompt, ts in batch.impressions:
            if event_id in assigned:
                self.counters.duplicates += 1
                continue
            names = _attribute_names(prompt)
            group = grouper.learn_and_assign(category, user, creative, names or None)
            assigned[event_id] = [group, product, creative, ts, 0, category, user]
            expiry.append((ts, event_id))
            labels.append((ts, event_id))
            user_key = f"{category}|{user_id}"
            old_group = user_groups.get(user_key)
            if old_group != group:
                user_groups[user_key] = group
                moved.append((user_id, old_group, group))
            _bump(ctr_delta[(group, product)], creative, 0, prompt)
            if names:
                _count_prompt(prompt_delta, group, prompt, 0)
            if ts > watermark:
                watermark = ts
            self.counters.impressions += 1
        self._watermark[category] = watermark
        for impression_id, ts in batch.clicks:
            stored = assigned.get(impression_id)
            if stored is None or stored[_CLICKED]:
                self.counters.duplicates += 1
                continue
            group, product, creative, imp_ts, _, stored_category, user = stored
            assigned[impression_id] = [group, product, creative, imp_ts, 1, stored_category, user]
            grouper.learn_click(category, user, creative)
            prompt = self._prompt_of(group, product, creative, ctr_delta)
            _bump(ctr_delta[(group, product)], creative, 1, prompt)
            if _attribute_names(prompt):
                _count_prompt(prompt_delta, group, prompt, 1)
            self.counters.clicks += 1
            latest_click = max(latest_click, ts)
        attr_delta = _attribute_delta(prompt_delta)
        self._apply_deltas(ctr_delta, attr_delta)
        result = AggregateResult(
            ctr_delta=dict(ctr_delta),
            attr_groups=set(attr_delta),
            moved=moved,
            as_of_ms=max(watermark, latest_click),
        )
        for group, product in ctr_delta:
            result.pairs.extend(self._mine(category, group, product, watermark))
        result.alerts.extend(self._label_drift(category))
        self._expire(category)
        self._batches[category] += 1
        if self._batches[category] % self.config.snapshot_every == 0:
            self.snapshot(category)
        self.counters.pairs += len(result.pairs)
        self.counters.alerts += len(result.alerts)
        return result

    def snapshot(self, category: str) -> None:
        """Store the category's grouping model so a restarted worker keeps its group ids."""
        self.stores.grouping[category] = base64.b64encode(pickle.dumps(self.grouper(category))).decode()

    def creative_stats(self, group: str, product: str) -> dict[str, tuple[CreativeStats, str | None]]:
        """Counts and prompt of every creative of (group, product)."""
        row = self.stores.ctr.get(f"{group}|{product}") or {}
        return {c: (CreativeStats(r.impressions, r.clicks), r.prompt) for c, r in
                ((c, CreativeRow(*v)) for c, v in row.items())}

    def _prompt_of(self, group: str, product: str, creative: str, delta: dict) -> str | None:
        pending = delta.get((group, product), {}).get(creative)
        if pending is not None:
            return pending[2]
        row = self.stores.ctr.get(f"{group}|{product}") or {}
        return CreativeRow(*row.get(creative, (0, 0, None))).prompt

    def _apply_deltas(self, ctr_delta: dict, attr_delta: dict) -> None:
        for (group, product), creatives in ctr_delta.items():
            key = f"{group}|{product}"
            row = dict(self.stores.ctr.get(key) or {})
            for creative, (imps, clicks, prompt) in creatives.items():
                old = CreativeRow(*row.get(creative, (0, 0, prompt)))
                row[creative] = list(CreativeRow(old.impressions + imps, old.clicks + clicks, old.prompt or prompt))
            self.stores.ctr[key] = row
        for group, names in attr_delta.items():
            row = dict(self.stores.attr_ctr.get(group) or {})
            for name, (imps, clicks, _) in names.items():
                old = row.get(name, [0, 0])
                row[name] = [old[0] + imps, old[1] + clicks]
            self.stores.attr_ctr[group] = row

    def _mine(self, category: str, group: str, product: str, ts: int) -> list[PreferencePair]:
        return self.miner.mine(group, category, product, self.creative_stats(group, product), ts)

    def _label_drift(self, category: str) -> list[DriftAlert]:
        """Feed impressions whose click window for drift has passed to the drift monitor."""
        edge = self._watermark[category] - self.config.drift_label_delay_ms
        labels = self._labels[category]
        alerts = []
        while labels and labels[0][0] < edge:
            ts, impression_id = labels.popleft()
            stored = self.stores.assigned.get(impression_id)
            if stored is None:
                continue
            alert = self.drift.update(stored[_GROUP], category, bool(stored[_CLICKED]), ts)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def _expire(self, category: str) -> None:
        edge = self._watermark[category] - self.config.attribution_window_ms
        expiry = self._expiry[category]
        while expiry and expiry[0][0] < edge:
            _, impression_id = expiry.popleft()
            self.stores.assigned.pop(impression_id, None)



class Assigned(NamedTuple):
    """A row of the ``assigned`` table: an impression awaiting its click (stored as a list in the changelog)."""

    group: str
    product: str
    creative: str
    ts: int
    clicked: int
    category: str
    user: dict[str, Any]


_GROUP, _CLICKED = Assigned._fields.index("group"), Assigned._fields.index("clicked")
"""Positions in an ``assigned`` row, read without building an :class:`Assigned` on the hot path."""


class CreativeRow(NamedTuple):
    """A creative's counts in the ``ctr`` table (stored as a list in the changelog)."""

    impressions: int
    clicks: int
    prompt: str | None


def _bump(row: dict[str, list[Any]], key: str, clicked: int, prompt: str | None) -> None:
    counts = row.get(key)
    if counts is None:
        row[key] = counts = [0, 0, prompt]
    if clicked:
        counts[1] += 1
    else:
        counts[0] += 1


def _count_prompt(delta: dict[tuple[str, str], list[int]], group: str, prompt: str, clicked: int) -> None:
    """Count an impression (or click) of ``prompt`` in ``group``; expanded to attributes once per batch."""
    counts = delta.get((group, prompt))
    if counts is None:
        delta[(group, prompt)] = counts = [0, 0]
    counts[clicked] += 1


def _attribute_delta(prompt_delta: dict[tuple[str, str], list[int]]) -> dict[str, dict[str, list[Any]]]:
    """``group -> {"attribute=value": [impressions, clicks, None]}`` from per-prompt counts.

    Keys come in the order per-event counting would have added them (prompts in order of first use).
    """
    attr_delta: dict[str, dict[str, list[Any]]] = defaultdict(dict)
    for (group, prompt), (imps, clicks) in prompt_delta.items():
        row = attr_delta[group]
        for name in _attribute_names(prompt):
            counts = row.get(name)
            if counts is None:
                row[name] = [imps, clicks, None]
            else:
                counts[0] += imps
                counts[1] += clicks
    return attr_delta


@lru_cache(maxsize=65536)
def _attribute_names(prompt: str | None) -> tuple[str, ...]:
    """``attribute=value`` names of a prompt's visual attributes and style words (none when it has no valid prompt)."""
    if not prompt:
        return ()
    try:
        return parse_prompt(prompt).attribute_tokens()
    except PromptError:
        return ()


class FeatureFeed:
    """Feature rows from stage 2's state after each batch, handed to a non-blocking submit function.

    Per outcome batch of a category it submits the ``group_profile`` of every
    live group (and of retired groups that still have members), the
    ``group_creative_preferences`` of every group whose counts changed, and the
    ``user_group`` of every user whose group changed; per ingest batch, the
    ``product_profile`` of products first seen or changed. Group totals, prompt
    totals and member counts are kept incrementally and rebuilt from the tables
    by :meth:`rebuild` (after recovery).

    Rows are stamped with the event time the state reflects (the latest event
    counted), made strictly increasing per category: stores that keep the
    newest row by event time (Redis) must never see a change stamped as old as
    the last one.

    ``submit(view, rows, event_us)`` is :meth:`features.push.FeaturePusher.submit`
    in the worker; it must not block.
    """

    def __init__(
        self,
        stage: AggregateStage,
        submit: Callable[[str, list[dict[str, Any]], int], int],
        top_prompts: int = 5,
        max_products: int = 1_000_000,
    ) -> None:
        self.stage = stage
        self.submit = submit
        self.top_prompts = top_prompts
        self.max_products = max_products
        self._stamp: dict[str, int] = {}
        self._product_stamp = 0
        self._products: dict[str, tuple[Any, ...]] = {}
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute member counts and group totals from the tables; the next batch of each category
        re-sends all its groups."""
        stores = self.stage.stores
        self._members: dict[str, int] = defaultdict(int)
        for group in list(stores.user_groups.values()):
            self._members[group] += 1
        self._totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._prompts: dict[str, dict[str, list[int]]] = defaultdict(dict)
        for key, creatives in list(stores.ctr.items()):
            group = key.split("|", 1)[0]
            for imps, clicks, prompt in creatives.values():
                self._count(group, imps, clicks, prompt)
        self._resend = True
        self._resent: set[str] = set()

    def members(self, group: str) -> int:
        """Users whose current group is ``group``."""
        return self._members.get(group, 0)

    def after_batch(self, category: str, result: AggregateResult, groups: list[GroupInfo]) -> None:
        """Submit the rows that ``result`` (one outcome batch of ``category``) changed."""
        stamp = self._next_stamp(category, result.as_of_ms * 1000)
        users = []
        for user_id, old, new in result.moved:
            if old is not None:
                self._members[old] -= 1
            self._members[new] += 1
            users.append(user_group_row(user_id, category, new))
        touched = set(result.attr_groups)
        ctr = self.stage.stores.ctr
        for (group, product), creatives in result.ctr_delta.items():
            row = ctr.get(f"{group}|{product}") or {}
            for creative, (imps, clicks, _) in creatives.items():
                prompt = row.get(creative, (0, 0, None))[2]
                self._count(group, imps, clicks, prompt)
            touched.add(group)
        prefix = f"{category}/"
        if self._resend and category not in self._resent:
            self._resent.add(category)
            touched |= {g for g in self._totals if g.startswith(prefix)}
        profiles = self._profiles(category, groups)
        preferences = [self._preferences(group) for group in sorted(touched)]
        if profiles:
            self.submit("group_profile", profiles, stamp)
        if preferences:
            self.submit("group_creative_preferences", preferences, stamp)
        if users:
            self.submit("user_group", users, stamp)

    def after_ingest(self, impressions: Iterable[Impression]) -> None:
        """Submit ``product_profile`` rows of products first seen or changed in an ingest batch."""
        rows = []
        latest = 0
        for imp in impressions:
            product = imp.product
            signature = (imp.category, product.get("title"), product.get("price"),
                         *(product.get(k) for k in ("image_ref", "image_url", "image")))
            if self._products.get(imp.product_id) == signature:
                continue
            if len(self._products) >= self.max_products:
                self._products.clear()
            self._products[imp.product_id] = signature
            rows.append(product_row(imp.product_id, imp.category, product))
            latest = max(latest, imp.ts)
        if rows:
            self._product_stamp = max(latest * 1000, self._product_stamp + 1)
            self.submit("product_profile", rows, self._product_stamp)

    def _profiles(self, category: str, groups: list[GroupInfo]) -> list[dict[str, Any]]:
        live = {g.id for g in groups}
        rows = [
            group_profile_row(g.id, category=category, rule=g.rule, member_count=self._members.get(g.id, 0),
                              weight=g.weight, centroid=g.centroid)
            for g in groups
        ]
        prefix = f"{category}/"
        for group in sorted(g for g in self._members if g.startswith(prefix) and g not in live):
            count = self._members[group]
            rows.append(group_profile_row(group, category=category, rule="retired", member_count=count,
                                          weight=0.0, centroid={}))
            if count <= 0:
                del self._members[group]  # announced once with no members; no longer followed
        table = self.stage.stores.group_profiles
        if table is not None:
            table[category] = {row["group_id"]: {k: v for k, v in row.items() if k != "group_id"} for row in rows}
        return rows

    def _preferences(self, group: str) -> dict[str, Any]:
        totals = self._totals.get(group, [0, 0])
        prompts = self._prompts.get(group, {})
        return group_preferences_row(
            group,
            prompts={p: (v[0], v[1]) for p, v in prompts.items()},
            attributes={k: (v[0], v[1]) for k, v in (self.stage.stores.attr_ctr.get(group) or {}).items()},
            impressions=totals[0],
            clicks=totals[1],
            top_k=self.top_prompts,
        )

    def _count(self, group: str, imps: int, clicks: int, prompt: str | None) -> None:
        totals = self._totals[group]
        totals[0] += imps
        totals[1] += clicks
        if prompt:
            acc = self._prompts[group].get(prompt)
            if acc is None:
                self._prompts[group][prompt] = acc = [0, 0]
            acc[0] += imps
            acc[1] += clicks

    def _next_stamp(self, category: str, event_us: int) -> int:
        stamp = max(event_us, self._stamp.get(category, 0) + 1)
        self._stamp[category] = stamp
        return stamp

