"""Start real `osmf worker` processes against the test broker and read their tables back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from infra.settings import Settings, load_settings
from infra.contracts.events import Click, Impression
from infra.kafka import ensure_topics
from streams.tables import read_table

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerRun:
    """Settings of one isolated pipeline (own topics, app id, metrics ports) and its worker processes."""

    settings: Settings
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, workers: int = 1, index: int = 1) -> None:
        """Start ``osmf worker -n workers``; ``index`` > 1 starts one more worker of the group beside
        running ones (its metrics on ``metrics_port + index - 1``)."""
        log = open(self.settings.data_dir / f"worker-{len(self.procs)}.log", "ab")
        loglevel = os.environ.get("OSMF_TEST_WORKER_LOGLEVEL", "warning")  # "info" logs recovery and rebalances
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "-n", str(workers), "--index", str(index),
                 "--loglevel", loglevel],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )

    def stop_one(self, position: int) -> None:
        """Stop the worker process started ``position``-th (0 first) as an operator would (SIGTERM)."""
        proc = self.procs[position]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def log_tail(self) -> str:
        logs = sorted(self.settings.data_dir.glob("worker-*.log"))
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs)

    def log_text(self) -> str:
        """Everything the worker processes of this run wrote."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.settings.data_dir.glob("worker-*.log")))

    def table(self, name: str) -> dict:
        """Current content of a worker table, read from its changelog topic (last value per key)."""
        return read_table(self.settings.bootstrap_servers, self.settings.streams.app_id, name)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 120.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            if any(p.poll() not in (None, 0) for p in self.procs):
                raise AssertionError(f"worker died:\n{self.log_tail()}")
            time.sleep(1.0)
        raise AssertionError(f"timed out waiting for {what}\n{self.log_tail()}")


def isolated_run(
    broker: Settings, tmp_path: Path, features: dict[str, object] | None = None, **streams: object
) -> WorkerRun:
    """A pipeline with its own topics and app id on the session broker.

    ``features`` sets ``OSMF_FEATURES__<NAME>`` (e.g. ``{"online_store": "redis", "project": "t1"}``);
    without it the worker does not push features (the stream tests stay about the stream, and
    each worker start skips Feast's ~10 s import).
    """
    run_id = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "OSMF_KAFKA_BOOTSTRAP": broker.bootstrap_servers,
        "OSMF_DATA_DIR": str(tmp_path),
        "OSMF_STREAMS__APP_ID": f"osmf-test-{run_id}",
        "OSMF_STREAMS__METRICS_PORT": str(free_port()),
        "OSMF_STREAMS__SESSION_TIMEOUT_S": "6",
        "OSMF_TOPICS__PARTITIONS": "4",
        "HF_HUB_OFFLINE": "1",
    }
    for topic in ("impressions", "clicks", "preference_pairs", "dead_letter", "drift_alerts"):
        env[f"OSMF_TOPICS__{topic.upper()}"] = f"t-{run_id}.{topic}"
    for name, value in streams.items():
        env[f"OSMF_STREAMS__{name.upper()}"] = str(value)
    if features is None:
        features = {"enabled": "false"}
    for name, value in features.items():
        env[f"OSMF_FEATURES__{name.upper()}"] = str(value)
    env.pop("OSMF_CONFIG", None)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = load_settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ensure_topics(settings.bootstrap_servers, settings.topics.all_names(), settings.topics.partitions)
    return WorkerRun(settings, env)


@dataclass
class Expected:
    """Counts computed directly from the produced event log."""

    impressions: dict[tuple[str, str], int]
    clicks: dict[tuple[str, str], int]
    by_category: dict[str, int]


def expected_counts(events: Iterable[Impression | Click], window_ms: int = 1_800_000) -> Expected:
    """Per (product, creative): distinct impressions and distinct clicked impressions within the window."""
    impressions: dict[str, Impression] = {}
    clicked: set[str] = set()
    clicks: list[Click] = []
    for event in events:
        if isinstance(event, Impression):
            impressions.setdefault(event.event_id, event)
        else:
            clicks.append(event)
    for click in clicks:
        imp = impressions.get(click.impression_id)
        if imp is not None and click.ts - imp.ts <= window_ms:
            clicked.add(imp.event_id)
    imp_counts: dict[tuple[str, str], int] = defaultdict(int)
    click_counts: dict[tuple[str, str], int] = defaultdict(int)
    by_category: dict[str, int] = defaultdict(int)
    for imp in impressions.values():
        imp_counts[(imp.product_id, imp.creative_id)] += 1
        by_category[imp.category] += 1
        if imp.event_id in clicked:
            click_counts[(imp.product_id, imp.creative_id)] += 1
    return Expected(dict(imp_counts), dict(click_counts), dict(by_category))


def table_counts(ctr_rows: dict) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """Sum the worker's (group, product) -> creative rows over groups into per (product, creative) totals."""
    impressions: dict[tuple[str, str], int] = defaultdict(int)
    clicks: dict[tuple[str, str], int] = defaultdict(int)
    for key, creatives in ctr_rows.items():
        product = key.split("|", 1)[1]
        for creative, (imps, clks, _prompt) in creatives.items():
            impressions[(product, creative)] += imps
            if clks:
                clicks[(product, creative)] += clks
    return dict(impressions), dict(clicks)


def count_difference(got: dict[tuple[str, str], int], want: dict[tuple[str, str], int], what: str) -> str:
    """One line saying how table counts differ from the log: totals, keys over (double counted) and under (lost)."""
    over = sum(max(got.get(k, 0) - want.get(k, 0), 0) for k in set(got) | set(want))
    under = sum(max(want.get(k, 0) - got.get(k, 0), 0) for k in set(got) | set(want))
    return f"{what}: {sum(got.values())} counted vs {sum(want.values())} in the log ({over} over, {under} under)"
