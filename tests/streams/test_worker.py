"""The stream worker against the real broker: exact counts, duplicates, dead letters, two workers."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import KafkaError

from sim.simulate import generate_events
from sim.world import World
from infra.contracts.events import Impression, to_bytes
from infra.kafka import consume_all, produce_events, produce_raw
from infra.contracts.messages import parse_dead_letter

from helpers.worker_harness import WorkerRun, expected_counts, isolated_run, table_counts
from infra.settings import Settings
from streams.aggregate import OutcomeBatch
from streams.stages import build_stages, collect_outcomes, ingest_partition

WORLD_A = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml"


@pytest.fixture(scope="module")
def world() -> World:
    return World.load(WORLD_A)


@pytest.fixture
def run(broker_settings, tmp_path: Path):
    pipeline = isolated_run(broker_settings, tmp_path)
    yield pipeline
    pipeline.stop()


def _counts_match(pipeline: WorkerRun, expected) -> bool:
    impressions, clicks = table_counts(pipeline.table("ctr"))
    return impressions == expected.impressions and clicks == expected.clicks


def _assert_exact(pipeline: WorkerRun, expected) -> None:
    pipeline.wait_for(lambda: _counts_match(pipeline, expected), what="CTR tables to match the event log")
    impressions, clicks = table_counts(pipeline.table("ctr"))
    assert impressions == expected.impressions
    assert clicks == expected.clicks


def test_counts_equal_the_log_even_when_every_event_is_delivered_twice(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=3, n_impressions=3000, start_ts_ms=1_767_225_600_000))
    expected = expected_counts(events)
    run.start()
    produce_events(run.settings.bootstrap_servers, events, run.settings.topics)
    produce_events(run.settings.bootstrap_servers, events, run.settings.topics)  # every event again
    _assert_exact(run, expected)
    groups = run.table("user-groups")
    users = {(e.category, e.user_id) for e in events if isinstance(e, Impression)}
    assert {tuple(k.split("|", 1)) for k in groups} == users
    assert all(g.startswith(k.split("|", 1)[0]) for k, g in groups.items())


def test_malformed_events_go_to_dead_letter_and_good_ones_count_exactly(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=4, n_impressions=2000, start_ts_ms=1_767_225_600_000))
    expected = expected_counts(events)
    rng = random.Random(0)
    bad_values = _malformed(rng, 1000)
    items = [(e.user_id.encode(), to_bytes(e)) for e in events if isinstance(e, Impression)]
    mixed: list[tuple[bytes, bytes]] = []
    for good in items:
        mixed.append(good)
        if bad_values and rng.random() < 0.5:
            mixed.append((b"u-bad", bad_values.pop()))
    mixed.extend((b"u-bad", v) for v in bad_values)
    run.start()
    produce_raw(run.settings.bootstrap_servers, run.settings.topics.impressions, mixed)
    clicks = [e for e in events if not isinstance(e, Impression)]
    produce_events(run.settings.bootstrap_servers, clicks, run.settings.topics)
    _assert_exact(run, expected)
    run.wait_for(
        lambda: len(consume_all(run.settings.bootstrap_servers, [run.settings.topics.dead_letter])) >= 1000,
        what="1000 dead letters",
    )
    letters = [parse_dead_letter(r.value) for r in consume_all(run.settings.bootstrap_servers, [run.settings.topics.dead_letter])]
    assert len(letters) == 1000
    assert all(letter.reason and letter.source_topic == run.settings.topics.impressions for letter in letters)
    fields = {letter.field for letter in letters}
    assert {"<event>", "ts", "type", "schema"} <= fields


def test_two_workers_split_partitions_and_totals_stay_exact(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=5, n_impressions=4000, start_ts_ms=1_767_225_600_000))
    expected = expected_counts(events)
    run.start(workers=2)
    produce_events(run.settings.bootstrap_servers, events, run.settings.topics)
    _assert_exact(run, expected)
    logs = run.log_tail()
    assert "Traceback" not in logs, logs


def _malformed(rng: random.Random, count: int) -> list[bytes]:
    good = json.loads(
        to_bytes(
            Impression(
                event_id="x", ts=1, user_id="u-bad", user={}, product_id="p", category="lipstick", product={},
                creative_id="c", prompt=None, model_version="m", placement="feed",
            )
        )
    )
    makers = [
        lambda i: b"{not json",
        lambda i: json.dumps({**good, "event_id": f"bad-{i}", "ts": "yesterday"}).encode(),
        lambda i: json.dumps({**good, "event_id": f"bad-{i}", "type": "view"}).encode(),
        lambda i: json.dumps({**good, "event_id": f"bad-{i}", "schema": 9}).encode(),
        lambda i: json.dumps({k: v for k, v in good.items() if k != "user_id"} | {"event_id": f"bad-{i}"}).encode(),
        lambda i: b"x" * 20_000,
    ]
    return [makers[i % len(makers)](i) for i in range(count)]


def test_restarted_worker_recovers_its_tables_and_still_drops_replays(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=6, n_impressions=3000, start_ts_ms=1_767_225_600_000))
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    run.start()
    produce_events(run.settings.bootstrap_servers, first, run.settings.topics)
    _assert_exact(run, expected_counts(first))
    groups_before = run.table("user-groups")
    run.stop()
    run.start()
    produce_events(run.settings.bootstrap_servers, first + second, run.settings.topics)  # replay + new
    _assert_exact(run, expected_counts(events))
    groups_after = run.table("user-groups")
    kept = sum(groups_after[k] == g for k, g in groups_before.items())
    assert kept / len(groups_before) > 0.9, "a restart must not relabel the groups"


async def _send_outcome(bootstrap: str, topic: str, category: str, batch: OutcomeBatch) -> tuple[int, int]:
    """One outcome message keyed by category, as stage 1 sends it; its (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, batch.to_bytes(), key=category.encode())
        return sent.partition, sent.offset
    finally:
        await producer.stop()


