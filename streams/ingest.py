"""Stage 1 of the worker, per user partition: validate, deduplicate, attribute clicks.

Events arrive keyed by user id, so a user's impressions and clicks share a
partition and this stage needs no repartitioning. Its state lives in two
mappings that the Faust app backs with changelog tables (plain dicts in unit
tests), each value carrying its event time and partition so that expiry can be
rebuilt after a restart:

* ``seen``: event id -> ``[ts, partition, held_for]`` — every accepted event id
  inside the dedupe window; ``held_for`` is the impression id of a click whose
  impression has not arrived yet ("" otherwise).
* ``index``: impression id -> ``[category, ts, clicked, partition]`` — the
  impressions clicks can still be attributed to (the attribution window).

Windows run on event time: each partition's watermark is the largest ``ts``
seen there, and entries older than watermark − window are dropped. A click that
arrives before its impression is held until the impression comes or the
window closes (then it is an orphan). A click later than the window after its
impression is *late*. Both are counted, never silently lost.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from infra.contracts.events import BadEvent, Click, EventError, Impression, decode_message


@dataclass(frozen=True)
class IngestConfig:
    """Windows of stage 1, in event-time milliseconds."""

    dedupe_window_ms: int = 3_600_000
    attribution_window_ms: int = 1_800_000


@dataclass(frozen=True)
class ClickOutcome:
    """A click attributed to its impression, to be counted in the impression's group."""

    impression_id: str
    category: str
    ts: int


@dataclass(frozen=True)
class Rejected:
    """An event that failed validation: goes to the dead-letter topic.

    ``position`` is its message's place in the processed list; ``index`` its place in that
    message's batch (None: the whole message was rejected).
    """

    error: EventError
    raw: bytes
    position: int
    index: int | None = None


@dataclass
class IngestCounters:
    """What stage 1 did, for metrics and reports."""

    events: int = 0
    """Valid events read (impressions and clicks, duplicates included)."""
    impressions: int = 0
    clicks_attributed: int = 0
    duplicates: int = 0
    rejected: int = 0
    clicks_held: int = 0
    clicks_late: int = 0
    clicks_orphan: int = 0
    clicks_repeat: int = 0


@dataclass
class BatchResult:
    """Outputs of one partition's slice of a micro-batch."""

    impressions: list[Impression] = field(default_factory=list)
    clicks: list[ClickOutcome] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    events_per_message: list[int] = field(default_factory=list)
    """Events (valid or not) each processed message carried, in order."""


Seen = MutableMapping[str, list]
Index = MutableMapping[str, list]


