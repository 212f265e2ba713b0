"""Batched event messages against the real broker and worker: exact counts for batched and mixed topics,
malformed events inside batches, undecodable batches, every event delivered twice."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from kafka.partitioner.default import murmur2 as java_murmur2

from helpers.worker_harness import WorkerRun, expected_counts, isolated_run, table_counts
from infra.contracts.events import Impression, decode_message, encode_batch, to_bytes
from infra.contracts.messages import parse_dead_letter
from infra.kafka import consume_all, produce_events, produce_raw
from infra.producer import BatchingProducer, EventProducer, partition_for, produce
from infra.settings import ProducerSettings
from sim.simulate import generate_events
from sim.world import World

WORLD_A = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml"
START_TS = 1_767_225_600_000
CHUNK_EVENTS = 1_000
"""Events per paced chunk of the rebalance test's traffic (about 0.5 s apart)."""
BATCHED = ProducerSettings(batch=True, linger_ms=50, batch_events=200, batch_bytes=64 * 1024)


@pytest.fixture(scope="module")
def world() -> World:
    return World.load(WORLD_A)


@pytest.fixture
def run(broker_settings, tmp_path: Path):
    pipeline = isolated_run(broker_settings, tmp_path)
    yield pipeline
    pipeline.stop()


def _assert_exact(pipeline: WorkerRun, expected) -> None:
    def match() -> bool:
        impressions, clicks = table_counts(pipeline.table("ctr"))
        return impressions == expected.impressions and clicks == expected.clicks

    pipeline.wait_for(match, what="CTR tables to match the event log")
    impressions, clicks = table_counts(pipeline.table("ctr"))
    assert impressions == expected.impressions
    assert clicks == expected.clicks


def _messages(pipeline: WorkerRun) -> list:
    topics = pipeline.settings.topics
    return consume_all(pipeline.settings.bootstrap_servers, [topics.impressions, topics.clicks])


@pytest.mark.parametrize("user", ["u1", "user-42", "", "ü", "x" * 100])
def test_partition_is_kafkas_default_murmur2(user: str) -> None:
    for partitions in (1, 4, 7, 12):
        assert partition_for(user, partitions) == (java_murmur2(user.encode()) & 0x7FFFFFFF) % partitions


def test_batched_events_land_where_a_plain_keyed_producer_puts_them(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=11, n_impressions=300, start_ts_ms=START_TS))
    produce(run.settings.bootstrap_servers, events, run.settings.topics, BATCHED)
    plain = {e.event_id: e for e in events}
    batched_at: dict[str, int] = {}
    records = _messages(run)
    for record in records:
        for event in decode_message(record.value):
            batched_at[event.event_id] = record.partition
    assert set(batched_at) == set(plain)
    assert len(records) < len(events) / 5, "events were not batched"

    async def keyed_partitions() -> dict[str, int]:
        producer = AIOKafkaProducer(bootstrap_servers=run.settings.bootstrap_servers)
        await producer.start()
        try:
            out = {}
            for event in events[:100]:
                topic = run.settings.topics.impressions if isinstance(event, Impression) else run.settings.topics.clicks
                meta = await producer.send_and_wait(topic, value=to_bytes(event), key=event.user_id.encode())
                out[event.event_id] = meta.partition
            return out
        finally:
            await producer.stop()

    for event_id, partition in asyncio.run(keyed_partitions()).items():
        assert batched_at[event_id] == partition


def test_batched_counts_equal_the_log_even_when_every_event_is_delivered_twice(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=12, n_impressions=3000, start_ts_ms=START_TS))
    run.start()
    produce(run.settings.bootstrap_servers, events, run.settings.topics, BATCHED)
    produce(run.settings.bootstrap_servers, events, run.settings.topics, BATCHED)  # every event again
    _assert_exact(run, expected_counts(events))
    assert len(_messages(run)) < len(events) / 5, "events were not batched"


