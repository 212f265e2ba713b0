"""Feast's Redis online store stopped for 30 s: the stream keeps counting, rows are kept and written once it is back.

The test starts its OWN redis-server on a free port (never the machine's
Redis at 6379, which other tests use) and stops it with SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from faults._support import START_TS_MS, WORLD_A, metric, scrape, wait_until
from helpers.worker_harness import expected_counts, free_port, isolated_run, table_counts
from infra.contracts.events import Impression
from infra.kafka import produce_events
from sim.simulate import generate_events
from sim.world import World

pytestmark = [pytest.mark.broker, pytest.mark.slow]

OUTAGE_S = float(os.environ.get("OSMF_FAULT_REDIS_OUTAGE_S", "30"))


class OwnRedis:
    """A redis-server of this test on a free loopback port, with an append-only file so a stop keeps the data."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("OSMF_REQUIRE_SERVICES") == "1":
                pytest.fail("OSMF_REQUIRE_SERVICES=1 but redis-server is not installed (apt-get install redis-server)")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "yes"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(self.ping, 30, f"redis-server on port {self.port}", poll_s=0.1)

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


def test_redis_stopped_30s_stream_keeps_going_and_rows_are_written_when_back(broker_settings, tmp_path: Path) -> None:
    redis_server = OwnRedis(tmp_path / "redis")
    redis_server.start()
    world = World.load(WORLD_A)
    events = list(generate_events(world, seed=51, n_impressions=3000, start_ts_ms=START_TS_MS))
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    project = f"fault{uuid.uuid4().hex[:8]}"
    run = isolated_run(broker_settings, tmp_path, features={
        "online_store": "redis", "redis_url": redis_server.url, "project": project, "embed_titles": "false",
        "push_retries": "1", "push_retry_backoff_s": "0.2",
    })
    port = run.settings.streams.metrics_port
    try:
        run.start()
        bootstrap, topics = run.settings.bootstrap_servers, run.settings.topics
        produce_events(bootstrap, first, topics)
        wait_until(lambda: metric(scrape(port), "osmf_feature_rows_pushed_total", view="user_group") > 0, 180,
                   "first feature rows in Redis")
        redis_server.stop()
        stopped_at = time.monotonic()
        produce_events(bootstrap, second, topics)
        expected = expected_counts(events)
        # The stream keeps going while Redis is down: every event counted before Redis comes back.
        run.wait_for(lambda: table_counts(run.table("ctr")) == (expected.impressions, expected.clicks),
                     timeout_s=max(5.0, OUTAGE_S - 3), what="all events counted while Redis is down")
        # Failed pushes are counted (redis-py's own connection retries make each failure take seconds).
        wait_until(lambda: metric(scrape(port), "osmf_feature_push_failures_total") > 0,
                   max(1.0, OUTAGE_S - 1 - (time.monotonic() - stopped_at)), "a failed push to be counted")
        assert redis_server.proc is None and not redis_server.ping(), "Redis was down the whole time"
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
        redis_server.start()

        # Back: the kept rows are written. Every user the worker grouped resolves to that group in Redis.
        groups = run.table("user-groups")
        by_category: dict[str, dict[str, str]] = {}
        for key, group in groups.items():
            category, user = key.split("|", 1)
            by_category.setdefault(category, {})[user] = group
        from features.read import FeatureReader

        def all_resolved() -> bool:
            reader = FeatureReader(run.settings)
            try:
                for category, users in by_category.items():
                    ids = sorted(users)
                    if reader.resolve_groups(ids, category) != [users[u] for u in ids]:
                        return False
                return True
            finally:
                reader.close()

        run.wait_for(all_resolved, timeout_s=120, what="every user's group in Redis after the outage")
        after = scrape(port)
        dropped = metric(after, "osmf_feature_rows_dropped_total")
        print(f"redis outage {OUTAGE_S:g}s: push failures {metric(after, 'osmf_feature_push_failures_total'):g}, "
              f"rows dropped {dropped:g}, users resolved {len(groups)}")
        assert dropped == 0, "no feature row was dropped (the queue held them)"
        assert len(groups) == len({(e.category, e.user_id) for e in events if isinstance(e, Impression)})
    finally:
        run.stop()
        redis_server.stop()
