"""Kafka client helpers every room uses: topics, reachability, produce, read back.

All functions are synchronous (they run aiokafka on a private event loop, in a
worker thread when the caller already runs one) and raise :class:`KafkaIOError`
with a one-line message naming the fix. They work against Tansu and against any
Kafka-protocol cluster.

Tansu quirk (docs/architecture.md §5): ListOffsets (``end_offsets()``) answers too low, so
:func:`consume_all` reads each partition up to the fetch high-watermark
(``consumer.highwater(tp)``) seen on the first fetch instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError as _ClientError
from aiokafka.errors import TopicAlreadyExistsError, for_code

from infra.settings import TopicSettings
from infra.security import client_options
from infra.contracts.events import Click, Impression, to_bytes

T = TypeVar("T")

#: How many sends may be in flight before their delivery results are checked.
_MAX_PENDING = 10_000


class KafkaIOError(RuntimeError):
    """Kafka could not be reached or did not accept/return data; the message names the fix."""


#: The name the CLI catches (not aiokafka's ``KafkaError``).
KafkaError = KafkaIOError


@dataclass(frozen=True)
class ConsumedRecord:
    """One record read back from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes  # a null value (tombstone) reads as b""


# --------------------------------------------------------------------------- reachability


def kafka_reachable(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a broker at ``bootstrap`` answers a Kafka metadata request within ``timeout_s``."""
    return _run(_reachable(bootstrap, timeout_s))


def wait_for_kafka(bootstrap: str, timeout_s: float) -> None:
    """Block until ``bootstrap`` answers a metadata request; raise :class:`KafkaIOError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if kafka_reachable(bootstrap, timeout_s=max(0.5, min(left, 5.0))):
            return
        if time.monotonic() >= deadline:
            raise KafkaIOError(
                f"no Kafka broker answered at {bootstrap} within {timeout_s:g}s; "
                "start one with `osmf broker start` or fix OSMF_KAFKA_BOOTSTRAP"
            )
        time.sleep(0.2)


async def _reachable(bootstrap: str, timeout_s: float) -> bool:
    # No asyncio.wait_for here: cancelling bootstrap() leaks its connection. Connect and the
    # metadata request are each bounded by request_timeout_ms instead.
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap, request_timeout_ms=max(100, int(timeout_s * 500)), **client_options()
    )
    try:
        with _quiet_connect_errors():
            await client.bootstrap()
        return True
    except (_ClientError, OSError, asyncio.TimeoutError):
        return False
    finally:
        await client.close()


class _DropConnectErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable connect to")


@contextlib.contextmanager
def _quiet_connect_errors() -> Iterator[None]:
    """Probing a broker that is not up yet is expected; keep aiokafka from logging it as an error."""
    log = logging.getLogger("aiokafka")
    flt = _DropConnectErrors()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


# --------------------------------------------------------------------------- topics


def ensure_topics(bootstrap: str, names: list[str], partitions: int) -> list[str]:
    """Create the topics of ``names`` that do not exist yet (``partitions`` each); return those created."""
    return _run(_ensure_topics(bootstrap, list(dict.fromkeys(names)), partitions))


async def _ensure_topics(bootstrap: str, names: list[str], partitions: int) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **client_options())
    try:
        with _quiet_connect_errors():
            await admin.start()
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(name=n, num_partitions=partitions, replication_factor=1) for n in missing]
        )
    except _ClientError as exc:
        raise KafkaIOError(f"cannot create topics at {bootstrap}: {exc}; check the broker with `osmf broker status`") from None
    finally:
        await admin.close()
    created = []
    for topic, code, *rest in response.topic_errors:
        err = for_code(code)
        if code == 0:
            created.append(topic)
        elif err is not TopicAlreadyExistsError:  # lost a race with another creator: fine
            message = rest[0] if rest and rest[0] else err.__name__
            raise KafkaIOError(f"cannot create topic {topic!r} at {bootstrap}: {message}; fix the name or broker settings")
    return [n for n in missing if n in created]


# --------------------------------------------------------------------------- produce


def produce_events(
    bootstrap: str,
    events: Iterable[Impression | Click],
    topics: TopicSettings,
    rate: float | None = None,
) -> int:
    """Send events (impressions to ``topics.impressions``, clicks to ``topics.clicks``), keyed by user id.

    ``rate`` (events/s) paces sending; ``None`` sends as fast as possible.
    Returns how many were sent, after all were acknowledged; raises
    :class:`KafkaIOError` if any delivery failed.
    """
    items = (
        (topics.impressions if isinstance(e, Impression) else topics.clicks, e.user_id.encode(), to_bytes(e))
        for e in events
    )
    return _run(_produce(bootstrap, items, rate))


def produce_raw(bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Send ``(key, value)`` byte pairs to ``topic`` unchanged (e.g. malformed events); return how many."""
    return _run(_produce(bootstrap, ((topic, key, value) for key, value in items), None))


async def _produce(bootstrap: str, items: Iterable[tuple[str, bytes | None, bytes]], rate: float | None) -> int:
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 events/s or None (got {rate})")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
        request_timeout_ms=30_000,
        **client_options(),
    )
    sent = 0
    try:
        with _quiet_connect_errors():
            await producer.start()
        pending: list[Awaitable[Any]] = []
        start = time.monotonic()
        for topic, key, value in items:
            if rate is not None:
                delay = start + sent / rate - time.monotonic()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            pending.append(await producer.send(topic, value=value, key=key))
            sent += 1
            if len(pending) >= _MAX_PENDING:
                await asyncio.gather(*pending)
                pending.clear()
        await producer.flush()
        await asyncio.gather(*pending)
    except _ClientError as exc:
        raise KafkaIOError(
            f"producing to {bootstrap} failed after {sent} events: {exc}; check the broker with `osmf broker status`"
        ) from None
    finally:
        await producer.stop()
    return sent


# --------------------------------------------------------------------------- consume


def consume_all(bootstrap: str, topics: list[str], timeout_s: float = 30) -> list[ConsumedRecord]:
    """Read every record of ``topics`` from offset 0 up to each partition's high-watermark.

    The end is fixed at the first fetch of each partition (records produced
    later may be left out). Topics that do not exist yield nothing. No consumer
    group is used. Records come back ordered by topic (as given), partition,
    offset. Raises :class:`KafkaIOError` when the end is not reached within
    ``timeout_s``.
    """
    return _run(_consume_all(bootstrap, list(dict.fromkeys(topics)), timeout_s))


def _reader(bootstrap: str) -> AIOKafkaConsumer:
    """A consumer outside any group, from the earliest offset, with large fetches (for reading topics whole)."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        **client_options(),
    )


async def _consume_all(bootstrap: str, topics: list[str], timeout_s: float) -> list[ConsumedRecord]:
    consumer = _reader(bootstrap)
    records: dict[TopicPartition, list[ConsumedRecord]] = {}
    try:
        with _quiet_connect_errors():
            await consumer.start()
        existing = await consumer.topics()
        tps = [
            TopicPartition(t, p)
            for t in topics
            if t in existing
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = {tp: [] for tp in tps}
        ends: dict[TopicPartition, int] = {}
        open_tps = set(tps)
        deadline = time.monotonic() + timeout_s
        while open_tps:
            if time.monotonic() > deadline:
                got = sum(len(r) for r in records.values())
                raise KafkaIOError(
                    f"read {got} records of {topics} from {bootstrap} but {len(open_tps)} partition(s) "
                    f"did not reach their end within {timeout_s:g}s; raise timeout_s or check the broker"
                )
            batch = await consumer.getmany(timeout_ms=200)
            for tp, recs in batch.items():
                records[tp].extend(
                    ConsumedRecord(r.topic, r.partition, r.offset, r.key, r.value or b"") for r in recs
                )
            for tp in list(open_tps):
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                end = ends.setdefault(tp, highwater)
                if await consumer.position(tp) >= end:
                    open_tps.discard(tp)
                    consumer.pause(tp)
    except _ClientError as exc:
        raise KafkaIOError(f"reading {topics} from {bootstrap} failed: {exc}; check the broker with `osmf broker status`") from None
    finally:
        await consumer.stop()
    order = sorted(records, key=lambda tp: (topics.index(tp.topic), tp.partition))
    return [r for tp in order for r in records[tp] if r.offset < ends[tp]]


# --------------------------------------------------------------------------- follow


class TopicFollower:
    """Read topics from their earliest offset onwards and keep following them (synchronous, no consumer group).

    Every partition of ``topics`` that exists at start is read from offset 0;
    :meth:`poll` returns the records that arrived since the last call and
    :attr:`caught_up` turns True once each partition has reached the
    high-watermark of its first fetch (what the topic held at start; the same
    Tansu-safe end as :func:`consume_all`). Partitions added later are not
    followed. aiokafka runs on a private event loop in a daemon thread, so the
    caller may block (e.g. train a model) while records keep being fetched.
    Use it as a context manager, or call :meth:`close`.

    Raises :class:`KafkaIOError` when the broker cannot be reached, a topic is
    missing, or a fetch fails.
    """

    def __init__(self, bootstrap: str, topics: list[str], timeout_s: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.topics = list(dict.fromkeys(topics))
        self.caught_up = False
        self._ends: dict[TopicPartition, int] = {}
        self._done: set[TopicPartition] = set()
        self._tps: list[TopicPartition] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="osmf-topic-follower", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(), timeout_s)
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_s: float = 1.0, max_records: int = 10_000) -> list[ConsumedRecord]:
        """Records fetched since the last call (at most ``max_records``), waiting up to ``timeout_s`` for some."""
        return self._call(self._poll(timeout_s, max_records), timeout_s + 30.0)

    def close(self) -> None:
        """Stop the consumer and its event loop (idempotent)."""
        if self._loop.is_closed():
            return
        if self._consumer is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._consumer.stop(), self._loop).result(10)
        self._consumer = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TopicFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise KafkaIOError(
                f"no answer from {self.bootstrap} within {timeout_s:g}s while reading {self.topics}; "
                "check the broker with `osmf broker status`"
            ) from None

    async def _start(self) -> None:
        consumer = _reader(self.bootstrap)
        try:
            with _quiet_connect_errors():
                await consumer.start()
            existing = await consumer.topics()
        except _ClientError as exc:
            await consumer.stop()
            raise KafkaIOError(
                f"cannot read {self.topics} from {self.bootstrap}: {exc}; start a broker with `osmf broker start` "
                "or fix OSMF_KAFKA_BOOTSTRAP"
            ) from None
        missing = [t for t in self.topics if t not in existing]
        if missing:
            await consumer.stop()
            raise KafkaIOError(
                f"topic(s) {', '.join(missing)} do not exist at {self.bootstrap}; create them with "
                "`osmf broker start` (it creates the product's topics) or fix the topic settings"
            )
        self._tps = [TopicPartition(t, p) for t in self.topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(self._tps)
        await consumer.seek_to_beginning(*self._tps)
        self._consumer = consumer
        self.caught_up = not self._tps

    async def _poll(self, timeout_s: float, max_records: int) -> list[ConsumedRecord]:
        consumer = self._consumer
        if consumer is None:
            raise KafkaIOError("this TopicFollower is closed; make a new one")
        try:
            batch = await consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max_records)
            records = [
                ConsumedRecord(r.topic, r.partition, r.offset, r.key, r.value or b"")
                for tp in sorted(batch, key=lambda tp: (self.topics.index(tp.topic), tp.partition))
                for r in batch[tp]
            ]
            if not self.caught_up:
                for tp in self._tps:
                    if tp in self._done:
                        continue
                    highwater = consumer.highwater(tp)
                    if highwater is None:
                        continue
                    if await consumer.position(tp) >= self._ends.setdefault(tp, highwater):
                        self._done.add(tp)
                self.caught_up = len(self._done) == len(self._tps)
        except _ClientError as exc:
            raise KafkaIOError(
                f"reading {self.topics} from {self.bootstrap} failed: {exc}; check the broker with `osmf broker status`"
            ) from None
        return records


# --------------------------------------------------------------------------- running coroutines


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, also when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
