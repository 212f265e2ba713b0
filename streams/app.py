"""The Faust stream worker: two agents over the impression and click streams.

* ``ingest`` reads impressions and clicks (keyed by user, so no repartition is
  needed) in micro-batches: validate (bad events to the dead-letter topic),
  deduplicate, attribute clicks (:mod:`streams.ingest`), then send one outcome
  batch per category to the internal ``<app_id>-outcomes`` topic keyed by
  category;
* ``aggregate`` owns the categories: grouping, CTR tables, preference pairs,
  drift alerts (:mod:`streams.aggregate`).

With ``features.enabled`` both stages also feed the feature store: rows are
built after each batch (:class:`streams.aggregate.FeatureFeed`) and pushed to
Feast from a background thread (:mod:`features.push`), so a slow or failing
store never blocks or crashes the stream.

Delivery is at-least-once (Faust commits offsets after a batch is handled);
idempotence by event id in both stages turns redelivery into exact counts.
Tables are in-memory stores rebuilt from their changelog topics on restart.
A batch returns (and Faust may commit its offsets) only once the broker has
acknowledged the journal entries that make a replay skip it
(:class:`Deliveries`, one per stage; ``producer.flush()`` alone does not wait for them).
Both stages take micro-batches and wait for the broker once or twice per batch, not per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import faust
from faust.streams import _current_event
from faust.events import Event
from faust.types import EventT, Message, StreamT

from infra.contracts.events import EventError
from infra.contracts.messages import dead_letter_bytes
from infra.security import aiokafka_options, faust_credentials
from infra.contracts.messages import to_bytes as message_bytes
from infra.settings import Settings, StreamsSettings
from streams import metrics
from streams.aggregate import AggregateResult, FeatureFeed, OutcomeBatch
from streams.ingest import BatchResult
from streams.offsets import Admit, OffsetGuard, read_records
from streams.stages import build_stages, collect_outcomes, detach_aggregate

log = logging.getLogger(__name__)


FETCH_MAX_WAIT_MS = 100
"""Longest a consumer fetch waits for data. Faust fixes it at 1,500 ms; on Tansu a fetch then often
returns only after 0.1-1 s even when records arrived, at each of the worker's two hops. With 100 ms
the hops add ~50 ms each; a busy worker's fetches return at once either way."""


def _short_fetch_wait() -> None:
    """Make Faust's aiokafka consumers use :data:`FETCH_MAX_WAIT_MS` (once per process)."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    if getattr(thread, "_osmf_fetch_wait", False):
        return
    create = thread._create_worker_consumer

    def create_worker_consumer(self, transport):  # noqa: ANN001, ANN202
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # noqa: SLF001 - read by the fetcher at start()
        return consumer

    thread._create_worker_consumer = create_worker_consumer
    thread._osmf_fetch_wait = True


CHUNK_BYTES = 512 * 1024
"""Most message bytes of one partition stage 1 handles between two journal flushes (~1,000 events): keeps
each changelog entry as small with batched messages as with single events."""
OUTCOME_ROWS = 2_000
"""A category's outcome message is sent once it holds this many rows (far under Kafka's 1 MB message limit)."""
AGGREGATE_WITHIN_S = 0.01
"""Longest stage 2 waits to fill a micro-batch of outcome messages: a backlog fills it at once (one delivery
wait per batch instead of per message), while a message arriving alone is held at most this long."""
AGGREGATE_CHUNK_BYTES = 256 * 1024
"""Most outcome-message bytes of one partition stage 2 journals in one entry (at least one message): the entry
holds their ``assigned`` rows and view rows, about as large again, and must stay under Kafka's 1 MB."""
INGEST_TABLES = frozenset({"seen-journal", "impression-index-journal"})
"""Stage 1's tables; every other table belongs to stage 2. Each stage waits only for what it sent."""


