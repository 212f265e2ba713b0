"""The dashboard's data readers and figures: pure folds, then a Collector against the real broker and files."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from cli.dashboard.data import Collector, CtrSample, ctr_bins, freshness_rows, group_totals, parse_lag, served_changes
from cli.dashboard.layout import ctr_figure, panels, version_rows, versions_figure
from infra.contracts.events import Impression, to_bytes as event_bytes
from infra.contracts.messages import DeadLetter, DriftAlert, to_bytes
from infra.kafka import ensure_topics, produce_raw
from infra.settings import load_settings
from learner.history import RoundRecord, append_round
from streams.tables import changelog_topic

PINK = 'background=dots; palette=pink,navy; position=center; scale=0.6; copy=""; style=bright'
NAVY = 'background=solid; palette=navy,white; position=left; scale=0.5; copy="New"; style=dark'


def test_ctr_bins_count_what_was_added_in_each_bin_per_group() -> None:
    samples = [
        CtrSample(100.0, "mugs/g0", 100, 5), CtrSample(112.0, "mugs/g0", 300, 15),
        CtrSample(125.0, "mugs/g0", 400, 35), CtrSample(126.0, "mugs/g0", 10, 1),  # table rebuilt: skipped
        CtrSample(101.0, "tea/g1", 50, 1),
    ]
    rows = ctr_bins(samples, bin_s=10.0)
    mugs = [(r["time"], r["impressions"], r["clicks"]) for r in rows if r["group"] == "mugs/g0"]
    assert mugs == [(100.0, 100, 5), (110.0, 200, 10), (120.0, 100, 20)]
    [tea] = [r for r in rows if r["group"] == "tea/g1"]
    assert tea["category"] == "tea" and tea["ctr"] == pytest.approx(0.02)


def test_group_totals_served_changes_lag_and_freshness() -> None:
    table = {"mugs/g0|p1": {"c1": [10, 1, PINK], "c2": [5, 0, NAVY]}, "mugs/g0|p2": {"c3": [7, 2, PINK]},
             "mugs/g1|p1": {"c1": [3, 0, PINK]}}
    assert group_totals(table) == {"mugs/g0": (22, 3), "mugs/g1": (3, 0)}
    [served] = served_changes("mugs/g0|p1", table["mugs/g0|p1"], {"c1": [10, 1, PINK], "c2": [9, 1, NAVY]}, 5.0)
    assert (served.group, served.product, served.creative_id, served.prompt) == ("mugs/g0", "p1", "c2", NAVY)
    assert (served.impressions, served.clicks) == (4, 1)

    registry = CollectorRegistry()
    lag = Gauge("osmf_consumer_lag", "lag", ["topic", "partition"], registry=registry)
    lag.labels("osmf.impressions", "0").set(42)
    lag.labels("osmf.clicks", "3").set(0)
    rows = parse_lag(generate_latest(registry).decode(), "worker 1")
    assert {(r["topic"], r["partition"], r["lag"]) for r in rows} == {("osmf.impressions", 0, 42.0),
                                                                       ("osmf.clicks", 3, 0.0)}
    fresh = freshness_rows([("event", 100.0, ""), ("feature", None, ""), ("pair", 103.5, ""), ("model", 110.0, "")],
                           now=120.0)
    assert [r["age_s"] for r in fresh] == [20.0, None, 16.5, 10.0]
    assert [r["after_previous_s"] for r in fresh] == [None, None, 3.5, 6.5]


@pytest.fixture
def settings(broker_settings, tmp_path: Path):  # noqa: ANN001, ANN201
    run_id = uuid.uuid4().hex[:8]
    topics = {name: f"t-{run_id}.{name}" for name in
              ("impressions", "clicks", "preference_pairs", "dead_letter", "drift_alerts")}
    return load_settings(
        data_dir=tmp_path, kafka_bootstrap=broker_settings.bootstrap_servers, topics={**topics, "partitions": 2},
        streams={"app_id": f"dash-{run_id}", "metrics_port": 0}, features={"enabled": False},
        dashboard={"ctr_bin_s": 10.0, "thumbnails_per_group": 2},
    )


def _impression(i: int, version: str, ts: int) -> Impression:
    return Impression(event_id=f"e{i}", ts=ts, user_id=f"u{i}", user={"age": "25-34"}, product_id="p1",
                      category="mugs", product={"title": "Mug", "price": 9.5}, creative_id="c1", prompt=PINK,
                      model_version=version, placement="feed")


@pytest.mark.broker
def test_collector_reads_the_stores_and_the_figures_hold_data(settings) -> None:  # noqa: ANN001
    bootstrap = settings.bootstrap_servers
    ctr_topic = changelog_topic(settings.streams.app_id, "ctr")
    ensure_topics(bootstrap, [ctr_topic, *settings.topics.all_names()], 2)

    def ctr_row(key: str, value: dict) -> tuple[bytes, bytes]:
        return json.dumps(key).encode(), json.dumps(value).encode()

    produce_raw(bootstrap, ctr_topic, [
        ctr_row("mugs/g0|p1", {"c1": [100, 5, PINK], "c2": [100, 1, NAVY]}),
        ctr_row("mugs/g1|p1", {"c1": [50, 0, PINK]}),
    ])
    alert = DriftAlert(alert_id="a1", ts=1_000_500_000, group_id="mugs/g0", category="mugs", detector="adwin",
                       ctr_before=0.03, ctr_after=0.09, n_observations=400)
    produce_raw(bootstrap, settings.topics.drift_alerts, [(b"mugs", to_bytes(alert))])
    letter = DeadLetter(ts=1_000_000_000, source_topic=settings.topics.clicks, partition=0, offset=3,
                        reason="missing; send it", field="impression_id", original=b"{}")
    produce_raw(bootstrap, settings.topics.dead_letter, [(None, to_bytes(letter))])
    produce_raw(bootstrap, settings.topics.impressions,
                [(b"u", event_bytes(_impression(i, "1" if i < 6 else "2", 1_000_000_000 + 1000 * i))) for i in range(10)])
    repo = settings.data_dir / "models" / "gmllm"
    gate = {"promote": True, "reason": "", "overall_candidate": 0.61, "overall_incumbent": 0.5}
    append_round(repo / "rounds.jsonl", RoundRecord(1, 0.0, (0, 1), {"mugs/g0": 30}, 8, [0.7], gate, "promoted", 2, 1))
    append_round(repo / "rounds.jsonl", RoundRecord(2, 0.0, (0, 2), {"mugs/g0": 30}, 8, [0.7],
                                                    {**gate, "promote": False, "reason": "group mugs/g1 lost"},
                                                    "kept: group mugs/g1 lost", 2, 2))

    now = [1_000_000.0]
    collector = Collector(settings, clock=lambda: now[0])
    try:
        collector.refresh()
        produce_raw(bootstrap, ctr_topic, [ctr_row("mugs/g0|p1", {"c1": [300, 25, PINK], "c2": [100, 1, NAVY]})])
        now[0] += 12.0
        collector.refresh()
        snap = collector.snapshot()
    finally:
        collector.close()

    g0 = [(r["impressions"], r["clicks"]) for r in snap.ctr if r["group"] == "mugs/g0"]
    assert g0 == [(200, 6), (200, 20)]
    assert [a["group"] for a in snap.alerts] == ["mugs/g0"]
    assert snap.dead_letter_counts == [{"source_topic": settings.topics.clicks, "field": "impression_id", "count": 1}]
    assert {(r["version"], r["impressions"]) for r in snap.traffic} == {("1", 6), ("2", 4)}
    [first] = [c for c in snap.creatives if c["group"] == "mugs/g0"][:1]
    assert first["creative_id"] == "c1" and first["impressions"] == 200 and first["src"].startswith("data:image/png")
    assert [r["decision"] for r in version_rows(snap)] == ["refused", "promoted"]
    stages = {r["stage"]: r for r in snap.freshness}
    assert stages["event"]["newest"] != "-" and stages["live"]["newest"] == "-"

    ctr = ctr_figure(snap)
    assert sum(len(t.x) for t in ctr.data if t.name.startswith("mugs/")) == 3
    assert any(t.name.startswith("drift alert") and len(t.x) == 1 for t in ctr.data)
    versions = versions_figure(snap)
    assert {t.name for t in versions.data} >= {"version 1", "version 2", "promoted", "refused (kept incumbent)"}
    assert len(panels(snap)) == 8
