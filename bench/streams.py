"""Stream worker throughput: single-event against batched messages, the framework-free ceiling, two workers.

One run, the same simulated events, produced twice on a fresh broker: once one
event per Kafka message (as a plain producer sends them) and once batched per
partition (``infra.producer``, ``settings.producer``). Then:

a. a plain aiokafka consumer reads the batched topics (messages/s, events/s)
   and the single-event topics;
b. the worker's own stage code (:mod:`streams.stages`: decode, validate,
   dedupe, attribute, group, count) driven by a plain aiokafka loop, no
   framework, with the collector set as in a worker
   (:func:`streams.worker.tune_gc`): the ceiling for this code;
c. ``osmf worker`` on the single-event topics;
d. ``osmf worker`` on the batched topics;
e. ``osmf worker -n 2`` on the batched topics.

Worker rates run from the first micro-batch stage 1 began
(``osmf_batches_started_total``) to the last event counted (read from the
workers' metrics), so start-up and group join are left out (counting from the
first impression *counted* left out the first batches, whose size grows with
how much the worker takes at once, and overstated the rate);
(a) and (b) run from their first fetch. Features are off in the workers (the
stream alone; ``osmf bench freshness`` covers the feature path).

For each worker path the bench also records the share of the machine's CPU
that was busy while it counted (``machine_busy``, every process) and the
events per CPU second of the worker's own processes
(``events_per_worker_cpu_s``). ``worker_cpu_efficiency_2`` is (e)'s over (d)'s:
near 1, two workers waste nothing on each other, so where ``scale_2`` stays
low with the machine near 100 % busy, the cores, not the worker, are the limit.
``counting_workers`` is how many workers' stage 2 counted anything: a category
is counted on one worker, so with (e) at 1 every category landed on the same
one and the second worker shares stage 1 only.

The bench polls the workers' ``/metrics`` for only the series it reads and
takes the end of each worker path from ``osmf_last_batch_timestamp_seconds``
(stage 2's last batch), not from the poll that saw the last count.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import BenchOptions, print_table
from infra.security import client_options
from infra.settings import Settings, load_settings

WORLD_A = Path(__file__).resolve().parents[1] / "sim" / "examples" / "world_a.yaml"
IMPRESSIONS, QUICK_IMPRESSIONS = 60_000, 5_000
"""Impressions simulated per run (the events add their clicks), full and ``--quick``."""
GOALS = {"ratio_batched_vs_single": 5.0, "ratio_vs_ceiling": 0.5, "scale_2": 1.6}
METRICS_QUERY = "?" + "&".join(f"name[]={name}" for name in (
    "osmf_batches_started_total", "osmf_counted_total", "osmf_last_batch_timestamp_seconds"))
"""Only the series the bench reads: a full scrape every 50 ms cost the worker under measurement ~9 % of its
samples (py-spy: the metrics thread's exposition of every series, a thread per request)."""
START_POLL_S, POLL_S = 0.05, 0.1
"""Poll interval until stage 1 begins (the start of the clock), then while it runs (the end is read from
``osmf_last_batch_timestamp_seconds``, so polling less often costs the measurement nothing)."""


@dataclass(frozen=True)
class StreamsOptions(BenchOptions):
    """:class:`BenchOptions` plus ``impressions`` (``None``: 60,000, or 5,000 with ``quick``)."""

    impressions: int | None = None


@dataclass(frozen=True)
class Rate:
    """What one path read: events (and Kafka messages) per second; for a worker, the CPU it had."""

    events_per_s: float
    messages_per_s: float | None = None
    machine_busy: float | None = None
    """Share of all the machine's CPU time that was busy (any process) while the worker counted."""
    events_per_worker_cpu_s: float | None = None
    """Events per CPU second spent by the worker's processes: its efficiency, whatever else runs."""
    counting_workers: int | None = None
    """Workers whose stage 2 counted anything (categories live on one worker each)."""

    def as_dict(self) -> dict[str, float]:
        out = {"events_per_s": round(self.events_per_s, 1)}
        if self.messages_per_s is not None:
            out["messages_per_s"] = round(self.messages_per_s, 1)
        if self.machine_busy is not None:
            out["machine_busy"] = round(self.machine_busy, 3)
        if self.events_per_worker_cpu_s is not None:
            out["events_per_worker_cpu_s"] = round(self.events_per_worker_cpu_s, 1)
        if self.counting_workers is not None:
            out["counting_workers"] = self.counting_workers
        return out


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns each path's rate and the three ratios against their goals."""
    from infra.contracts.events import Impression
    from infra.kafka import ensure_topics, produce_events
    from infra.producer import produce
    from sim.simulate import generate_events
    from sim.world import World

    chosen = options.impressions if isinstance(options, StreamsOptions) else None
    n_impressions = chosen or (QUICK_IMPRESSIONS if options.quick else IMPRESSIONS)
    world = World.load(options.world or WORLD_A)
    events = list(generate_events(world, seed=1, n_impressions=n_impressions))
    n_events = len(events)
    n_clicks = sum(1 for e in events if not isinstance(e, Impression))
    with _broker() as base, tempfile.TemporaryDirectory() as data_dir:
        single_env = _isolated_env(base, Path(data_dir))
        batched_env = _isolated_env(base, Path(data_dir))
        single, batched = _settings_from(single_env), _settings_from(batched_env)
        for settings in (single, batched):
            ensure_topics(settings.bootstrap_servers, settings.topics.all_names(), settings.topics.partitions)
        produce_events(single.bootstrap_servers, events, single.topics)
        produce(batched.bootstrap_servers, events, batched.topics, batched.producer)
        raw_single = asyncio.run(_raw_consume_rate(single, n_events))
        raw = asyncio.run(_raw_consume_rate(batched, n_events))
        with _worker_gc():
            ceiling = asyncio.run(_ceiling_rate(batched, n_impressions, n_clicks))
        worker_single = _worker_rate(single_env, n_impressions, n_clicks, workers=1)
        worker_batched = _worker_rate(batched_env, n_impressions, n_clicks, workers=1)
        worker_n2 = _worker_rate(batched_env, n_impressions, n_clicks, workers=2)
    ratios = {
        "ratio_batched_vs_single": worker_batched.events_per_s / worker_single.events_per_s,
        "ratio_vs_ceiling": worker_batched.events_per_s / ceiling.events_per_s,
        "scale_2": worker_n2.events_per_s / worker_batched.events_per_s,
    }
    workers = {"(c) osmf worker, single-event messages": worker_single, "(d) osmf worker, batched messages": worker_batched,
               "(e) osmf worker -n 2, batched messages": worker_n2}
    print_table(
        f"stream throughput, {n_events} events (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        ["path", "messages/s", "events/s", "machine CPU busy", "events / worker CPU s", "workers counting"],
        [
            ["(a) plain aiokafka consumer, single-event messages", raw_single.messages_per_s, raw_single.events_per_s,
             "", "", ""],
            ["(a) plain aiokafka consumer, batched messages", raw.messages_per_s, raw.events_per_s, "", "", ""],
            ["(b) stage code in a plain aiokafka loop (ceiling)", "", ceiling.events_per_s, "", "", ""],
            *[[path, "", rate.events_per_s, _share(rate.machine_busy), rate.events_per_worker_cpu_s or "",
               rate.counting_workers] for path, rate in workers.items()],
        ],
    )
    print_table(
        "ratios", ["ratio", "value", "goal"],
        [[name, value, f">= {GOALS[name]:g}"] for name, value in ratios.items()],
    )
    return {
        "events": n_events,
        "producer": batched.producer.model_dump(),
        "raw_consume_single": raw_single.as_dict(),
        "raw_consume": raw.as_dict(),
        "stage_ceiling": ceiling.as_dict(),
        "worker_single": worker_single.as_dict(),
        "worker_batched": worker_batched.as_dict(),
        "worker_batched_n2": worker_n2.as_dict(),
        **{name: round(value, 3) for name, value in ratios.items()},
        "worker_cpu_efficiency_2": _ratio(worker_n2.events_per_worker_cpu_s, worker_batched.events_per_worker_cpu_s),
        "goals": GOALS,
        "goals_met": {name: ratios[name] >= goal for name, goal in GOALS.items()},
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "quick": options.quick,
    }


def _share(value: float | None) -> str:
    """A share as a percentage, blank where unknown."""
    return f"{value:.0%}" if value is not None else ""


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to 3 places, ``None`` where either is unknown."""
    return round(a / b, 3) if a and b else None


def _event_partitions(settings: Settings) -> list[Any]:
    from aiokafka import TopicPartition

    return [
        TopicPartition(topic, p)
        for topic in (settings.topics.impressions, settings.topics.clicks)
        for p in range(settings.topics.partitions)
    ]


async def _raw_consume_rate(settings: Settings, n_events: int) -> Rate:
    """A plain aiokafka consumer (partitions assigned directly) reading both topics until every event is in."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                **client_options(),
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        partitions = _event_partitions(settings)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = None
        messages, start = 0, time.perf_counter()
        while ends is None or [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            messages += sum(len(records) for records in batch.values())
            if ends is None and all(consumer.highwater(tp) is not None for tp in partitions):
                ends = {tp: consumer.highwater(tp) for tp in partitions}
        seconds = time.perf_counter() - start
    finally:
        await consumer.stop()
    return Rate(n_events / seconds, messages / seconds)


async def _ceiling_rate(settings: Settings, n_impressions: int, n_clicks: int) -> Rate:
    """The worker's stage code over dicts, fed by a plain aiokafka loop; until every event is counted."""
    from aiokafka import AIOKafkaConsumer

    from streams.aggregate import OutcomeBatch
    from streams.stages import build_stages, collect_outcomes, ingest_partition, journal_aggregate

    stages = build_stages(settings, lambda name, partitions: {})
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                **client_options(),
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    try:
        partitions = _event_partitions(settings)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        start = None
        counters = stages.aggregate.counters
        while counters.impressions < n_impressions or counters.clicks < n_clicks:
            batch = await consumer.getmany(timeout_ms=1000, max_records=settings.streams.batch_size)
            if not batch:
                continue
            start = start or time.perf_counter()
            by_partition: dict[int, list[bytes]] = defaultdict(list)
            for tp, records in batch.items():
                by_partition[tp.partition].extend(r.value for r in records)
            outcomes: dict[str, OutcomeBatch] = defaultdict(OutcomeBatch)
            for partition, values in by_partition.items():
                collect_outcomes(ingest_partition(stages, partition, values), outcomes)
            for category, outcome in outcomes.items():
                stages.aggregate.apply(category, OutcomeBatch.from_bytes(outcome.to_bytes()))
                journal_aggregate(stages, 0, stages.aggregate.watermark(category))
        seconds = time.perf_counter() - (start or time.perf_counter())
    finally:
        await consumer.stop()
    return Rate((n_impressions + n_clicks) / seconds)


@contextmanager
def _worker_gc() -> Iterator[None]:
    """The collector as a worker process sets it (:func:`streams.worker.tune_gc`), then as it was: the
    ceiling runs the stage code under the same process settings as the worker."""
    import gc

    from streams.worker import tune_gc

    thresholds = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _worker_rate(env: dict[str, str], n_impressions: int, n_clicks: int, workers: int) -> Rate:
    """``osmf worker -n workers`` with a fresh consumer group over the topics of ``env``."""
    port = _free_port_block(workers)
    env = {**env, "OSMF_STREAMS__APP_ID": f"osmf-bench-{uuid.uuid4().hex[:8]}",
           "OSMF_STREAMS__METRICS_PORT": str(port), "OSMF_FEATURES__ENABLED": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker", "-n", str(workers)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        first = None
        machine_at_first, worker_at_first = _machine_cpu(), 0.0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with status {proc.returncode}")
            progress = _progress(range(port, port + workers))
            if progress.started and first is None:
                first = time.time()
                machine_at_first, worker_at_first = _machine_cpu(), _group_cpu_s(proc.pid)
            if progress.impressions >= n_impressions and progress.clicks >= n_clicks:
                seconds = progress.last_counted_at - (first or progress.last_counted_at)
                busy, total = (now - then for now, then in zip(_machine_cpu(), machine_at_first))
                worker_cpu_s = _group_cpu_s(proc.pid) - worker_at_first
                n_events = n_impressions + n_clicks
                return Rate(
                    n_events / seconds if seconds > 0 else float("inf"),
                    machine_busy=busy / total if total > 0 else None,
                    events_per_worker_cpu_s=n_events / worker_cpu_s if worker_cpu_s > 0 else None,
                    counting_workers=progress.counting_workers,
                )
            time.sleep(START_POLL_S if first is None else POLL_S)
        raise RuntimeError("the worker did not count every event within 600 s")
    finally:
        _stop_group(proc)


def _machine_cpu() -> tuple[float, float]:
    """All CPUs' busy and total seconds since boot (idle and I/O wait count as not busy)."""
    import psutil

    times = psutil.cpu_times()
    total = sum(times)
    return total - times.idle - getattr(times, "iowait", 0.0), total


def _group_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a running process and its children, so far."""
    import psutil

    seconds = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                seconds += times.user + times.system
    return seconds


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group (``-n 2`` has children); SIGKILL it after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass(frozen=True)
class Progress:
    """What the workers' metrics show at one poll."""

    started: int
    """Stage-1 micro-batches begun, over the workers."""
    impressions: int
    clicks: int
    """Impressions and clicks counted by stage 2, over the workers."""
    last_counted_at: float
    """Unix time stage 2 last finished a batch, latest over the workers (0 before any)."""
    counting_workers: int
    """Workers that counted anything: how many share stage 2 (one per category at most)."""


def _progress(ports: Iterable[int]) -> Progress:
    """Read :class:`Progress` from the workers' ``/metrics``, only the series it needs (:data:`METRICS_QUERY`)."""
    started = impressions = clicks = counting = 0
    last_counted_at = 0.0
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics{METRICS_QUERY}", timeout=2).read().decode()
        except OSError:
            continue
        values = dict(re.findall(r'^osmf_counted_total\{kind="(\w+)"\} ([0-9.e+]+)$', text, flags=re.M))
        counted = int(float(values.get("impression", 0))), int(float(values.get("click", 0)))
        impressions, clicks, counting = impressions + counted[0], clicks + counted[1], counting + (sum(counted) > 0)
        begun = re.search(r'^osmf_batches_started_total\{stage="ingest"\} ([0-9.e+]+)$', text, flags=re.M)
        started += int(float(begun.group(1))) if begun else 0
        last = re.search(r'^osmf_last_batch_timestamp_seconds\{stage="aggregate"\} ([0-9.e+]+)$', text, flags=re.M)
        last_counted_at = max(last_counted_at, float(last.group(1)) if last else 0.0)
    return Progress(started, impressions, clicks, last_counted_at, counting)


@contextmanager
def _broker() -> Iterator[Settings]:
    """The configured external Kafka, or a fresh embedded Tansu in a temporary directory."""
    from infra.broker import start_broker, stop_broker

    settings = load_settings()
    if settings.uses_external_kafka:
        yield settings
        return
    with tempfile.TemporaryDirectory() as data_dir:
        own = load_settings(data_dir=Path(data_dir), broker={"port": _free_port()})
        start_broker(own)
        try:
            yield own
        finally:
            stop_broker(own)


def _isolated_env(base: Settings, data_dir: Path) -> dict[str, str]:
    run_id = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "OSMF_KAFKA_BOOTSTRAP": base.bootstrap_servers,
        "OSMF_DATA_DIR": str(data_dir),
        "OSMF_STREAMS__APP_ID": f"osmf-bench-{run_id}",
        "OSMF_STREAMS__METRICS_PORT": str(_free_port()),
        "OSMF_STREAMS__SESSION_TIMEOUT_S": "6",
    }
    for topic in ("impressions", "clicks", "preference_pairs", "dead_letter", "drift_alerts"):
        env[f"OSMF_TOPICS__{topic.upper()}"] = f"bench-{run_id}.{topic}"
    env.pop("OSMF_CONFIG", None)
    return env


def _settings_from(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_block(count: int) -> int:
    """A port p with p .. p+count-1 free (worker i serves metrics on p + i - 1)."""
    for _ in range(100):
        port = _free_port()
        if port + count <= 65535 and all(_is_free(port + i) for i in range(count)):
            return port
    raise RuntimeError(f"no block of {count} free ports found")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
