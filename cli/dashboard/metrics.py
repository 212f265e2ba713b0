"""The dashboard's own ``/metrics``: what it folds from the stores, for Prometheus and Grafana.

The worker, learner and serving expose their own process metrics; per-group
CTR, drift alerts per group, traffic per model version and freshness exist
only as data in the stores, so the dashboard (a long-running read-only
reader of them) exports them. ``infra/deploy/grafana-dashboard.json`` draws the
page's panels from these and the components' metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PrometheusCollector

from cli.dashboard.data import Collector, category_of


class DashboardMetrics(PrometheusCollector):
    """Reads the :class:`cli.dashboard.data.Collector` at every scrape."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        totals = self.collector.totals()
        shown = CounterMetricFamily("osmf_group_impressions", "Impressions counted per group (worker's ctr table).",
                                    labels=["category", "group"])
        clicked = CounterMetricFamily("osmf_group_clicks", "Attributed clicks counted per group.",
                                      labels=["category", "group"])
        for group, (impressions, clicks) in sorted(totals["groups"].items()):
            shown.add_metric([category_of(group), group], impressions)
            clicked.add_metric([category_of(group), group], clicks)
        yield shown
        yield clicked
        alerts = CounterMetricFamily("osmf_group_drift_alerts", "Drift alerts per group (drift-alerts topic).",
                                     labels=["category", "group"])
        for group, count in sorted(totals["alerts"].items()):
            alerts.add_metric([category_of(group), group], count)
        yield alerts
        versions = CounterMetricFamily("osmf_version_impressions", "Impressions per serving model version.",
                                       labels=["version"])
        for version, count in sorted(totals["versions"].items()):
            versions.add_metric([version], count)
        yield versions
        dead = CounterMetricFamily("osmf_dead_letters", "Messages on the dead-letter topic.",
                                   labels=["source_topic", "field"])
        for (topic, field), count in sorted(totals["dead_letters"].items()):
            dead.add_metric([topic, field], count)
        yield dead
        fresh = GaugeMetricFamily("osmf_freshness_timestamp_seconds",
                                  "Newest time of each stage (event, feature, pair, model, live), epoch s.",
                                  labels=["stage"])
        for stage, at, _ in self.collector.freshness_stamps([]):
            if at is not None:
                fresh.add_metric([stage], at)
        yield fresh
        yield GaugeMetricFamily("osmf_dashboard_scrape_timestamp_seconds", "When this page was built.",
                                value=time.time())


def metrics_text(collector: Collector) -> bytes:
    """The Prometheus text exposition of the collector's figures."""
    registry = CollectorRegistry()
    registry.register(DashboardMetrics(collector))
    return generate_latest(registry)