def test_mixed_single_and_batched_messages_count_exactly(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=13, n_impressions=3000, start_ts_ms=START_TS))
    half = len(events) // 2
    run.start()
    produce_events(run.settings.bootstrap_servers, events[:half], run.settings.topics)  # plain producer
    with EventProducer(run.settings.bootstrap_servers, run.settings.topics, BATCHED) as producer:
        for event in events[half:]:
            producer.send(event)
    # and every event again, the other way round
    produce(run.settings.bootstrap_servers, events[:half], run.settings.topics, BATCHED)
    produce_events(run.settings.bootstrap_servers, events[half:], run.settings.topics)
    _assert_exact(run, expected_counts(events))
    values = [r.value for r in _messages(run)]
    assert any(v.startswith(b'{"schema":2,"type":"batch"') for v in values)
    assert sum(1 for v in values if len(decode_message(v)) == 1) >= len(events)


def _bad_elements(rng: random.Random, count: int) -> list[bytes]:
    """Valid JSON, invalid events (a batch that holds them still decodes)."""
    good = json.loads(to_bytes(Impression(
        event_id="x", ts=1, user_id="u-bad", user={}, product_id="p", category="lipstick", product={},
        creative_id="c", prompt=None, model_version="m", placement="feed",
    )))
    makers = [
        lambda i: json.dumps({**good, "event_id": f"bad-{i}", "ts": "yesterday"}),
        lambda i: json.dumps({**good, "event_id": f"bad-{i}", "type": "view"}),
        lambda i: json.dumps({**good, "event_id": f"bad-{i}", "schema": 9}),
        lambda i: json.dumps({k: v for k, v in good.items() if k != "user_id"} | {"event_id": f"bad-{i}"}),
        lambda i: json.dumps({**good, "event_id": f"bad-{i}", "user": {"bio": "x" * 20_000}}),
        lambda i: json.dumps([1, 2, 3]),
    ]
    return [makers[i % len(makers)](i).encode() for i in range(count)]


async def _send_with_bad_elements(settings, events: list, bad: list[bytes], rng: random.Random) -> None:
    """Batch ``events`` per partition with the ``bad`` elements mixed into random batches."""
    async with BatchingProducer(settings.bootstrap_servers, settings.topics, BATCHED) as producer:
        pending = list(bad)
        for event in events:
            producer.add(event)
            if pending and rng.random() < 0.1:
                producer.add_raw(settings.topics.impressions, rng.randrange(settings.topics.partitions), pending.pop())
        for raw in pending:
            producer.add_raw(settings.topics.impressions, rng.randrange(settings.topics.partitions), raw)
        assert producer.messages_sent < len(events) / 5


def test_malformed_events_inside_batches_go_to_dead_letter_alone_and_the_rest_counts(
    run: WorkerRun, world: World
) -> None:
    events = list(generate_events(world, seed=14, n_impressions=2000, start_ts_ms=START_TS))
    rng = random.Random(1)
    bad = _bad_elements(rng, 120)
    impressions = [to_bytes(e) for e in events if isinstance(e, Impression)]
    broken = [  # undecodable batches (of events that also arrive intact): dead-lettered whole
        encode_batch(impressions[:50])[:-7],
        b'{"schema":1,"type":"batch","events":[' + b",".join(impressions[50:60]) + b"]}",
        b'{"schema":2,"type":"batch","events":"all of them"}',
    ]
    settings = run.settings
    run.start()
    for _ in range(2):  # every message delivered twice
        asyncio.run(_send_with_bad_elements(settings, events, bad, rng))
        produce_raw(settings.bootstrap_servers, settings.topics.impressions, [(b"u-broken", b) for b in broken])
    _assert_exact(run, expected_counts(events))
    n_letters = 2 * (len(bad) + len(broken))
    run.wait_for(
        lambda: len(consume_all(settings.bootstrap_servers, [settings.topics.dead_letter])) >= n_letters,
        what=f"{n_letters} dead letters",
    )
    records = consume_all(settings.bootstrap_servers, [settings.topics.dead_letter])
    letters = [parse_dead_letter(r.value) for r in records]
    assert len(letters) == n_letters
    in_batch = [x for x in letters if "of the batch message" in x.reason]
    whole = [x for x in letters if "of the batch message" not in x.reason]
    assert len(in_batch) == 2 * len(bad) and len(whole) == 2 * len(broken)
    assert {x.field for x in in_batch} >= {"ts", "type", "schema", "user_id", "<event>"}
    assert {x.field for x in whole} == {"<event>", "schema", "events"}
    assert all(x.source_topic == settings.topics.impressions and x.reason for x in letters)