def faust_tuning(cfg: StreamsSettings) -> dict[str, Any]:
    """The Faust settings ``streams`` tunes (measured one at a time: docs/streams.md "Faust settings")."""
    return {
        "stream_buffer_maxsize": cfg.buffer_maxsize or max(4 * cfg.batch_size, 4096),
        "broker_max_poll_records": cfg.max_poll_records or max(cfg.batch_size, 500),
        "cython_optimizations": cfg.cython_optimizations,
    }


def _event_loop(kind: str) -> asyncio.AbstractEventLoop | None:
    """A new uvloop loop, made this thread's loop, for ``uvloop``; None (Faust's default) for ``asyncio``."""
    if kind != "uvloop":
        return None
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


class Worker:
    """The Faust app with its topics, tables and the two stages, built from settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        cfg = settings.streams
        topics = settings.topics
        _short_fetch_wait()
        self.app = faust.App(
            cfg.app_id,
            loop=_event_loop(cfg.event_loop),
            broker_credentials=faust_credentials(settings.security.kafka),
            broker=[f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
            store="memory://",
            web_enabled=False,
            key_serializer="raw",
            value_serializer="raw",
            topic_partitions=topics.partitions,
            topic_replication_factor=1,
            table_standby_replicas=0,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=cfg.session_timeout_s,
            broker_heartbeat_interval=max(cfg.session_timeout_s / 5, 0.5),
            broker_rebalance_timeout=max(cfg.session_timeout_s, 5.0),
            **faust_tuning(cfg),
            producer_linger=0.005,
            Table=TrackedTable,
        )
        self.events_topic = self.app.topic(topics.impressions, topics.clicks)
        self.outcomes_topic = self.app.topic(f"{cfg.app_id}-outcomes", partitions=cfg.outcome_partitions, internal=True)
        self.dead_letter_topic = self.app.topic(topics.dead_letter)
        self.pairs_topic = self.app.topic(topics.preference_pairs)
        self.drift_topic = self.app.topic(topics.drift_alerts)

        json_schema = faust.Schema(key_serializer="json", value_serializer="json")

        self.deliveries = {"ingest": Deliveries(), "aggregate": Deliveries()}
        """What each stage sent and waits for (its tables' changelog records and its topic messages)."""

        def table(name: str, partitions: int) -> faust.Table:
            made = self.app.Table(name, default=None, partitions=partitions, schema=json_schema)
            made.deliveries = self.deliveries["ingest" if name in INGEST_TABLES else "aggregate"]
            return made

        stages = self._stages = build_stages(settings, table, writer=_changelog_writer)
        self.seen, self.index, self.assigned = stages.seen, stages.index, stages.assigned
        self.stores, self.ingest, self.aggregate = stages.stores, stages.ingest, stages.aggregate
        self.pusher = None
        self.feed: FeatureFeed | None = None
        if settings.features.enabled:
            from features.push import FeaturePusher, PushConfig
            from features.sink import FeastSink

            self.pusher = FeaturePusher(
                FeastSink(settings), PushConfig.from_settings(settings.features), observer=PushMetrics()
            )
            self.feed = FeatureFeed(self.aggregate, self.pusher.submit, top_prompts=settings.features.top_prompts)
        self._next_offset: dict[tuple[str, int], int] = {}
        self.input_offsets = OffsetGuard()
        """Next offset of each impression/click partition stage 1 processed (see :mod:`streams.offsets`)."""
        self.outcome_offsets = OffsetGuard()
        """Next offset of each outcome partition stage 2 processed."""
        self._register()

    def start_feature_push(self, wait_s: float = 0.0) -> bool:
        """Start the background feature pusher; it imports Feast and applies the repository on its thread.

        ``wait_s`` > 0 waits (at most that long) for the store to open, so that those seconds of
        import, which hold the GIL, are not spent while the stream runs. True when the store is open.
        """
        if self.pusher is None:
            return False
        self.pusher.start()
        return self.pusher.wait_opened(wait_s) if wait_s > 0 else False

    def _register(self) -> None:
        self.app.agent(self.events_topic, name="ingest")(self._ingest_agent)
        self.app.agent(self.outcomes_topic, name="aggregate")(self._aggregate_agent)
        self.seen.table.on_recover(self._rebuild_ingest)
        self.index.table.on_recover(self._rebuild_ingest)
        self.assigned.table.on_recover(self._rebuild_aggregate)
        self.app.timer(5.0)(self._report_lag)
        self.app.on_before_shutdown.connect(self._close_feature_push)

    async def _close_feature_push(self, sender: object = None, **_: object) -> None:
        if self.pusher is not None:
            self.pusher.close(timeout_s=5.0)

    async def _rebuild_ingest(self) -> None:
        self.seen.recover()
        self.index.recover()
        self.ingest.rebuild()
        offsets = dict(self.index.recovered_offsets)
        for tp, offset in self.seen.recovered_offsets.items():
            offsets[tp] = max(offset, offsets.get(tp, 0))
        self.input_offsets.reset(offsets)
        log.info("recovered stage 1: next input offsets from the journals %s", _offsets_text(offsets))

    async def _rebuild_aggregate(self) -> None:
        self.assigned.recover()
        for partition, rows in self.assigned.recovered_views.items():
            await self._send_views(partition, rows)
        self.aggregate.rebuild()
        self.outcome_offsets.reset(self.assigned.recovered_offsets)
        log.info("recovered stage 2: next outcome offsets from the journal %s",
                 _offsets_text(self.assigned.recovered_offsets))
        log.info("recovered stage 2: %d assigned impressions from %s journal entries per partition; "
                 "view rows restored from them per partition: %s", len(self.assigned),
                 self.assigned.entries_per_partition(),
                 {p: {name: len(r) for name, r in views.items()} for p, views in self.assigned.recovered_views.items()})
        if self.feed is not None:
            self._feed(self.feed.rebuild)

    async def _ingest_agent(self, stream: StreamT) -> None:
        cfg = self.settings.streams
        async for events in stream.take_events(cfg.batch_size, within=cfg.batch_within_s):
            await self._ingest_batch(stream, events)

    async def _ingest_batch(self, stream: StreamT, events: Sequence[EventT]) -> None:
        """Stage 1 over one micro-batch.

        Order matters for a kill at any moment: the outcome (and dead-letter) messages are delivered
        before the journal entries that make a replay of these events skip them, so a replay either
        re-sends an outcome (stage 2 drops it by impression id) or finds nothing was sent.
        """
        start = time.perf_counter()
        metrics.BATCHES_STARTED.labels("ingest").inc()
        events = await self._admit(self.input_offsets, events)
        for event in events:
            self._next_offset[(event.message.topic, event.message.partition)] = event.message.offset + 1
        by_partition = _by_partition(events)
        outcomes: dict[str, OutcomeBatch] = defaultdict(OutcomeBatch)
        before = _snapshot(self.ingest.counters)
        entries = []
        n_events = 0
        for partition, part_events in by_partition.items():
            for chunk in _chunks(part_events, CHUNK_BYTES):
                result = self.ingest.process(partition, [e.value or b"" for e in chunk])
                watermark = self.ingest.watermark(partition)
                entries.append((chunk[-1], partition, watermark, self.seen.detach(), self.index.detach(),
                                _next_offsets(chunk)))
                n_events += sum(result.events_per_message)
                _count_in(result, chunk)
                await self._dead_letter(result, chunk)
                collect_outcomes(result, outcomes)
                if self.feed is not None and result.impressions:
                    self._feed(self.feed.after_ingest, result.impressions)
                await self._send_outcomes(outcomes, at_least=OUTCOME_ROWS)
        await self._send_outcomes(outcomes, at_least=1)
        await self._delivered("ingest")
        for last_event, partition, watermark, seen, index, offsets in entries:
            with _table_context(last_event):
                self.seen.write(seen, partition, watermark, offsets=offsets)
                self.index.write(index, partition, watermark, offsets=offsets)
        # Faust acks these events when this returns and may commit their offsets at once: the entries must be
        # durable by then, or a kill resumes past events whose impression index (for later clicks) is gone.
        await self._delivered("ingest")
        metrics.BATCH_SIZE.observe(n_events)
        metrics.STAGE_SECONDS.labels("ingest").observe(time.perf_counter() - start)
        metrics.LAST_BATCH.labels("ingest").set_to_current_time()
        _count_ingest(before, self.ingest.counters)

    async def _admit(self, guard: OffsetGuard, events: Sequence[EventT]) -> list[EventT]:
        """``events`` with the records the consumer skipped before any of them (a hole in a partition's offsets),
        read here and put before it (:mod:`streams.offsets`)."""
        admitted = []
        for event in events:
            message = event.message
            if guard.admit(message.topic, message.partition, message.offset) is Admit.HOLE:
                admitted.extend(await self._fill_hole(guard, message))
                guard.admit(message.topic, message.partition, message.offset)
            admitted.append(event)
        return admitted

    async def _fill_hole(self, guard: OffsetGuard, message: Any) -> list[EventT]:
        """The records of ``message``'s partition from the guard's next offset up to it, as events."""
        topic, partition = message.topic, message.partition
        start = guard.expected(topic, partition)
        log.warning("%s[%d]: offset %d came while %d is next; reading %d-%d past the consumer",
                    topic, partition, message.offset, start, start, message.offset - 1)
        records = await read_records(self.settings.bootstrap_servers, aiokafka_options(self.settings.security.kafka),
                                     topic, partition, start, message.offset)
        metrics.REFETCHED.labels(topic).inc(len(records))
        if len(records) < message.offset - start:
            log.error("%s[%d]: only %d of offsets %d-%d are in the log; going on without the others",
                      topic, partition, len(records), start, message.offset - 1)
        events = []
        for record in records:
            guard.admit(topic, partition, record.offset)
            events.append(_event_of(self.app, record))
        guard.expect(topic, partition, message.offset)
        return events

    async def _send_outcomes(self, outcomes: dict[str, OutcomeBatch], at_least: int) -> None:
        """Send each category's outcome batch that holds ``at_least`` rows (keyed by category)."""
        for category in list(outcomes):
            batch = outcomes[category]
            if len(batch.impressions) + len(batch.clicks) >= at_least:
                sent = await self.outcomes_topic.send(key=category.encode(), value=batch.to_bytes())
                self.deliveries["ingest"].add("outcomes", sent)
                del outcomes[category]

    async def _dead_letter(self, result: BatchResult, part_events: Sequence[EventT]) -> None:
        if not result.rejected:
            return
        for rejected in result.rejected:
            message = part_events[rejected.position].message
            error = rejected.error
            if rejected.index is not None:
                error = EventError(error.field, f"{error.reason} (event {rejected.index} of the batch message)")
            letter = dead_letter_bytes(
                error, rejected.raw, source_topic=message.topic, partition=message.partition, offset=message.offset,
            )
            sent = await self.dead_letter_topic.send(key=message.key, value=letter)
            self.deliveries["ingest"].add("dead-letter", sent)
            metrics.DEAD_LETTERED.labels(metrics.field_label(rejected.error.field)).inc()

    async def _aggregate_agent(self, stream: StreamT) -> None:
        async for events in stream.take_events(self.settings.streams.batch_size, within=AGGREGATE_WITHIN_S):
            await self._aggregate_batch(events)

    async def _aggregate_batch(self, events: Sequence[EventT]) -> None:
        """Stage 2 over a micro-batch of outcome messages, after any the consumer skipped (see :meth:`_admit`).

        Pairs and alerts first (a replay re-sends them with the same ids), then one journal entry per outcome
        partition (and :data:`AGGREGATE_CHUNK_BYTES` of its messages) with the view rows they wrote,
        acknowledged before those rows' own changelog records are sent and before this returns (Faust then
        acks the events and may commit their offsets): a kill at any moment leaves the counts either without
        a chunk's messages (replayed) or recoverable with them. One wait for each step, whatever the batch size.
        """
        start = time.perf_counter()
        before = _snapshot(self.aggregate.counters)
        entries = []
        counted: list[tuple[EventT, str, AggregateResult]] = []
        for partition, part_events in _by_partition(await self._admit(self.outcome_offsets, events)).items():
            for chunk in _chunks(part_events, AGGREGATE_CHUNK_BYTES):
                watermark = 0
                for event in chunk:
                    with _table_context(event):
                        category, result = await self._aggregate_message(event)
                    watermark = max(watermark, self.aggregate.watermark(category))
                    counted.append((event, category, result))
                changes, rows = detach_aggregate(self._stages)
                self._hold_views(rows)
                entries.append((chunk[-1], partition, watermark, changes, rows, _next_offsets(chunk)))
        await self._delivered("aggregate")
        for last_event, partition, watermark, changes, rows, offsets in entries:
            with _table_context(last_event):
                self.assigned.write(changes, partition, watermark, rows, offsets=offsets)
        await self._delivered("aggregate")
        for _, partition, _, _, rows, _ in entries:
            await self._send_views(partition, rows)
        metrics.LAST_BATCH.labels("aggregate").set_to_current_time()  # before the counts: a reader that sees them sees this
        _count_aggregate(before, self.aggregate.counters)
        for event, category, result in counted:
            groups = self.aggregate.grouper(category).groups(category)
            metrics.GROUPS.labels(category).set(len(groups))
            if self.feed is not None:
                with _table_context(event):
                    self._feed(self.feed.after_batch, category, result, groups)
        metrics.STAGE_SECONDS.labels("aggregate").observe(time.perf_counter() - start)

    async def _aggregate_message(self, event: EventT) -> tuple[str, AggregateResult]:
        """Count one outcome message (in its event's context) and send its pairs and alerts; returns its
        category and what it changed. Its state changes wait in the stores for the batch's journal entry."""
        category = event.key.decode()
        message = event.message
        self._next_offset[(message.topic, message.partition)] = message.offset + 1
        result = self.aggregate.apply(category, OutcomeBatch.from_bytes(event.value))
        deliveries = self.deliveries["aggregate"]
        for pair in result.pairs:
            deliveries.add("pairs", await self.pairs_topic.send(key=pair.group_id.encode(), value=message_bytes(pair)))
        for alert in result.alerts:
            deliveries.add("alerts", await self.drift_topic.send(key=alert.group_id.encode(), value=message_bytes(alert)))
        return category, result

    def _hold_views(self, rows: dict[str, dict[str, Any]]) -> None:
        """Put view rows taken for a journal entry into their tables' memory only, so the batch's next chunks
        read them; their changelog records wait for the entry (:meth:`_send_views`)."""
        for name, view_rows in rows.items():
            self._stages.views[name].table.data.update(view_rows)

    async def _send_views(self, partition: int, rows: dict[str, dict[str, Any]]) -> None:
        """Write view rows whose journal entry is durable into their tables, their changelog records handed
        straight to the producer (all view writes go this way, so they reach each partition in write order).

        A batch changes thousands of rows (``user-groups``: one per new user); Faust's table writes pass each
        through its producer buffer, a queue drained one record per hop of its own task, which then holds up
        the stream (``wait_until_ebb``). The records go to the same topics and partitions in the same order.
        """
        producer = self.app.producer
        deliveries = self.deliveries["aggregate"]
        for name, view_rows in rows.items():
            table = self._stages.views[name].table
            topic = table.changelog_topic
            topic_name = topic.get_topic_name()
            for key, value in view_rows.items():
                table.data[key] = value  # again: a recovery meanwhile may have reloaded the older durable rows
                key_bytes, _ = topic.prepare_key(key, table.key_serializer)
                value_bytes, _ = topic.prepare_value(value, table.value_serializer)
                deliveries.add(table.name, await producer.send(topic_name, key_bytes, value_bytes, partition, None, None))

    async def _delivered(self, stage: str) -> None:
        """Wait until the broker acknowledged everything ``stage`` sent so far (timed as its delivery wait)."""
        start = time.perf_counter()
        await self.deliveries[stage].wait()
        metrics.DELIVERY_WAIT.labels(stage).observe(time.perf_counter() - start)

    def _feed(self, step: Any, *args: Any) -> None:
        """Run one feature-feed step; a failure is logged and counted, never raised into the stream."""
        start = time.perf_counter()
        try:
            step(*args)
        except Exception:  # noqa: BLE001 - features must never stop the stream
            metrics.FEATURE_FEED_ERRORS.inc()
            log.exception("building feature rows failed; the stream goes on")
        metrics.FEATURE_SUBMIT_SECONDS.observe(time.perf_counter() - start)

    async def _report_lag(self) -> None:
        consumer = self.app.consumer
        inputs = {self.settings.topics.impressions, self.settings.topics.clicks, self.outcomes_topic.get_topic_name()}
        for tp in consumer.assignment():
            if tp.topic not in inputs:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = self._next_offset.get((tp.topic, tp.partition), 0)
            metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))


