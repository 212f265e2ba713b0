"""Production metrics: the learner's /metrics, the dashboard's /metrics, and the Prometheus/Grafana files in infra/deploy."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cli.dashboard.data import Collector
from cli.dashboard.metrics import DashboardMetrics, metrics_text
from helpers.worker_harness import REPO, free_port
from infra.settings import load_settings
from learner.history import RoundRecord, append_round
from learner.metrics import LearnerCollector, start_learner_metrics

DEPLOY = REPO / "infra" / "deploy"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _round_log(repo: Path) -> Path:
    history = repo / "gmllm" / "rounds.jsonl"
    gate = {"overall_candidate": 0.61, "overall_incumbent": 0.5}
    append_round(history, RoundRecord(1, 90.0, (0, 50_000), {"a": 30, "b": 10}, 8, [], gate, "promoted", 2, 1,
                                      finished_at=100.0))
    append_round(history, RoundRecord(2, 180.0, (0, 150_000), {"a": 5}, 2, [], {**gate, "overall_candidate": 0.4},
                                      "kept: no gain", 2, 2, finished_at=200.0))
    (repo / "gmllm" / "LATEST.json").write_text(json.dumps({"version": 2, "published_at": 101.0}))
    return history


def test_learner_metrics_are_served_from_the_round_log_and_state(tmp_path: Path) -> None:
    history = _round_log(tmp_path)
    port = free_port()
    state = {"pairs_offered_total": 44, "buffer_pairs": 40}
    assert start_learner_metrics(port, history, tmp_path, "gmllm", state=lambda: state) is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        samples = _samples(response.read().decode())
    assert samples[("osmf_learner_rounds_total", (("decision", "promoted"),))] == 1
    assert samples[("osmf_learner_rounds_total", (("decision", "refused"),))] == 1
    assert samples[("osmf_learner_gate_overall", (("figure", "candidate"),))] == 0.4
    assert samples[("osmf_learner_last_round_pairs", (("split", "train"),))] == 5
    assert samples[("osmf_learner_last_round_seconds", ())] == 20.0
    assert samples[("osmf_learner_pair_to_model_seconds", ())] == 50.0
    assert samples[("osmf_learner_published_version", ())] == 2
    assert samples[("osmf_learner_pairs_offered_total", ())] == 44 and samples[("osmf_learner_buffer_pairs", ())] == 40
    state["pairs_offered_total"] = 50  # read at every scrape
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert _samples(response.read().decode())[("osmf_learner_pairs_offered_total", ())] == 50

    with socket.socket() as busy:  # a busy port is skipped, never raised
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert start_learner_metrics(busy.getsockname()[1], history, tmp_path, "gmllm") is None
    assert start_learner_metrics(0, history, tmp_path, "gmllm") is None


def _filled_collector(tmp_path: Path) -> Collector:
    settings = load_settings(data_dir=tmp_path, kafka_bootstrap="127.0.0.1:1", features={"enabled": False})
    collector = Collector(settings)
    collector.table = {"mugs/g0|p1": {"c1": [10, 1, "x"], "c2": [5, 0, "y"]}, "tea/g1|p2": {"c3": [7, 2, "z"]}}
    collector.alerts = [{"group": "mugs/g0"}, {"group": "mugs/g0"}]
    collector.traffic = {(0.0, "1"): 5, (30.0, "1"): 2, (30.0, "2"): 3}
    collector.dead_counts = {("osmf.clicks", "ts"): 4}
    collector.newest = {"event": 123.0, "pair": None}
    return collector


def test_dashboard_metrics_export_what_the_page_draws(tmp_path: Path) -> None:
    _round_log(tmp_path / "models")
    samples = _samples(metrics_text(_filled_collector(tmp_path)).decode())
    assert samples[("osmf_group_impressions_total", (("category", "mugs"), ("group", "mugs/g0")))] == 15
    assert samples[("osmf_group_clicks_total", (("category", "tea"), ("group", "tea/g1")))] == 2
    assert samples[("osmf_group_drift_alerts_total", (("category", "mugs"), ("group", "mugs/g0")))] == 2
    assert samples[("osmf_version_impressions_total", (("version", "1"),))] == 7
    assert samples[("osmf_dead_letters_total", (("field", "ts"), ("source_topic", "osmf.clicks")))] == 4
    assert samples[("osmf_freshness_timestamp_seconds", (("stage", "event"),))] == 123.0
    assert samples[("osmf_freshness_timestamp_seconds", (("stage", "model"),))] == 101.0
    assert ("osmf_freshness_timestamp_seconds", (("stage", "pair"),)) not in samples  # unknown is left out


def _exposed_names(tmp_path: Path) -> set[str]:
    """Sample names every OSMF component exposes (worker, learner, client, dashboard)."""
    import streams.metrics  # noqa: F401 - registers the worker's metrics in the default registry
    from prometheus_client import REGISTRY

    from serving.metrics import ClientMetrics

    learner = CollectorRegistry()
    learner.register(LearnerCollector(_round_log(tmp_path / "models"), tmp_path / "models", "gmllm",
                                      state=lambda: {"buffer_pairs": 1}))
    dashboard = CollectorRegistry()
    dashboard.register(DashboardMetrics(_filled_collector(tmp_path)))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names = set()
    for registry in (REGISTRY, ClientMetrics().registry, learner, dashboard):
        for family in registry.collect():  # families without samples yet (no label values) count too
            names.add(family.name)
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
            names.update(sample.name for sample in family.samples)
    return names


def test_prometheus_scrapes_every_component_on_its_setting_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"osmf-worker", "osmf-learner", "osmf-triton", "osmf-creative-client", "osmf-dashboard"}
    settings = load_settings()
    ports = {name: {int(t.rsplit(":", 1)[1]) for c in job["static_configs"] for t in c["targets"]}
             for name, job in jobs.items()}
    assert settings.streams.metrics_port in ports["osmf-worker"]
    assert ports["osmf-triton"] == {settings.serving.metrics_port}
    assert ports["osmf-dashboard"] == {settings.dashboard.port}
    assert ports["osmf-learner"].isdisjoint(ports["osmf-worker"] | ports["osmf-dashboard"])


def test_grafana_panels_query_metrics_the_components_expose(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:osmf|nv)_[a-z0-9_]+)", e)}
    exposed = _exposed_names(tmp_path)
    missing = sorted(m for m in used if not m.startswith("nv_") and m not in exposed)
    assert not missing, f"Grafana queries metrics nothing exposes: {missing}"
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for panel in ("CTR per group", "Traffic share by model version", "Rounds: promoted / refused",
                  "Gate figure", "Age of the newest item per stage", "Consumer lag", "Dead letters",
                  "Creatives each group is served"):
        assert panel in titles, panel
    assert "drift alerts" in {a["name"] for a in dashboard["annotations"]["list"]}