def test_batches_respect_the_event_and_byte_limits(broker_settings, tmp_path: Path, world: World) -> None:
    pipeline = isolated_run(broker_settings, tmp_path)
    events = list(generate_events(world, seed=15, n_impressions=1500, start_ts_ms=START_TS))
    limits = ProducerSettings(batch=True, linger_ms=1000, batch_events=100, batch_bytes=16 * 1024)
    sent = produce(pipeline.settings.bootstrap_servers, events, pipeline.settings.topics, limits)
    records = _messages(pipeline)
    decoded = [decode_message(r.value) for r in records]
    assert sent == len(events) == sum(len(d) for d in decoded)
    assert max(len(d) for d in decoded) <= 100
    assert max(len(r.value) for r in records) <= 16 * 1024
    assert sorted(e.event_id for d in decoded for e in d) == sorted(e.event_id for e in events)


def test_linger_sends_a_partial_batch_without_flush(broker_settings, tmp_path: Path, world: World) -> None:
    pipeline = isolated_run(broker_settings, tmp_path)
    events = list(generate_events(world, seed=16, n_impressions=3, start_ts_ms=START_TS))
    config = ProducerSettings(batch=True, linger_ms=20, batch_events=10_000, batch_bytes=1024 * 1024)
    producer = EventProducer(pipeline.settings.bootstrap_servers, pipeline.settings.topics, config)
    try:
        for event in events:
            producer.send(event)
        pipeline.wait_for(lambda: sum(len(decode_message(r.value)) for r in _messages(pipeline)) == len(events),
                          timeout_s=30, what="the lingering batch to be sent")
    finally:
        producer.close()


def test_a_worker_joining_and_leaving_mid_stream_loses_and_double_counts_nothing(
    run: WorkerRun, world: World
) -> None:
    """Two rebalances while batched traffic flows: a second worker joins, takes partitions and handles
    input batches, then leaves; the tables still equal the log (nothing lost, nothing counted twice).

    Traffic goes on in chunks until the second worker has left, then for three more, so both rebalances
    fall inside it however long the workers take to start."""
    from bench.streams import _progress

    events = list(generate_events(world, seed=14, n_impressions=60_000, start_ts_ms=START_TS))
    chunks = [events[i : i + CHUNK_EVENTS] for i in range(0, len(events), CHUNK_EVENTS)]
    produced = [0]  # events sent so far (a prefix of ``events``)
    left = threading.Event()
    failure: list[BaseException] = []

    def produce_until_left() -> None:
        try:
            after_left = 0
            for chunk in chunks:
                produce(run.settings.bootstrap_servers, chunk, run.settings.topics, BATCHED)
                produced[0] += len(chunk)
                after_left += left.is_set()
                if after_left == 3:
                    return
                time.sleep(0.5)
            raise AssertionError(f"all {len(events)} events were sent before the second worker left")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failure.append(exc)

    run.start()
    producer = threading.Thread(target=produce_until_left, daemon=True)
    producer.start()
    run.wait_for(lambda: sum(table_counts(run.table("ctr"))[0].values()) > 0, what="the first worker to count")
    run.start(index=2)
    second_port = run.settings.streams.metrics_port + 1
    run.wait_for(lambda: _progress([second_port]).started > 0, what="the second worker to take input batches")
    run.stop_one(1)
    left.set()
    producer.join(timeout=300)
    assert not failure, failure
    assert not producer.is_alive(), "the producer did not finish"
    _assert_exact(run, expected_counts(events[: produced[0]]))
    assert "Traceback" not in run.log_tail(), run.log_tail()
