"""The whole system on one machine with the simulated ad system closing the loop (``osmf demo``, ``osmf bench loop``).

Broker → stream worker (groups, CTR, pairs, Feast) → learner service (Group-DPO
rounds, gate with the world's simulated CTR, publish) → Triton (each version
made live after its smoke test) → the simulated ad system, which asks
:class:`serving.client.CreativeClient` for every impression and draws clicks
from the world's click model on the served pixels (:mod:`sim.adsystem`).

:class:`ClosedLoop` starts the parts (the worker and the learner as ``osmf``
processes), plays the traffic on a thread, and stops everything it started
by pid. :func:`click_to_live` measures, per promoted round, the time from the
newest evidence of its pairs to the version serving.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import _proc
from infra.contracts.events import Click, Impression
from infra.security import http_token
from infra.settings import LearnerSettings, Settings
from sim.world import World

LOOP_PRETRAIN = {"impressions": 60_000, "steps": 300, "creatives_per_product": 16}
"""Pre-training of the loop's base model (small: about two minutes on two cores)."""
LOOP_LEARNER_ENV = {
    "OSMF_LEARNER__DPO__MAX_STEPS": "120",
    "OSMF_LEARNER__LOOP__CTR_PRODUCTS_PER_GROUP": "3",
}
"""Learner settings of the loop's rounds (short rounds, so a version goes live within minutes)."""