class Deliveries:
    """Messages one stage sent (its tables' changelog records, its topic messages), kept until acknowledged.

    ``app.producer.flush()`` is no delivery barrier for table writes: they go through Faust's producer
    buffer, whose flush gives up after 0.1 s without progress and does not count the record its sender
    task is handing to aiokafka at that moment (e.g. waiting for the partition's previous batch), so a
    journal entry written just before it can still be unsent when it returns. :meth:`wait` awaits each
    message's own future, which resolves only on the broker's acknowledgement (Faust's buffer hands its
    records to aiokafka on its own task), and only this stage's: one stage never waits for the other's traffic.
    """

    def __init__(self) -> None:
        self._sent: list[tuple[str, asyncio.Future]] = []

    def add(self, name: str, sent: Any) -> None:
        """Track one message (a changelog record of table ``name``, or a message of topic kind ``name``)."""
        self._sent.append((name, sent))

    def undelivered(self, names: set[str] | None = None) -> int:
        """Messages (of ``names``, or of all) sent and not yet acknowledged."""
        return sum(not sent.done() for name, sent in self._sent if names is None or name in names)

    async def wait(self) -> None:
        """Wait until every message tracked so far is acknowledged (raises the first send error)."""
        pending = [sent for _, sent in self._sent if not sent.done()]
        if pending:
            await asyncio.gather(*pending)
        for _, sent in self._sent:
            sent.result()  # a send that failed before this wait raises here too
        self._sent = []


