"""Stream worker throughput beside raw aiokafka consumption of the same topic, in one run.

Produces N simulated events, then measures (a) a plain aiokafka consumer group
reading them and (b) the full `osmf worker` pipeline (validate, dedupe, group,
attribute, count) until every event is reflected in its CTR tables. Startup and
group-join time are excluded from both rates: the clock starts at the first
fetch (a) or the first impression counted (b).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import Progress

from bench.common import BenchOptions, print_table
from infra.settings import Settings, load_settings

WORLD_A = Path(__file__).resolve().parents[1] / "sim" / "examples" / "world_a.yaml"


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns events/s of both paths and their ratio."""
    from sim.simulate import generate_events
    from sim.world import World
    from infra.contracts.events import Impression
    from infra.kafka import ensure_topics, produce_events

    n_impressions = 5_000 if options.quick else 40_000
    world = World.load(options.world or WORLD_A)
    with _broker() as base, tempfile.TemporaryDirectory() as data_dir:
        env = _isolated_env(base, Path(data_dir))
        settings = _settings_from(env)
        ensure_topics(settings.bootstrap_servers, settings.topics.all_names(), settings.topics.partitions)
        events = list(generate_events(world, seed=1, n_impressions=n_impressions))
        n_events = len(events)
        n_clicks = sum(1 for e in events if not isinstance(e, Impression))
        produce_events(settings.bootstrap_servers, events, settings.topics)
        raw_rate = asyncio.run(_raw_consume_rate(settings, n_events))
        worker_rate = _worker_rate(env, settings, n_impressions, n_clicks)
    ratio = worker_rate / raw_rate if raw_rate else 0.0
    print_table(
        "stream throughput (events/s)",
        ["path", "events", "events/s"],
        [["raw aiokafka consumer group", n_events, raw_rate], ["osmf worker pipeline", n_events, worker_rate]],
    )
    return {
        "events": n_events,
        "raw_events_per_s": round(raw_rate, 1),
        "worker_events_per_s": round(worker_rate, 1),
        "ratio": round(ratio, 4),
        "goal_ratio": 0.25,
        "quick": options.quick,
    }


async def _raw_consume_rate(settings: Settings, n_events: int) -> float:
    """Events/s of a plain aiokafka consumer reading both topics from the start (partitions assigned directly)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in (settings.topics.impressions, settings.topics.clicks)
            for p in range(settings.topics.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen, start = 0, time.perf_counter()
        while seen < n_events:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            seen += sum(len(records) for records in batch.values())
        return n_events / (time.perf_counter() - start)
    finally:
        await consumer.stop()


def _worker_rate(env: dict[str, str], settings: Settings, n_impressions: int, n_clicks: int) -> float:
    port = int(env["OSMF_STREAMS__METRICS_PORT"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        first = None
        with Progress(transient=True) as progress:
            task = progress.add_task("worker counting", total=n_impressions)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"the worker exited with status {proc.returncode}")
                impressions, clicks = _counted(port)
                if impressions and first is None:
                    first = time.perf_counter()
                progress.update(task, completed=impressions)
                if impressions >= n_impressions and clicks >= n_clicks:
                    return (n_impressions + n_clicks) / (time.perf_counter() - (first or time.perf_counter()))
                time.sleep(0.05)
        raise RuntimeError("the worker did not count every event within 600 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _counted(port: int) -> tuple[int, int]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0, 0
    values = dict(re.findall(r'^osmf_counted_total\{kind="(\w+)"\} ([0-9.e+]+)$', text, flags=re.M))
    return int(float(values.get("impression", 0))), int(float(values.get("click", 0)))


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