async def _commit(bootstrap: str, group: str, topic: str, partition: int, offset: int) -> int:
    """Commit ``offset`` for the consumer group, as Faust does after it skipped a record; read it back.

    Joins the group (the broker takes commits from members only), once the stopped worker's membership is gone.
    """
    for _ in range(15):
        try:
            return await _commit_as_member(bootstrap, group, TopicPartition(topic, partition), offset)
        except KafkaError:
            await asyncio.sleep(1.0)  # the stopped worker is still a member (until its session times out)
    raise AssertionError(f"could not join group {group} to commit an offset")


class _FaustNamedAssignor(RoundRobinPartitionAssignor):
    """Round robin under the protocol name the worker's group keeps (Faust's assignor is called "faust")."""

    name = "faust"


async def _commit_as_member(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> int:
    topic = tp.topic
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                partition_assignment_strategy=(_FaustNamedAssignor,))
    await consumer.start()
    try:
        consumer.subscribe([topic])  # join the group: the broker takes commits from members only
        while tp not in consumer.assignment():
            await consumer.getmany(timeout_ms=200)
        await consumer.commit({tp: offset})
        return await consumer.committed(tp)
    finally:
        await consumer.stop()


def test_an_outcome_message_the_consumer_skipped_is_read_and_counted(run: WorkerRun, world: World) -> None:
    events = list(generate_events(world, seed=8, n_impressions=1000, start_ts_ms=1_767_225_600_000))
    later = list(generate_events(world, seed=9, n_impressions=600, start_ts_ms=1_767_226_200_000))
    stage1 = build_stages(Settings(), lambda name, partitions: {})
    outcomes: dict[str, OutcomeBatch] = defaultdict(OutcomeBatch)
    collect_outcomes(ingest_partition(stage1, 0, [to_bytes(e) for e in later if isinstance(e, Impression)]), outcomes)
    category, rows = max(((c, b.impressions) for c, b in outcomes.items()), key=lambda cb: len(cb[1]))
    skipped, next_one = OutcomeBatch(rows[: len(rows) // 2]), OutcomeBatch(rows[len(rows) // 2 :])
    bootstrap, topic = run.settings.bootstrap_servers, f"{run.settings.streams.app_id}-outcomes"

    run.start()
    produce_events(bootstrap, events, run.settings.topics)
    _assert_exact(run, expected_counts(events))
    run.stop()
    # Faust's consumer can drop a record and commit past it (streams/offsets.py): the group's offset is put past
    # an outcome message the worker never processed, then the next message of that partition arrives.
    partition, offset = asyncio.run(_send_outcome(bootstrap, topic, category, skipped))
    assert asyncio.run(_commit(bootstrap, run.settings.streams.app_id, topic, partition, offset + 1)) == offset + 1
    assert asyncio.run(_send_outcome(bootstrap, topic, category, next_one)) == (partition, offset + 1)

    run.start()
    want = expected_counts(events)
    impressions = Counter(want.impressions) + Counter((row[3], row[4]) for row in rows)
    run.wait_for(lambda: table_counts(run.table("ctr")) == (dict(impressions), want.clicks),
                 what="the skipped outcome message to be counted")
    assert sum(impressions.values()) == 1000 + len(rows)
    assert f"reading {offset}-{offset} past the consumer" in run.log_text()
