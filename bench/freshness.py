"""Feature freshness: from producing an event to its effect being visible in Feast's get_online_features.

Simulated traffic of world A runs through broker -> ``osmf worker`` -> Feast
at a fixed rate (5,000 events/s, sent by the batching producer ``infra.producer``
with ``settings.producer``; ``--quick``: the same rate for less time), on a
fresh Tansu with isolated topics and a fresh store, once with each online
store: SQLite and Redis (Redis is skipped, and says so, when it does not
answer at ``features.redis_url``).
Every 100th event is followed by a *probe*: an impression by a user never
seen before. Its effect is that user's ``user_group`` row; a poller calls
``FeatureStore.get_online_features`` for the outstanding probes every 20 ms
and records the time from the probe's hand-off to the producer to the first
answer that has it. Worker start-up (Feast import, apply, first join) is
excluded: the clock runs only after a warm-up probe was seen. Goal: p99 <= 1 s.
``worker_cpu_share`` is the worker process's CPU seconds per second while the
probes ran: near 1 the worker (one Python process) is saturated and the
latencies are its queue, which no wait setting shortens.

To tell the stream's share from the feature path's, the probes are also
watched in the worker's ``user-groups`` changelog topic: the time a probe's
group is written there is when the stream worker *counted* it (the feature
feed submits its rows right after). ``feature_path_*`` is visible minus
counted, per probe. On a 2-core machine the stream worker needs most of a
core at 2,000 events/s; anything else running shows up as stream lag.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchOptions, print_table
from bench.streams import WORLD_A, _broker, _group_cpu_s, _isolated_env, _settings_from
from infra.security import client_options

RATE = 5_000.0
"""Events (impressions and clicks) per second."""
PROBE_EVERY = 100
"""One probe impression after this many events."""
VISIBLE_TIMEOUT_S = 15.0
SATURATED_CPU_SHARE = 0.85
"""Worker CPU (its process's CPU seconds per second, all threads) from which the table says it is saturated:
the GIL lets one Python process use about one core, less what its threads lose handing it over."""
POLL_S = 0.02
"""Pause between two polls when nothing new became visible (the resolution of the measurement)."""


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark with SQLite, then Redis; returns each store's percentiles (ms) and push counters."""
    results = {"sqlite": _measure(options, "sqlite")}
    reason = _redis_unavailable()
    results["redis"] = {"skipped": reason} if reason else _measure(options, "redis")
    measured = [r for r in results.values() if "p99_ms" in r]
    return {
        **results,
        "rate_events_per_s": RATE,
        "goal_p99_ms": 1000,
        "goal_met": bool(measured) and all(r["goal_met"] for r in measured) and len(measured) == 2,
        "quick": options.quick,
    }


def _redis_unavailable() -> str | None:
    """Why Redis cannot be measured (None: it answers)."""
    from features.store import redis_client
    from infra.settings import load_settings

    try:
        redis_client(load_settings()).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: not measured, and why
        return f"redis not reachable ({exc}); start it or set OSMF_FEATURES__REDIS_URL"
    return None


def _measure(options: BenchOptions, online_store: str) -> dict[str, Any]:
    """One freshness run against ``online_store``."""
    from infra.kafka import ensure_topics
    from infra.producer import produce
    from sim.simulate import generate_events
    from sim.world import World

    duration = 10.0 if options.quick else 45.0
    world = World.load(options.world or WORLD_A)
    ctr_guess = 0.03
    n_impressions = int(RATE * duration / (1 + ctr_guess))
    with _broker() as base, tempfile.TemporaryDirectory() as data_dir:
        env = _isolated_env(base, Path(data_dir))
        project = f"fresh_{uuid.uuid4().hex[:8]}"
        env["OSMF_FEATURES__PROJECT"] = project
        env["OSMF_FEATURES__ENABLED"] = "true"
        env["OSMF_FEATURES__ONLINE_STORE"] = online_store
        env["HF_HUB_OFFLINE"] = "1"
        settings = _settings_from(env)
        ensure_topics(settings.bootstrap_servers, settings.topics.all_names(), settings.topics.partitions)
        start_ms = int(time.time() * 1000)
        events = list(generate_events(world, seed=3, n_impressions=n_impressions, start_ts_ms=start_ms))
        options.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = options.output_dir / f"freshness-worker-{online_store}.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        probes = Probes(settings, events)

        def send(batch: Any, rate: float | None = None) -> int:
            return produce(settings.bootstrap_servers, batch, settings.topics, settings.producer, rate=rate)

        try:
            warm = probes.warm_up(send, proc, timeout_s=180)
            counted = Changelog(settings, probes)
            counted.start()
            probes.start()
            cpu_at_start, clock_at_start = _group_cpu_s(proc.pid), time.perf_counter()
            sent = send(probes.stream(events), rate=RATE)
            probes.finish(timeout_s=VISIBLE_TIMEOUT_S)
            worker_cpu_share = (_group_cpu_s(proc.pid) - cpu_at_start) / (time.perf_counter() - clock_at_start)
            counted.stop()
            counters = _push_counters(int(env["OSMF_STREAMS__METRICS_PORT"]))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            if online_store == "redis":
                _drop_redis(settings)
    latencies = np.asarray(probes.latencies) * 1000
    lost = probes.outstanding()
    pct = _percentiles(latencies)
    stream = _percentiles(np.asarray(list(counted.latency.values())) * 1000)
    path = _percentiles(np.asarray([probes.visible_at[k] - counted.seen_at[k] for k in probes.visible_at
                                    if k in counted.seen_at]) * 1000)
    print_table(
        f"freshness, ms from production ({online_store} online store, {RATE:g} events/s, "
        f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        ["until", "probes", "p50", "p95", "p99", "max"],
        [["counted by the worker (changelog)", len(counted.latency), stream[50], stream[95], stream[99], stream[100]],
         ["visible in get_online_features", len(latencies), pct[50], pct[95], pct[99], pct[100]],
         ["feature path (visible - counted)", "", path[50], path[95], path[99], path[100]]],
    )
    print(f"worker process: {worker_cpu_share:.0%} of one CPU while probes ran"
          + (" - near a full core the worker is saturated (one Python process) and latency is its queue"
             if worker_cpu_share >= SATURATED_CPU_SHARE else ""))
    return {
        "online_store": online_store,
        "events_sent": sent,
        "duration_s": duration,
        "probes": len(latencies),
        "probes_not_visible": lost,
        "p50_ms": round(pct[50], 1),
        "p95_ms": round(pct[95], 1),
        "p99_ms": round(pct[99], 1),
        "max_ms": round(pct[100], 1),
        "counted_p50_ms": round(stream[50], 1),
        "counted_p99_ms": round(stream[99], 1),
        "feature_path_p50_ms": round(path[50], 1),
        "feature_path_p99_ms": round(path[99], 1),
        "warm_up_s": round(warm, 1),
        "worker_cpu_share": round(worker_cpu_share, 3),
        "goal_met": bool(len(latencies) and pct[99] <= 1000 and lost == 0),
        **counters,
        "load_1m": round(os.getloadavg()[0], 2),
        "worker_log": str(log_path),
    }


def _percentiles(values: np.ndarray) -> dict[int, float]:
    if not len(values):
        return {q: float("nan") for q in (50, 95, 99, 100)}
    return {q: float(np.percentile(values, q)) for q in (50, 95, 99, 100)}


class Changelog:
    """Watches the worker's ``user-groups`` changelog for the probes: when each was counted."""

    def __init__(self, settings: Any, probes: Probes) -> None:
        self.topic = f"{settings.streams.app_id}-user-groups-changelog"
        self.bootstrap = settings.bootstrap_servers
        self.probes = probes
        self.latency: dict[tuple[str, str], float] = {}
        self.seen_at: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._consume()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                **client_options(),
                                    fetch_max_wait_ms=20)
        await consumer.start()
        try:
            partitions = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or []]
            if not partitions:
                await consumer.force_metadata_update()
                partitions = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or []]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=50)
                now = time.perf_counter()
                for records in batch.values():
                    for record in records:
                        category, _, user = json.loads(record.key).partition("|")
                        sent = self.probes.sent.get((user, category))
                        if sent is not None and (user, category) not in self.seen_at:
                            self.seen_at[(user, category)] = now
                            self.latency[(user, category)] = now - sent
        finally:
            await consumer.stop()


