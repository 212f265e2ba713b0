"""Sending impressions and clicks the way the worker reads them fastest: many events per Kafka message.

Events are routed like any Kafka producer would route them one by one
(impressions to ``topics.impressions``, clicks to ``topics.clicks``; the
partition is Kafka's default partitioner hash of the user id, murmur2 as in
the Java client and kafka-python), then collected per (topic, partition) and
sent as one batch message (``infra.contracts.events.encode_batch``) once
``batch_events`` events or ``batch_bytes`` bytes wait, or the oldest has waited
``linger_ms``. A user's events therefore land on the same partition whether
they come batched from here or one per message from a plain producer, and the
worker's per-user state stays co-partitioned.

* :class:`BatchingProducer`: async, for code that runs an event loop;
* :class:`EventProducer`: the same from synchronous code (an ad server), on a
  private event loop thread;
* :func:`produce`: send an iterable of events, optionally paced (the CLI's
  ``simulate`` and ``replay``).

Delivery failures raise :class:`infra.kafka.KafkaIOError` from ``flush``/``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError as _ClientError
from aiokafka.partitioner import murmur2

from infra.contracts.events import Click, Impression, encode_batch, to_bytes
from infra.kafka import KafkaIOError, _quiet_connect_errors, _run, produce_events
from infra.settings import ProducerSettings, TopicSettings
from infra.security import client_options

_BATCH_OVERHEAD = 48
"""Bytes of a batch message around its events (envelope and commas, rounded up)."""
_MAX_IN_FLIGHT = 2_000
"""Messages sent but not yet acknowledged before ``send`` waits for acknowledgements."""


def partition_for(user_id: str, partitions: int) -> int:
    """Kafka's default partition of the key ``user_id`` (murmur2, positive, modulo ``partitions``)."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


@dataclass
class _Buffer:
    events: list[bytes] = field(default_factory=list)
    size: int = _BATCH_OVERHEAD
    timer: asyncio.TimerHandle | None = None


class BatchingProducer:
    """Async producer of batched event messages (one batch per topic and partition at a time).

    Use ``async with BatchingProducer(...) as producer: await producer.send(event)``;
    leaving the block sends what waits and waits for every acknowledgement.
    """

    def __init__(self, bootstrap: str, topics: TopicSettings, config: ProducerSettings) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.config = config
        self.events_sent = 0
        self.messages_sent = 0
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._outbox: asyncio.Queue[tuple[str, int, bytes, int]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._acks: list[Awaitable[Any]] = []
        self._error: BaseException | None = None

    async def __aenter__(self) -> BatchingProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(flush=exc[0] is None)

    async def start(self) -> None:
        """Connect and learn the partition count of both event topics."""
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
            max_batch_size=max(self.config.batch_bytes * 2, 512 * 1024),
            max_request_size=max(self.config.batch_bytes * 2, 1024 * 1024), request_timeout_ms=30_000,
            **client_options(),
        )
        try:
            with _quiet_connect_errors():
                await self._producer.start()
            for topic in (self.topics.impressions, self.topics.clicks):
                self._partitions[topic] = len(await self._producer.partitions_for(topic))
        except _ClientError as exc:
            await self._producer.stop()
            raise KafkaIOError(
                f"cannot produce to {self.bootstrap}: {exc}; start a broker with `osmf broker start` "
                "or fix OSMF_KAFKA_BOOTSTRAP"
            ) from None
        self._outbox = asyncio.Queue()
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    def add(self, event: Impression | Click) -> None:
        """Queue one event (no waiting); its batch goes out when full or after ``linger_ms``."""
        topic = self.topics.impressions if isinstance(event, Impression) else self.topics.clicks
        self.add_raw(topic, partition_for(event.user_id, self._partitions[topic]), to_bytes(event))

    def add_raw(self, topic: str, partition: int, raw: bytes) -> None:
        """Queue one event already in wire form for ``topic[partition]``."""
        if self._error is not None:
            raise KafkaIOError(f"producing to {self.bootstrap} failed: {self._error}; check `osmf broker status`")
        key = (topic, partition)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _Buffer()
        elif buffer.size + len(raw) + 1 > self.config.batch_bytes:
            self._ship(key)
            buffer = self._buffers[key] = _Buffer()
        buffer.events.append(raw)
        buffer.size += len(raw) + 1
        if len(buffer.events) >= self.config.batch_events:
            self._ship(key)
        elif buffer.timer is None:
            buffer.timer = asyncio.get_running_loop().call_later(self.config.linger_ms / 1000, self._ship, key)

    async def send(self, event: Impression | Click) -> None:
        """:meth:`add`, then wait while too many messages are unacknowledged."""
        self.add(event)
        if self._outbox is not None and self._outbox.qsize():
            await self._outbox.join()  # aiokafka takes them (and waits when its buffers are full)
        if len(self._acks) > _MAX_IN_FLIGHT:
            await self._drain()

    async def flush(self) -> None:
        """Send every waiting batch and wait until all sent messages are acknowledged."""
        for key in list(self._buffers):
            self._ship(key)
        await self._drain()

    async def stop(self, flush: bool = True) -> None:
        """Flush (unless ``flush`` is False) and close the connection."""
        try:
            if flush and self._producer is not None:
                await self.flush()
        finally:
            if self._sender is not None:
                self._sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sender
            if self._producer is not None:
                await self._producer.stop()
            self._producer = None

    def _ship(self, key: tuple[str, int]) -> None:
        buffer = self._buffers.pop(key, None)
        if buffer is None or not buffer.events:
            return
        if buffer.timer is not None:
            buffer.timer.cancel()
        value = buffer.events[0] if len(buffer.events) == 1 else encode_batch(buffer.events)
        assert self._outbox is not None, "BatchingProducer used before start()"
        self._outbox.put_nowait((key[0], key[1], value, len(buffer.events)))

    async def _send_loop(self) -> None:
        """Hand messages to aiokafka one by one, so each partition's messages keep their order."""
        assert self._outbox is not None and self._producer is not None
        while True:
            topic, partition, value, count = await self._outbox.get()
            try:
                self._acks.append(await self._producer.send(topic, value=value, partition=partition))
                self.events_sent += count
                self.messages_sent += 1
            except _ClientError as exc:
                self._error = exc  # raised by the next add, send or flush
            finally:
                self._outbox.task_done()

    async def _drain(self) -> None:
        assert self._outbox is not None
        await self._outbox.join()
        acks, self._acks = self._acks, []
        try:
            await asyncio.gather(*acks)
        except _ClientError as exc:
            self._error = exc
        if self._error is not None:
            raise KafkaIOError(
                f"producing to {self.bootstrap} failed after {self.events_sent} events: {self._error}; "
                "check the broker with `osmf broker status`"
            ) from None


