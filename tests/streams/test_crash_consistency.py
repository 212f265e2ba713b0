"""Stage 2 killed between its journal entry and its table writes: the counts recover exactly.

The worker journals each outcome batch (``assigned`` changes plus the view rows it wrote) as one
entry and writes the views only once that entry is durable. These tests stop the stages at each
point a kill -9 can land, rebuild them from the same durable tables and replay the batch.

The last test drives the worker's own stage code against the broker: a batch must not return (after
which Faust acks its events and may commit their offsets) before the broker has acknowledged the
journal entries that make a restarted worker skip it.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import defaultdict
from pathlib import Path

import pytest
from faust.events import Event
from faust.types import Message

from helpers.worker_harness import expected_counts, isolated_run, table_counts
from infra.contracts.events import Impression, to_bytes
from infra.kafka import consume_all, ensure_topics
from infra.producer import partition_for
from infra.settings import Settings
from sim.simulate import generate_events
from sim.world import World
from streams.aggregate import OutcomeBatch
import streams.app as app_module
from streams.app import Worker
from streams.stages import (
    build_stages, collect_outcomes, detach_aggregate, ingest_partition, journal_aggregate, publish_views,
    restore_views,
)

WORLD_A = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml"


def _outcome_batches(n_impressions: int) -> list[tuple[str, OutcomeBatch]]:
    """Stage 1's outcome batches for a simulated log, in order, 500 events per micro-batch."""
    events = list(generate_events(World.load(WORLD_A), seed=3, n_impressions=n_impressions))
    stages = build_stages(Settings(), lambda name, partitions: {})
    batches = []
    for start in range(0, len(events), 500):
        outcomes: dict[str, OutcomeBatch] = defaultdict(OutcomeBatch)
        collect_outcomes(ingest_partition(stages, 0, [to_bytes(e) for e in events[start:start + 500]]), outcomes)
        batches.extend(outcomes.items())
    return batches


def _totals(ctr: dict) -> tuple[int, int]:
    imps = sum(row[0] for creatives in ctr.values() for row in creatives.values())
    clicks = sum(row[1] for creatives in ctr.values() for row in creatives.values())
    return imps, clicks


def _durable_stages(tables: dict[str, dict]):
    return build_stages(Settings(), lambda name, partitions: tables.setdefault(name, {}))


def _recover(tables: dict[str, dict]):
    """Fresh stages over the durable tables, as a restarted worker builds them."""
    stages = _durable_stages(tables)
    stages.assigned.recover()
    restore_views(stages)
    stages.aggregate.rebuild()
    return stages


def _run_all(stages, batches) -> None:
    for category, batch in batches:
        stages.aggregate.apply(category, copy.deepcopy(batch))
        journal_aggregate(stages, 0, stages.aggregate.watermark(category))


def _killed_mid_run(batches: list[tuple[str, OutcomeBatch]]):  # noqa: ANN202
    """The totals of an uninterrupted run, and a run over durable tables whose middle batch was just counted in
    memory: ``(want, tables, stages, kill_at, category, batch)``."""
    expected = _durable_stages({})
    _run_all(expected, batches)
    tables: dict[str, dict] = {}
    stages = _durable_stages(tables)
    kill_at = len(batches) // 2
    _run_all(stages, batches[:kill_at])
    category, batch = batches[kill_at]
    stages.aggregate.apply(category, copy.deepcopy(batch))
    return _totals(expected.views["ctr"].table), tables, stages, kill_at, category, batch


def test_kill_after_the_journal_entry_before_the_table_writes_loses_and_doubles_nothing() -> None:
    batches = _outcome_batches(3000)
    want, tables, stages, kill_at, category, batch = _killed_mid_run(batches)
    changes, rows = detach_aggregate(stages)
    stages.assigned.write(changes, 0, stages.aggregate.watermark(category), rows)
    assert _totals(tables["ctr"]) != _totals(tables["ctr"] | rows["ctr"]), "the kill leaves the table behind"

    restarted = _recover(tables)
    _run_all(restarted, batches[kill_at:])  # the uncommitted batch is replayed, then the rest
    assert _totals(tables["ctr"]) == want
    assert restarted.aggregate.counters.duplicates >= len(batch.impressions)


def test_kill_before_the_journal_entry_replays_the_batch_once() -> None:
    batches = _outcome_batches(3000)
    want, tables, stages, kill_at, _, _ = _killed_mid_run(batches)  # counted in memory only, then killed
    assert _totals(stages.views["ctr"]) != _totals(tables["ctr"])

    restarted = _recover(tables)
    _run_all(restarted, batches[kill_at:])
    assert _totals(tables["ctr"]) == want