@dataclass
class OutcomeBook:
    """Impressions and clicks of the served creatives per (model version, group), from the events sent."""

    cells: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    _shown: dict[str, tuple[str, str]] = field(default_factory=dict)

    def note(self, event: Impression | Click) -> None:
        """Count an event under the model version and group its creative was served for."""
        if isinstance(event, Impression):
            key = (event.model_version, event.group_id or "-")
            self._shown[event.event_id] = key
            self.cells[key][0] += 1
        else:
            key = self._shown.pop(event.impression_id, None)
            if key is not None:
                self.cells[key][1] += 1

    @property
    def impressions(self) -> int:
        return sum(n for n, _ in self.cells.values())

    def groups(self) -> list[str]:
        return sorted({g for _, g in self.cells if g != "-"})

    def versions(self) -> list[str]:
        return sorted({v for v, _ in self.cells}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


@dataclass
class LoopStatus:
    """One look at the running loop (for a progress display)."""

    elapsed_s: float
    impressions: int
    groups: int
    pairs: int
    rounds: int
    promoted: int
    live_version: int | None
    fallbacks: int


class ClosedLoop:
    """Start the parts, play ``minutes`` of served traffic, stop what was started (see the module docstring).

    Parameters
    ----------
    settings
        The settings (data directory, ports, topics); the learner runs with :data:`LOOP_LEARNER_ENV` on top.
    world, world_file
        The simulated world and its file (the learner's gate judges candidates in it).
    echo
        Prints one line of progress.
    min_new_pairs, max_wait_s
        When the learner trains a round.
    """

    def __init__(self, settings: Settings, world: World, world_file: Path, *, echo: Callable[[str], None] = print,
                 min_new_pairs: int = 100, max_wait_s: float = 150.0) -> None:
        from learner.service import model_repository

        self.settings, self.world, self.world_file, self.echo = settings, world, world_file, echo
        self.min_new_pairs, self.max_wait_s = min_new_pairs, max_wait_s
        self.logs = settings.data_dir / "demo" / "logs"
        self.repo = model_repository(settings)
        self.model_name = settings.learner.loop.model_name
        self.book = OutcomeBook()
        self.chooser: Any = None
        self.client: Any = None
        self.sent = 0
        self.started = time.monotonic()
        self._processes: list[tuple[str, subprocess.Popen]] = []
        self._server = self._watcher = self._broker = False
        self._stop = threading.Event()
        self._traffic: threading.Thread | None = None

    # ------------------------------------------------------------------ start

    def start(self, seed: int = 0) -> None:
        """Broker, base model, worker, learner (publishes version 1), Triton with the watcher, the serving client."""
        from infra.broker import start_broker
        from infra.kafka import ensure_topics
        from learner.publish import latest_version
        from serving import server
        from serving.client import CreativeClient
        from serving.live import VersionManager, read_state
        from serving.watch import start_watcher
        from sim.adsystem import ServedChooser, catalogue

        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if threading.current_thread() is threading.main_thread():  # SIGTERM stops everything too, like Ctrl-C
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        status = start_broker(settings)
        self._broker = not status.external
        self.bootstrap = status.bootstrap
        ensure_topics(self.bootstrap, settings.topics.all_names(), settings.topics.partitions)
        self.echo(f"[1/6] broker ready at {self.bootstrap}")
        base = self.base_model()
        env = {"OSMF_KAFKA_BOOTSTRAP": self.bootstrap, "OSMF_STREAMS__APP_ID": f"osmf-loop-{int(time.time())}"}
        self._spawn("stream worker", ["worker", "-n", "1"], env)
        self._spawn("learner", ["learner", "run", "--base", str(base), "--world", str(self.world_file),
                                "--min-new-pairs", str(self.min_new_pairs), "--max-wait-s", str(self.max_wait_s)],
                    {**env, **LOOP_LEARNER_ENV})
        self._wait_for(lambda: latest_version(self.repo, self.model_name) is not None, 600,
                       "the learner to publish version 1", self.logs / "learner.log")
        port, token = settings.streams.metrics_port, http_token(settings.security)
        if port:  # traffic waits for the worker (Feast takes a while to import)
            self._wait_for(lambda: bool(worker_metrics(port, token)), 600, "the stream worker's metrics endpoint",
                           self.logs / "worker.log")
        self.echo(f"[3/6] stream worker and learner running (logs in {self.logs})")
        pid = server.start_server(settings)
        self._server = True
        VersionManager(settings).start()
        start_watcher(settings)
        self._watcher = True
        self.echo(f"[4/6] tritonserver pid {pid} serving version {read_state(settings).live}")
        self.client = CreativeClient(settings, catalogue(self.world), seed=seed)
        self.chooser = ServedChooser(self.world, self.client)

    def base_model(self) -> Path:
        """The loop's pre-trained base (model/ + traffic/), trained once per world file, cached under ``<data_dir>/demo``."""
        from learner.pretrain import run_pretraining
        from sim.logs import traffic_from_world

        digest = hashlib.sha256(self.world_file.read_bytes() + json.dumps(LOOP_PRETRAIN).encode()).hexdigest()[:12]
        root = self.settings.data_dir / "demo" / f"base-{digest}"
        if (root / "model" / "manifest.json").is_file() and (root / "traffic" / "log.json").is_file():
            self.echo(f"[2/6] base model: {root} (cached)")
            return root
        data = self.settings.learner.model_dump()
        data["pretrain"].update(LOOP_PRETRAIN)
        learner = LearnerSettings.model_validate(data)
        self.echo(f"[2/6] pre-training the base model ({learner.pretrain.steps} steps; about two minutes)")
        log, _ = traffic_from_world(self.world, n_impressions=learner.pretrain.impressions,
                                    seed=learner.pretrain.traffic_seed,
                                    creatives_per_product=learner.pretrain.creatives_per_product)
        run_pretraining(log, learner, root, holdout=0.0, source=f"world {self.world.name}", echo=lambda _line: None)
        self.echo(f"[2/6] base model: {root}")
        return root

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name.split()[-1]}.log", "ab")
        env = {**os.environ, "OSMF_DATA_DIR": str(self.settings.data_dir.resolve()), **env}
        process = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self._processes.append((name, process))
        return process

    @staticmethod
    def _wait_for(ready: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace").splitlines()[-5:] if log.is_file() else []
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}; last lines of {log}: "
                                   + " | ".join(tail))
            time.sleep(1.0)

    # ------------------------------------------------------------------ traffic

    def play(self, minutes: float, rate: float, seed: int = 0) -> threading.Thread:
        """Start ``minutes`` of served traffic at ``rate`` impressions/s on a thread; returns the thread."""
        from infra.producer import produce
        from sim.replay import paced
        from sim.simulate import generate_events, time_ordered

        events = generate_events(self.world, seed, duration_s=minutes * 60.0, rate=rate, chooser=self.chooser,
                                 start_ts_ms=int(time.time() * 1000))

        def noted(stream: Any) -> Any:
            for event in stream:
                if self._stop.is_set():
                    return
                self.book.note(event)
                yield event

        def run() -> None:
            self.sent = produce(self.bootstrap, noted(paced(time_ordered(events), speedup=1.0)),
                                self.settings.topics, self.settings.producer)

        self._traffic = threading.Thread(target=run, name="osmf-loop-traffic", daemon=True)
        self._traffic.start()
        return self._traffic

    def status(self) -> LoopStatus:
        """Impressions, groups, pairs, rounds, live version and fallbacks now."""
        from serving.live import read_state

        metrics = worker_metrics(self.settings.streams.metrics_port, http_token(self.settings.security))
        rounds = round_log(self.repo, self.model_name)
        return LoopStatus(
            elapsed_s=time.monotonic() - self.started, impressions=self.book.impressions,
            groups=int(metrics.get("osmf_groups", 0)), pairs=int(metrics.get("osmf_preference_pairs_total", 0)),
            rounds=len(rounds), promoted=sum(1 for r in rounds if r.get("decision") == "promoted"),
            live_version=read_state(self.settings).live,
            fallbacks=self.chooser.counts.fallbacks if self.chooser is not None else 0,
        )

    # ------------------------------------------------------------------ stop

    def stop(self) -> list[str]:
        """Stop the traffic, the client, the watcher, the processes, tritonserver and the broker; what was stopped."""
        from serving import server
        from serving.watch import stop_watcher

        self._stop.set()
        stopped: list[str] = []
        if self._traffic is not None:
            self._traffic.join(timeout=30)
        if self.client is not None:
            self.client.close()
        if self._watcher:
            stop_watcher(self.settings)
            stopped.append("watcher")
        for name, process in reversed(self._processes):
            if process.poll() is None:
                _proc.terminate(process.pid, grace_s=30.0)
            process.wait()
            stopped.append(f"{name} (pid {process.pid})")
        if self._server:
            server.stop_server(self.settings)
            stopped.append("tritonserver")
        if self._broker:
            from infra.broker import stop_broker

            stop_broker(self.settings)
            stopped.append("broker")
        return stopped


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def worker_metrics(port: int, token: str | None = None) -> dict[str, float]:
    """Sums of the worker's Prometheus samples by metric name (empty when it does not answer)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        text = urllib.request.urlopen(request, timeout=1).read().decode()
    except OSError:
        return {}
    sums: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                sums[name.split("{", 1)[0]] += float(value)
            except ValueError:
                continue
    return sums


def round_log(repo: Path, name: str) -> list[dict[str, Any]]:
    """The learner's rounds (``rounds.jsonl``), oldest first."""
    path = repo / name / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def click_to_live(settings: Settings, repo: Path, name: str) -> list[float]:
    """Per promoted round: seconds from the newest evidence of its pairs to its version going live."""
    from serving.live import read_state

    live_at: dict[int, float] = {}
    for event in read_state(settings).events:
        if event.get("event") == "live" and event.get("version") not in live_at:
            live_at[int(event["version"])] = float(event["at"])
    delays = []
    for record in round_log(repo, name):
        version = record.get("version")
        window = record.get("data_window") or (0, 0)
        if record.get("decision") == "promoted" and version in live_at and window[1]:
            delays.append(live_at[version] - window[1] / 1000.0)
    return delays