class TrackedTable(faust.Table):
    """A Faust table whose changelog records are tracked by :class:`Deliveries` (when given one)."""

    deliveries: Deliveries | None = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        sent = super().send_changelog(*args, **kwargs)
        if self.deliveries is not None:
            self.deliveries.add(self.name, sent)
        return sent


def _changelog_writer(table: faust.Table) -> Any:
    """Rows into a Faust table and its changelog partition, outside any event's context (also at recovery)."""

    def write(partition: int, rows: dict[str, Any]) -> None:
        for key, value in rows.items():
            table.data[key] = value
            table.send_changelog(partition, key, value)

    return write


class PushMetrics:
    """The feature pusher's hooks as Prometheus metrics (:mod:`streams.metrics`)."""

    def pushed(self, view: str, rows: int, seconds: float, oldest_wait_s: float) -> None:
        metrics.FEATURE_ROWS_PUSHED.labels(view).inc(rows)
        metrics.FEATURE_PUSH_SECONDS.labels(view).observe(seconds)
        metrics.FEATURE_PUSH_DELAY.labels(view).observe(oldest_wait_s)

    def retried(self, view: str, error: BaseException) -> None:
        metrics.FEATURE_PUSH_RETRIES.labels(view).inc()

    def failed(self, view: str, rows: int, error: BaseException) -> None:
        metrics.FEATURE_PUSH_FAILURES.labels(view).inc()

    def dropped(self, view: str, rows: int, reason: str) -> None:
        metrics.FEATURE_ROWS_DROPPED.labels(view, reason).inc(rows)

    def queued(self, rows: int) -> None:
        metrics.FEATURE_QUEUE.set(rows)