def test_views_are_published_only_after_the_entry() -> None:
    tables: dict[str, dict] = {}
    stages = _durable_stages(tables)
    category, batch = _outcome_batches(600)[0]
    stages.aggregate.apply(category, batch)
    assert tables["ctr"] == {}, "rows wait for the journal entry"
    assert stages.views["ctr"], "reads see the pending rows"
    changes, rows = detach_aggregate(stages)
    stages.assigned.write(changes, 0, 1, rows)
    publish_views(stages, 0, rows)
    assert _totals(tables["ctr"]) == (len(batch.impressions), len(batch.clicks))


STAGE1_JOURNALS = {"seen-journal", "impression-index-journal"}
STAGE2_JOURNALS = {"assigned-journal"}


def _event(worker: Worker, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> Event:
    message = Message(topic, partition, offset, time.time(), 0, [], key, value, None)
    return Event(worker.app, key, value, {}, message)


async def _drive_stages(worker: Worker, events: list, partitions: int) -> tuple[list[int], list[int]]:
    """Stage 1 over ``events`` in micro-batches of 200 messages, then stage 2 over the outcome messages in
    micro-batches of 3, as the agents run them; per returned batch, how many of its journal records the broker
    had not acknowledged."""
    topics = worker.settings.topics
    await worker.app.producer.start()
    try:
        stage1, offsets = [], defaultdict(int)
        for start in range(0, len(events), 200):
            batch = []
            for event in events[start:start + 200]:
                topic = topics.impressions if isinstance(event, Impression) else topics.clicks
                partition = partition_for(event.user_id, partitions)
                batch.append(_event(worker, topic, partition, offsets[(topic, partition)], event.user_id.encode(),
                                    to_bytes(event)))
                offsets[(topic, partition)] += 1
            await worker._ingest_batch(None, batch)
            stage1.append(worker.deliveries["ingest"].undelivered(STAGE1_JOURNALS))
        outcomes = [_event(worker, r.topic, r.partition, r.offset, r.key, r.value)
                    for r in consume_all(worker.settings.bootstrap_servers, [worker.outcomes_topic.get_topic_name()])]
        stage2 = []
        for start in range(0, len(outcomes), 3):  # micro-batches of outcome messages of several partitions
            await worker._aggregate_batch(outcomes[start:start + 3])
            stage2.append(worker.deliveries["aggregate"].undelivered(STAGE2_JOURNALS))
        for deliveries in worker.deliveries.values():
            await deliveries.wait()
        return stage1, stage2
    finally:
        await worker.app.producer.stop()


@pytest.mark.broker
@pytest.mark.parametrize("chunk_bytes", [app_module.AGGREGATE_CHUNK_BYTES, 1], ids=["default-chunks", "entry-per-message"])
def test_stage_batches_return_only_once_their_journal_entries_are_acknowledged(
    broker_settings, tmp_path, monkeypatch, chunk_bytes: int
) -> None:
    # chunk_bytes=1: stage 2 journals every outcome message of a batch as an entry of its own, so later chunks
    # must read the view rows of earlier ones whose changelog records still wait for the batch's entries.
    monkeypatch.setattr(app_module, "AGGREGATE_CHUNK_BYTES", chunk_bytes)
    run = isolated_run(broker_settings, tmp_path)
    events = list(generate_events(World.load(WORLD_A), seed=5, n_impressions=2000, start_ts_ms=1_767_225_600_000))
    expected = expected_counts(events)
    worker = Worker(run.settings)
    partitions = run.settings.topics.partitions
    assert run.settings.streams.outcome_partitions == partitions
    ensure_topics(run.settings.bootstrap_servers, [worker.outcomes_topic.get_topic_name()]
                  + [table.changelog_topic.get_topic_name() for table in worker.app.tables.values()], partitions)

    stage1, stage2 = asyncio.run(_drive_stages(worker, events, partitions))

    assert len(stage1) == -(-len(events) // 200) and len(stage2) >= len(stage1) / 3
    assert stage1 == [0] * len(stage1), "stage 1 returned with seen/index journal entries not yet acknowledged"
    assert stage2 == [0] * len(stage2), "stage 2 returned with its assigned journal entry not yet acknowledged"
    assert table_counts(dict(worker.stores.ctr.table.data.items())) == (expected.impressions, expected.clicks)
    assert table_counts(run.table("ctr")) == (expected.impressions, expected.clicks), "the changelog holds the same"