class Probes:
    """Inserts probe impressions into the stream and polls the online store until each is visible."""

    def __init__(self, settings: Any, events: list[Any]) -> None:
        from infra.contracts.events import Impression

        self.settings = settings
        self.template = next(e for e in events if isinstance(e, Impression))
        self.tag = uuid.uuid4().hex[:6]
        self.sent: dict[tuple[str, str], float] = {}
        self.latencies: list[float] = []
        self.visible_at: dict[tuple[str, str], float] = {}
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0
        self._store: Any = None

    def probe(self, ts: int) -> Any:
        """A new probe impression (a user never seen before), registered as sent now."""
        self._count += 1
        user = f"probe-{self.tag}-{self._count}"
        event = self.template.model_copy(update={"event_id": f"probe-{self.tag}-{self._count}", "user_id": user,
                                                 "ts": ts})
        with self._lock:
            self.sent[(user, event.category)] = time.perf_counter()
        return event

    def stream(self, events: list[Any]) -> Any:
        """``events`` with a probe after every ``PROBE_EVERY``-th; a probe's clock starts when it is handed on."""
        for i, event in enumerate(events, 1):
            yield event
            if i % PROBE_EVERY == 0:
                yield self.probe(int(time.time() * 1000))

    def warm_up(self, produce: Any, proc: subprocess.Popen, timeout_s: float) -> float:
        """Send probes until one is visible (worker up, store applied); returns the seconds it took."""
        start = time.perf_counter()
        self._open()
        while time.perf_counter() - start < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with status {proc.returncode}")
            produce([self.probe(int(time.time() * 1000))])
            deadline = time.perf_counter() + 3
            while time.perf_counter() < deadline:
                if self._poll_once():
                    with self._lock:
                        self.sent.clear()
                        self.latencies.clear()
                        self.visible_at.clear()
                    return time.perf_counter() - start
                time.sleep(0.1)
        raise RuntimeError(f"no probe became visible within {timeout_s:.0f} s; see the worker log")

    def start(self) -> None:
        """Poll in the background."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def finish(self, timeout_s: float) -> None:
        """Wait until every probe is visible or ``timeout_s`` passed; stop polling."""
        deadline = time.perf_counter() + timeout_s
        while self.outstanding() and time.perf_counter() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def outstanding(self) -> int:
        with self._lock:
            return len(self.sent) - len(self._seen & set(self.sent))

    def _open(self) -> None:
        from features.store import open_store

        self._store = open_store(self.settings)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll_once()
            time.sleep(POLL_S)

    def _poll_once(self) -> bool:
        """One get_online_features call for the outstanding probes; True when some became visible."""
        with self._lock:
            waiting = [k for k in self.sent if k not in self._seen]
        if not waiting:
            return False
        try:
            response = self._store.get_online_features(
                features=["user_group:group_id"],
                entity_rows=[{"user_id": user, "category": category} for user, category in waiting],
            ).to_dict()
        except Exception:  # noqa: BLE001 - the registry may not exist yet during warm-up
            return False
        now = time.perf_counter()
        found = False
        with self._lock:
            for key, group in zip(waiting, response["group_id"]):
                if group:
                    self._seen.add(key)
                    self.latencies.append(now - self.sent[key])
                    self.visible_at[key] = now
                    found = True
        return found


def _push_counters(port: int) -> dict[str, Any]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, flags=re.M))

    def stage(name: str, stage: str) -> float:
        found = re.search(rf'^{name}\{{stage="{stage}"\}} ([0-9.e+]+)$', text, flags=re.M)
        return float(found.group(1)) if found else 0.0

    return {
        **{f"{s}_{what}": round(stage(metric, s), 3) for s in ("ingest", "aggregate")
           for what, metric in (("batches", "osmf_stage_seconds_count"), ("stage_s", "osmf_stage_seconds_sum"),
                                ("wait_s", "osmf_delivery_wait_seconds_sum"))},
        "rows_pushed": int(total("osmf_feature_rows_pushed_total")),
        "failed_pushes": int(total("osmf_feature_push_failures_total")),
        "rows_dropped": int(total("osmf_feature_rows_dropped_total")),
        "stream_submit_seconds": round(total("osmf_feature_submit_seconds_sum"), 3),
    }


def _drop_redis(settings: Any) -> None:
    from features.store import redis_client

    client = redis_client(settings)
    project = settings.features.project
    doomed = [k for k in client.scan_iter(count=1000) if k.endswith(project.encode())
              or k.startswith(f"osmf:{project}:".encode())]
    for start in range(0, len(doomed), 500):
        client.delete(*doomed[start : start + 500])