@contextmanager
def _table_context(event: EventT) -> Iterator[None]:
    """Make ``event`` the current event for table writes in this task.

    ``take_events()`` hands over a whole micro-batch, outside Faust's per-event
    context; tables read that context to pick the changelog partition of a
    write, so it is set to an event of the partition being processed.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def _event_of(app: faust.App, record: Any) -> EventT:
    """A Faust event for a record read past Faust's consumer (not acked: Faust did not deliver it)."""
    timestamp = record.timestamp / 1000.0 if record.timestamp is not None else time.time()
    message = Message(record.topic, record.partition, record.offset, timestamp, record.timestamp_type or 0,
                      list(record.headers or ()), record.key, record.value, None)
    return Event(app, record.key, record.value, {}, message)


def _by_partition(events: Sequence[EventT]) -> dict[int, list[EventT]]:
    """``events`` grouped by input partition, each group in its order."""
    groups: dict[int, list[EventT]] = defaultdict(list)
    for event in events:
        groups[event.message.partition].append(event)
    return groups


def _next_offsets(events: Sequence[EventT]) -> dict[str, int]:
    """``topic -> next offset`` after ``events`` (records of one partition, in order)."""
    return {event.message.topic: event.message.offset + 1 for event in events}


def _offsets_text(offsets: dict[tuple[str, int], int]) -> str:
    return ", ".join(f"{topic}[{partition}]={offset}" for (topic, partition), offset in sorted(offsets.items())) or "none"


