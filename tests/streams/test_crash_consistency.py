"""Stage 2 killed between its journal entry and its table writes: the counts recover exactly.

The worker journals each outcome batch (``assigned`` changes plus the view rows it wrote) as one
entry and writes the views only once that entry is durable. These tests stop the stages at each
point a kill -9 can land, rebuild them from the same durable tables and replay the batch.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

from infra.contracts.events import to_bytes
from infra.settings import Settings
from sim.simulate import generate_events
from sim.world import World
from streams.aggregate import OutcomeBatch
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
