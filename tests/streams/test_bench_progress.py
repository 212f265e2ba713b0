"""``osmf bench streams`` reads the workers' progress from their real ``/metrics`` endpoints, only the series it needs."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bench.streams import METRICS_QUERY, _free_port_block, _progress
from infra.security import serve_metrics


def _worker_registry(impressions: int, clicks: int, last_batch: float) -> CollectorRegistry:
    """The series a worker exports (streams.metrics), plus one the bench must not fetch."""
    registry = CollectorRegistry()
    started = Counter("osmf_batches_started_total", "", ["stage"], registry=registry)
    counted = Counter("osmf_counted_total", "", ["kind"], registry=registry)
    last = Gauge("osmf_last_batch_timestamp_seconds", "", ["stage"], registry=registry)
    Histogram("osmf_stage_seconds", "", ["stage"], registry=registry).labels("ingest").observe(0.1)
    started.labels("ingest").inc(3)
    if impressions or clicks:
        counted.labels("impression").inc(impressions)
        counted.labels("click").inc(clicks)
        last.labels("aggregate").set(last_batch)
    last.labels("ingest").set(last_batch + 100)  # stage 1's time is not the end of counting
    return registry


def test_progress_sums_the_workers_and_takes_the_last_count_time() -> None:
    base = _free_port_block(3)  # worker i serves on base + i - 1, as the bench starts them
    ports = range(base, base + 3)  # the third answers nothing: a worker not up yet
    servers = [serve_metrics(ports[0], registry=_worker_registry(700, 20, 1_000.5)),
               serve_metrics(ports[1], registry=_worker_registry(0, 0, 0.0))]
    try:
        progress = _progress(ports)
        asked = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics{METRICS_QUERY}", timeout=5).read().decode()
    finally:
        for server in servers:
            server.shutdown()
    assert (progress.started, progress.impressions, progress.clicks) == (6, 700, 20)
    assert progress.last_counted_at == 1_000.5
    assert progress.counting_workers == 1
    assert "osmf_counted_total" in asked and "osmf_stage_seconds" not in asked  # only the series it reads
