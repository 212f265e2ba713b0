"""``osmf demo``: the whole embedded system on one machine, the loop closed on creatives the model itself served.

Broker → stream worker (groups, CTR, pairs, Feast) → learner service (Group-DPO
rounds, gate with the world's simulated CTR, publish) → Triton (each version
made live after its smoke test) → the simulated ad system, which asks
:class:`serving.client.CreativeClient` for every impression and draws clicks
from the world's click model on the served pixels (:mod:`sim.adsystem`).

Everything it starts is stopped by pid at the end or on Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from infra.contracts.events import Click, Impression
from infra.settings import LearnerSettings, Settings
from sim.world import World

DEMO_PRETRAIN = {"impressions": 60_000, "steps": 300, "creatives_per_product": 16}
"""Pre-training of the demo's base model (small: about two minutes on two cores)."""
DEMO_LOOP_ENV = {
    "OSMF_LEARNER__DPO__MAX_STEPS": "120",
    "OSMF_LEARNER__LOOP__CTR_PRODUCTS_PER_GROUP": "3",
}
"""Learner settings of the demo's rounds (short rounds, so a version goes live within minutes)."""


@dataclass
class OutcomeBook:
    """Impressions and clicks of the served creatives per (model version, group), from the events sent."""

    cells: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    _shown: dict[str, tuple[str, str]] = field(default_factory=dict)
    _group_of: dict[str, str] = field(default_factory=dict)

    def note(self, event: Impression | Click, group: str | None = None) -> None:
        """Count an event (``group``: the group the impression was served for)."""
        if isinstance(event, Impression):
            key = (event.model_version, group or "-")
            self._shown[event.event_id] = key
            self.cells[key][0] += 1
        else:
            key = self._shown.pop(event.impression_id, None)
            if key is not None:
                self.cells[key][1] += 1

    def groups(self) -> list[str]:
        return sorted({g for _, g in self.cells if g != "-"})

    def versions(self) -> list[str]:
        return sorted({v for v, _ in self.cells}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


@dataclass
class Stack:
    """Processes the demo started, stopped by pid in reverse order."""

    settings: Settings
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    server: bool = False
    watcher: bool = False
    broker: bool = False

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((name, process))
        return process

    def stop(self, console: Console) -> None:
        from serving import server
        from serving.watch import stop_watcher

        if self.watcher:
            stop_watcher(self.settings)
        for name, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            console.print(f"stopped {name} (pid {process.pid})")
        if self.server:
            server.stop_server(self.settings)
            console.print("stopped tritonserver")
        if self.broker:
            from infra.broker import stop_broker

            stop_broker(self.settings)
            console.print("stopped the broker")


def demo_base(settings: Settings, world: World, world_file: Path, console: Console) -> Path:
    """The demo's pre-trained base (model/ + traffic/), trained once per world file and cached under ``<data_dir>/demo``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from learner.pretrain import run_pretraining
    from sim.logs import traffic_from_world

    digest = hashlib.sha256(world_file.read_bytes() + json.dumps(DEMO_PRETRAIN).encode()).hexdigest()[:12]
    root = settings.data_dir / "demo" / f"base-{digest}"
    if (root / "model" / "manifest.json").is_file() and (root / "traffic" / "log.json").is_file():
        console.print(f"[2/6] base model: {root} (cached)")
        return root
    data = settings.learner.model_dump()
    data["pretrain"].update(DEMO_PRETRAIN)
    learner = LearnerSettings.model_validate(data)
    log, _ = traffic_from_world(world, n_impressions=learner.pretrain.impressions, seed=learner.pretrain.traffic_seed,
                                creatives_per_product=learner.pretrain.creatives_per_product)
    columns = [TextColumn("[2/6] pre-training the base"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("pretrain", total=learner.pretrain.steps)
        run_pretraining(log, learner, root, holdout=0.0, source=f"world {world.name}",
                        on_step=lambda step, _name, _loss: progress.update(bar, completed=step),
                        echo=lambda _line: None)
    console.print(f"[2/6] base model: {root} ({learner.pretrain.steps} steps on {len(log.records):,} impressions)")
    return root


def run_loop_demo(settings: Settings, world: World, world_file: Path, minutes: float, rate: float, seed: int) -> int:
    """The closed loop for ``minutes`` of traffic; returns an exit code (0: a Group-DPO version was promoted and served)."""
    from infra.broker import start_broker
    from infra.kafka import ensure_topics, produce_events
    from learner.publish import latest_version
    from learner.service import model_repository
    from serving import server
    from serving.client import CreativeClient
    from serving.live import VersionManager, read_state
    from serving.watch import start_watcher
    from sim.adsystem import ServedChooser, catalogue
    from sim.replay import paced
    from sim.simulate import generate_events, time_ordered

    console = Console()
    stack = Stack(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logs = settings.data_dir / "demo" / "logs"
    started = time.monotonic()
    book = OutcomeBook()
    stop = threading.Event()
    try:
        status = start_broker(settings)
        stack.broker = not status.external
        bootstrap = status.bootstrap
        ensure_topics(bootstrap, settings.topics.all_names(), settings.topics.partitions)
        console.print(f"[1/6] broker ready at {bootstrap}")
        base = demo_base(settings, world, world_file, console)
        env = {"OSMF_KAFKA_BOOTSTRAP": bootstrap, "OSMF_STREAMS__APP_ID": f"osmf-demo-{int(time.time())}"}
        stack.spawn("stream worker", [sys.executable, "-m", "cli.main", "worker", "-n", "1"], env, logs / "worker.log")
        repo = model_repository(settings)
        name = settings.learner.loop.model_name
        stack.spawn("learner", [sys.executable, "-m", "cli.main", "learner", "run", "--base", str(base),
                                "--world", str(world_file), "--min-new-pairs", "100", "--max-wait-s", "150"],
                    {**env, **DEMO_LOOP_ENV}, logs / "learner.log")
        _wait_for(lambda: latest_version(repo, name) is not None, 300, "the learner to publish version 1",
                  logs / "learner.log")
        console.print(f"[3/6] stream worker and learner running (logs in {logs})")
        pid = server.start_server(settings)
        stack.server = True
        VersionManager(settings).start()
        start_watcher(settings)
        stack.watcher = True
        console.print(f"[4/6] tritonserver pid {pid} serving version {read_state(settings).live}")
        client = CreativeClient(settings, catalogue(world), seed=seed)
        chooser = ServedChooser(world, client)
        duration_s = minutes * 60.0
        events = generate_events(world, seed, duration_s=duration_s, rate=rate, chooser=chooser,
                                 start_ts_ms=int(time.time() * 1000))
        groups_of: dict[str, str] = {}

        def noted(stream: Any) -> Any:
            for event in stream:
                if stop.is_set():
                    return
                book.note(event, groups_of.pop(event.event_id, None) if isinstance(event, Impression) else None)
                yield event

        def remember_groups(stream: Any) -> Any:
            for event in stream:
                if isinstance(event, Impression):
                    groups_of[event.event_id] = chooser.last_group
                yield event

        sent = {"n": 0}

        def play() -> None:
            sent["n"] = produce_events(bootstrap, noted(paced(time_ordered(remember_groups(events)), speedup=1.0)),
                                       settings.topics)

        traffic = threading.Thread(target=play, name="osmf-demo-traffic", daemon=True)
        traffic.start()
        if console.is_terminal:
            with Live(console=console, refresh_per_second=1) as live:
                while traffic.is_alive():
                    live.update(_progress(settings, repo, name, book, chooser, started))
                    traffic.join(timeout=1.0)
        else:  # a log file: one status line every 30 s
            while traffic.is_alive():
                traffic.join(timeout=30.0)
                console.print(_status_line(settings, repo, name, book, chooser, started))
        console.print(f"[5/6] sent {sent['n']:,} events in {time.monotonic() - started:.0f} s")
        client.close()
        return _summary(console, settings, repo, name, book, chooser)
    except KeyboardInterrupt:
        stop.set()
        console.print("interrupted: stopping everything the demo started")
        return 130
    finally:
        stop.set()
        stack.stop(console)


def _wait_for(ready: Any, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.is_file() else []
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}; last lines of {log}: "
                               + " | ".join(tail))
        time.sleep(1.0)


def _metrics(port: int) -> dict[str, float]:
    """Sums of the worker's Prometheus samples by metric name (empty when it does not answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return {}
    sums: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            sums[name.split("{", 1)[0]] += float(value)
    return sums


def _rounds(repo: Path, name: str) -> list[dict[str, Any]]:
    path = repo / name / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _status_line(settings: Settings, repo: Path, name: str, book: OutcomeBook, chooser: Any, started: float) -> str:
    """Elapsed time, impressions and rate, groups, pairs, rounds, live version and fallbacks in one line."""
    from serving.live import read_state

    elapsed = time.monotonic() - started
    metrics = _metrics(settings.streams.metrics_port)
    rounds = _rounds(repo, name)
    promoted = sum(1 for r in rounds if str(r.get("decision", "")).startswith("promot"))
    impressions = sum(c[0] for c in book.cells.values())
    return (f"elapsed {elapsed:.0f} s | impressions {impressions:,} ({impressions / max(elapsed, 1):.0f}/s) | "
            f"groups {metrics.get('osmf_groups', 0):.0f} | pairs {metrics.get('osmf_preference_pairs_total', 0):.0f} | "
            f"rounds {len(rounds)} ({promoted} promoted) | live version {read_state(settings).live} | "
            f"fallbacks {chooser.counts.fallbacks:,}")


def _progress(settings: Settings, repo: Path, name: str, book: OutcomeBook, chooser: Any, started: float) -> Group:
    return Group(_status_line(settings, repo, name, book, chooser, started),
                 _ctr_table(book, "CTR per group and served version (live)"))


def _ctr_table(book: OutcomeBook, title: str) -> Table:
    table = Table(title=title)
    table.add_column("group")
    versions = book.versions()
    for version in versions:
        table.add_column(f"v{version}" if version.isdigit() else f"({version})", justify="right")
    for group in [*book.groups(), "-"]:
        cells = [book.cells.get((v, group)) for v in versions]
        if not any(cells):
            continue
        table.add_row(group if group != "-" else "(fallback)",
                      *(f"{c[1] / c[0]:.2%} of {c[0]:,}" if c and c[0] else "" for c in cells))
    return table


def _summary(console: Console, settings: Settings, repo: Path, name: str, book: OutcomeBook, chooser: Any) -> int:
    from serving.live import read_state

    console.print(_ctr_table(book, "[6/6] CTR per group, per served model version (before → after)"))
    worst: dict[str, tuple[str, float]] = {}
    for (version, group), (n, clicks) in book.cells.items():
        if group != "-" and n >= 200:
            rate = clicks / n
            if version not in worst or rate < worst[version][1]:
                worst[version] = (group, rate)
    for version, (group, rate) in sorted(worst.items()):
        console.print(f"worst group under v{version}: {group} {rate:.2%}")
    rounds = _rounds(repo, name)
    versions = Table(title="learner rounds")
    for column in ("round", "pairs", "decision", "version"):
        versions.add_column(column)
    for r in rounds:
        versions.add_row(str(r.get("round")), str(sum((r.get("pairs_per_group") or {}).values())),
                         str(r.get("decision")), str(r.get("version") or ""))
    console.print(versions)
    live = read_state(settings).live
    served_new = any(v.isdigit() and int(v) > 1 and n for (v, _g), (n, _c) in book.cells.items())
    console.print(f"live version at the end: {live}; a Group-DPO version served: {'yes' if served_new else 'no'}")
    console.print(f"dashboard: `osmf dashboard` (http://127.0.0.1:{_dashboard_port(settings)})")
    return 0 if served_new else 1


def _dashboard_port(settings: Settings) -> int:
    dashboard = getattr(settings, "dashboard", None)
    return int(getattr(dashboard, "port", 8050))