class EventProducer:
    """:class:`BatchingProducer` for synchronous code: ``send`` returns at once, ``flush`` waits for acks.

    >>> # with EventProducer(settings.bootstrap_servers, settings.topics, settings.producer) as out:
    >>> #     out.send(impression)
    """

    def __init__(
        self, bootstrap: str, topics: TopicSettings, config: ProducerSettings, timeout_s: float = 30.0
    ) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="osmf-event-producer", daemon=True)
        self._thread.start()
        self._core = BatchingProducer(bootstrap, topics, config)
        self._queued = 0
        try:
            self._call(self._core.start())
        except BaseException:
            self._stop_loop()
            raise

    def send(self, event: Impression | Click) -> None:
        """Queue ``event``; blocks only when many messages wait for acknowledgement."""
        self._queued += 1
        self._loop.call_soon_threadsafe(self._core.add, event)
        if self._queued >= _MAX_IN_FLIGHT * 10:
            self.flush()

    def flush(self) -> None:
        """Send everything queued and wait for its acknowledgement."""
        self._call(self._core.flush())
        self._queued = 0

    def close(self) -> None:
        """Flush and disconnect (idempotent)."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._core.stop())
        finally:
            self._stop_loop()

    @property
    def events_sent(self) -> int:
        return self._core.events_sent

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise KafkaIOError(f"no acknowledgement within {self.timeout_s:g}s; check the broker with "
                               "`osmf broker status`") from None

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


def produce(
    bootstrap: str,
    events: Iterable[Impression | Click],
    topics: TopicSettings,
    config: ProducerSettings,
    rate: float | None = None,
) -> int:
    """Send ``events`` batched per ``config`` (or one per message when ``config.batch`` is off).

    ``rate`` (events/s) paces them; returns how many were sent once all are acknowledged.
    """
    if not config.batch:
        return produce_events(bootstrap, events, topics, rate=rate)
    return _run(_produce_batched(bootstrap, events, topics, config, rate))


async def _produce_batched(
    bootstrap: str, events: Iterable[Impression | Click], topics: TopicSettings, config: ProducerSettings,
    rate: float | None,
) -> int:
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 events/s or None (got {rate})")
    count = 0
    async with BatchingProducer(bootstrap, topics, config) as producer:
        start = time.monotonic()
        for event in events:
            if rate is not None:
                delay = start + count / rate - time.monotonic()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            await producer.send(event)
            count += 1
    return count