def _chunks(events: Sequence[EventT], max_bytes: int) -> Iterator[Sequence[EventT]]:
    """Consecutive runs of ``events`` of at most ``max_bytes`` of values each (at least one event per run)."""
    start, size = 0, 0
    for i, event in enumerate(events):
        length = len(event.value or b"")
        if i > start and size + length > max_bytes:
            yield events[start:i]
            start, size = i, 0
        size += length
    if start < len(events):
        yield events[start:]


def _count_in(result: BatchResult, part_events: Sequence[EventT]) -> None:
    for event, count in zip(part_events, result.events_per_message):
        topic = event.message.topic
        metrics.MESSAGES_IN.labels(topic).inc()
        metrics.EVENTS_IN.labels(topic).inc(count)


def _snapshot(counters: Any) -> dict[str, int]:
    return dict(vars(counters))


def _count_ingest(before: dict[str, int], counters: Any) -> None:
    now = vars(counters)
    metrics.EVENTS_ACCEPTED.labels("impression").inc(now["impressions"] - before["impressions"])
    metrics.DUPLICATES.labels("ingest").inc(now["duplicates"] - before["duplicates"])
    for outcome, name in (("attributed", "clicks_attributed"), ("late", "clicks_late"),
                          ("orphan", "clicks_orphan"), ("repeat", "clicks_repeat")):
        metrics.CLICKS.labels(outcome).inc(now[name] - before[name])
    metrics.HELD_CLICKS.set(now["clicks_held"])


def _count_aggregate(before: dict[str, int], counters: Any) -> None:
    now = vars(counters)
    metrics.COUNTED.labels("impression").inc(now["impressions"] - before["impressions"])
    metrics.COUNTED.labels("click").inc(now["clicks"] - before["clicks"])
    metrics.DUPLICATES.labels("aggregate").inc(now["duplicates"] - before["duplicates"])
    metrics.PAIRS.inc(now["pairs"] - before["pairs"])
    metrics.DRIFT_ALERTS.inc(now["alerts"] - before["alerts"])