class IngestStage:
    """Validates, deduplicates and attributes the events of the partitions it owns.

    Examples
    --------
    >>> from infra.contracts.events import to_bytes
    >>> stage = IngestStage(IngestConfig(), seen={}, index={})
    >>> imp = Impression(event_id="i1", ts=1000, user_id="u1", user={}, product_id="p1",
    ...     category="drill", product={}, creative_id="c1", prompt=None, model_version="m", placement="feed")
    >>> clk = Click(event_id="k1", ts=2000, impression_id="i1", user_id="u1", product_id="p1", creative_id="c1")
    >>> out = stage.process(0, [to_bytes(imp), to_bytes(imp), to_bytes(clk), b"oops"])
    >>> len(out.impressions), len(out.clicks), len(out.rejected), stage.counters.duplicates
    (1, 1, 1, 1)
    """

    def __init__(self, config: IngestConfig, seen: Seen, index: Index) -> None:
        self.config = config
        self.seen = seen
        self.index = index
        self.counters = IngestCounters()
        self._watermark: dict[int, int] = defaultdict(int)
        self._seen_queue: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self._index_queue: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self._held_queue: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self._held: dict[str, list[Click]] = defaultdict(list)
        self.rebuild()

    def rebuild(self) -> None:
        """Recreate expiry queues and held clicks from the stores (after recovery)."""
        for queues in (self._seen_queue, self._index_queue, self._held_queue):
            queues.clear()
        self._held.clear()
        for event_id, (ts, partition, held_for) in list(self.seen.items()):
            heapq.heappush(self._seen_queue[partition], (ts, event_id))
            self._watermark[partition] = max(self._watermark[partition], ts)
            if held_for:
                self._held[held_for].append(_held_click(event_id, ts, held_for))
                heapq.heappush(self._held_queue[partition], (ts, event_id))
        for impression_id, (_, ts, _, partition) in list(self.index.items()):
            heapq.heappush(self._index_queue[partition], (ts, impression_id))

    def watermark(self, partition: int) -> int:
        """Largest event time seen on ``partition``."""
        return self._watermark[partition]

    def process(self, partition: int, values: list[bytes]) -> BatchResult:
        """Handle one partition's messages (one event or a batch each) in offset order; state goes to the stores."""
        result = BatchResult()
        counters, seen = self.counters, self.seen
        watermark = self._watermark[partition]
        for position, raw in enumerate(values):
            events = decode_message(raw)
            result.events_per_message.append(len(events))
            for event in events:
                if isinstance(event, BadEvent):
                    counters.rejected += 1
                    result.rejected.append(Rejected(event.error, event.raw, position, event.index))
                    continue
                counters.events += 1
                if event.event_id in seen:
                    counters.duplicates += 1
                    continue
                if event.ts > watermark:
                    watermark = event.ts
                if isinstance(event, Impression):
                    self._accept_impression(partition, event, result)
                else:
                    self._accept_click(partition, event, result)
        self._watermark[partition] = watermark
        self._expire(partition)
        return result

    def _accept_impression(self, partition: int, imp: Impression, result: BatchResult) -> None:
        event_id, ts = imp.event_id, imp.ts
        self._remember(partition, event_id, ts, "")
        self.index[event_id] = [imp.category, ts, 0, partition]
        heapq.heappush(self._index_queue[partition], (ts, event_id))
        self.counters.impressions += 1
        result.impressions.append(imp)
        if event_id in self._held:
            for click in self._held.pop(event_id):
                self.counters.clicks_held -= 1
                self.seen[click.event_id] = [click.ts, partition, ""]
                self._attribute(click, result)

    def _accept_click(self, partition: int, click: Click, result: BatchResult) -> None:
        if click.impression_id in self.index:
            self._remember(partition, click.event_id, click.ts, "")
            self._attribute(click, result)
            return
        self._remember(partition, click.event_id, click.ts, click.impression_id)
        self._held[click.impression_id].append(click)
        heapq.heappush(self._held_queue[partition], (click.ts, click.event_id))
        self.counters.clicks_held += 1

    def _attribute(self, click: Click, result: BatchResult) -> None:
        entry = self.index[click.impression_id]
        category, imp_ts, clicked, partition = entry
        if click.ts - imp_ts > self.config.attribution_window_ms:
            self.counters.clicks_late += 1
        elif clicked:
            self.counters.clicks_repeat += 1
        else:
            self.index[click.impression_id] = [category, imp_ts, 1, partition]
            self.counters.clicks_attributed += 1
            result.clicks.append(ClickOutcome(click.impression_id, category, click.ts))

    def _remember(self, partition: int, event_id: str, ts: int, held_for: str) -> None:
        self.seen[event_id] = [ts, partition, held_for]
        heapq.heappush(self._seen_queue[partition], (ts, event_id))

    def _expire(self, partition: int) -> None:
        watermark = self._watermark[partition]
        attribution_edge = watermark - self.config.attribution_window_ms
        for _, impression_id in _pop_older(self._index_queue[partition], attribution_edge):
            self.index.pop(impression_id, None)
        for _, click_id in _pop_older(self._held_queue[partition], attribution_edge):
            self._orphan(partition, click_id)
        for _, event_id in _pop_older(self._seen_queue[partition], watermark - self.config.dedupe_window_ms):
            entry = self.seen.get(event_id)
            if entry is not None and not entry[2]:
                del self.seen[event_id]

    def _orphan(self, partition: int, event_id: str) -> None:
        entry = self.seen.get(event_id)
        if entry is None or not entry[2]:
            return  # its impression arrived meanwhile
        ts, _, held_for = entry
        remaining = [c for c in self._held.pop(held_for, []) if c.event_id != event_id]
        if remaining:
            self._held[held_for] = remaining
        self.seen[event_id] = [ts, partition, ""]
        heapq.heappush(self._seen_queue[partition], (ts, event_id))
        self.counters.clicks_held -= 1
        self.counters.clicks_orphan += 1


def _pop_older(queue: list[tuple[int, str]], edge: int) -> list[tuple[int, str]]:
    """Remove and return the entries of a heap with ``ts < edge``."""
    popped = []
    while queue and queue[0][0] < edge:
        popped.append(heapq.heappop(queue))
    return popped


def _held_click(event_id: str, ts: int, impression_id: str) -> Click:
    """A held click rebuilt from the ``seen`` store (only the fields attribution needs)."""
    return Click(event_id=event_id, ts=ts, impression_id=impression_id, user_id="?", product_id="?", creative_id="?")
