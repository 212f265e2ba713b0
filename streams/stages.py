"""The worker's two stages built from settings, over any mappings: Faust tables in the worker, dicts elsewhere.

One construction for :class:`streams.app.Worker` and for code that drives the
same stages without Faust (``osmf bench streams``' ceiling).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from infra.settings import Settings
from streams.aggregate import AggregateConfig, AggregateStage, AggregateStores, OutcomeBatch
from streams.drift import DriftMonitor
from streams.grouping import GroupingConfig, ProductAwareGrouper
from streams.ingest import BatchResult, IngestConfig, IngestStage
from streams.journal import BufferedView, JournalChanges, JournalStore, RowWriter
from streams.pairs import PairMiner, PairMinerConfig

TableFactory = Callable[[str, int], MutableMapping[str, Any]]
"""``(name, partitions) -> mapping``: where a stage keeps a durable table."""
WriterFactory = Callable[[MutableMapping[str, Any]], RowWriter]
"""``table -> writer``: how a buffered view's rows reach that table (and its changelog)."""


@dataclass
class Stages:
    """Stage 1 (ingest, per user partition) and stage 2 (aggregate, per category) with their journals."""

    ingest: IngestStage
    aggregate: AggregateStage
    seen: JournalStore
    index: JournalStore
    assigned: JournalStore
    stores: AggregateStores
    views: dict[str, BufferedView]
    """Stage 2's counting tables (``ctr``, ``attr_ctr``, ``user_groups``): their rows are journaled in
    ``assigned``'s entry of the batch before they are written (see :func:`journal_aggregate`)."""


def build_stages(settings: Settings, table: TableFactory, writer: WriterFactory | None = None) -> Stages:
    """Both stages from ``settings.streams``, their tables made by ``table`` (view rows written by ``writer``)."""
    cfg = settings.streams
    partitions = settings.topics.partitions
    window_ms = int(cfg.attribution_window_s * 1000)
    dedupe_ms = int(cfg.dedupe_window_s * 1000)
    seen = JournalStore(table("seen-journal", partitions), dedupe_ms)
    index = JournalStore(table("impression-index-journal", partitions), window_ms)
    assigned = JournalStore(table("assigned-journal", cfg.outcome_partitions), window_ms)

    def view(name: str) -> BufferedView:
        target = table(name, cfg.outcome_partitions)
        return BufferedView(target, writer(target) if writer else None)

    views = {"ctr": view("ctr"), "attr_ctr": view("attr-ctr"), "user_groups": view("user-groups")}
    stores = AggregateStores(
        assigned=assigned,
        ctr=views["ctr"],
        attr_ctr=views["attr_ctr"],
        user_groups=views["user_groups"],
        grouping=table("grouping", cfg.outcome_partitions),
        group_profiles=table("group-profiles", cfg.outcome_partitions),
    )
    ingest_config = IngestConfig(dedupe_window_ms=dedupe_ms, attribution_window_ms=window_ms)
    ingest = IngestStage(ingest_config, seen=seen, index=index)
    grouping_config = GroupingConfig(max_groups=cfg.max_groups, taste_alpha=cfg.grouping_taste_alpha)
    aggregate = AggregateStage(
        AggregateConfig(attribution_window_ms=window_ms, drift_label_delay_ms=int(cfg.drift_label_delay_s * 1000)),
        stores,
        new_grouper=lambda: ProductAwareGrouper(grouping_config),
        miner=PairMiner(PairMinerConfig(min_impressions=cfg.min_pair_impressions, confidence=cfg.pair_confidence)),
        drift=DriftMonitor(),
    )
    return Stages(ingest, aggregate, seen, index, assigned, stores, views)


def ingest_partition(stages: Stages, partition: int, values: list[bytes]) -> BatchResult:
    """Stage 1 over one partition's messages, then journal its state changes (one entry per store)."""
    result = stages.ingest.process(partition, values)
    watermark = stages.ingest.watermark(partition)
    stages.seen.flush(partition, watermark)
    stages.index.flush(partition, watermark)
    return result


def detach_aggregate(stages: Stages) -> tuple[JournalChanges, dict[str, dict[str, Any]]]:
    """Stage 2's pending changes: ``assigned``'s and the view rows, to journal as one entry."""
    return stages.assigned.detach(), {name: view.take() for name, view in stages.views.items()}


def publish_views(stages: Stages, partition: int, rows: dict[str, dict[str, Any]]) -> None:
    """Write journaled view rows into their tables."""
    for name, view_rows in rows.items():
        if view_rows:
            stages.views[name].publish(partition, view_rows)


def journal_aggregate(stages: Stages, partition: int, ts: int) -> None:
    """Journal stage 2's batch as one entry, then write its view rows.

    The worker waits for the entry to be durable between the two steps; code without a
    broker (benchmarks, tests over dicts) calls this.
    """
    changes, rows = detach_aggregate(stages)
    stages.assigned.write(changes, partition, ts, rows)
    publish_views(stages, partition, rows)


def restore_views(stages: Stages) -> None:
    """After recovery: write the view rows the retained journal entries hold (a kill may have come between
    an entry and its rows)."""
    for partition, rows in stages.assigned.recovered_views.items():
        publish_views(stages, partition, rows)


def collect_outcomes(result: BatchResult, outcomes: dict[str, OutcomeBatch]) -> None:
    """Add stage 1's accepted impressions and attributed clicks to the per-category batches for stage 2."""
    for imp in result.impressions:
        outcomes[imp.category].impressions.append(
            [imp.event_id, imp.user_id, imp.user, imp.product_id, imp.creative_id, imp.prompt, imp.ts]
        )
    for click in result.clicks:
        outcomes[click.category].clicks.append([click.impression_id, click.ts])
