"""kill -9 the broker (durable s3 storage) mid-run and restart it: nothing lost, everyone reconnects by itself."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from faults._support import START_TS_MS, WORLD_A, listening_addresses, wait_until
from helpers.worker_harness import expected_counts, isolated_run, table_counts
from infra import broker, s3store
from infra.contracts.events import decode_message
from infra.contracts.messages import parse_pair
from infra.kafka import TopicFollower, consume_all
from infra.producer import EventProducer
from infra.settings import load_settings
from sim.simulate import generate_events
from sim.world import World

pytestmark = [pytest.mark.slow]


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_block(count: int) -> int:
    """First port of ``count`` consecutive free ports (SeaweedFS takes P .. P+7)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(20_000, 40_000)
        if all(_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no block of free ports")


@pytest.fixture
def durable_broker(tmp_path: Path):
    data_dir = tmp_path / "broker"
    settings = load_settings(
        data_dir=data_dir, kafka_bootstrap=None,
        broker={"port": _free_block(1), "storage": "s3", "s3_port": _free_block(8), "start_timeout_s": 60},
    )
    broker.start_broker(settings)
    try:
        yield settings
    finally:
        broker.stop_broker(settings)


def _tansu_pid(settings) -> int:  # noqa: ANN001
    return int((broker.broker_dir(settings) / "tansu.pid").read_text().strip())


def _event_ids(bootstrap: str, topics: list[str]) -> list[str]:
    ids = []
    for record in consume_all(bootstrap, topics, timeout_s=60):
        ids.extend(e.event_id for e in decode_message(record.value) if hasattr(e, "event_id"))
    return ids


def test_broker_killed_with_s3_storage_loses_nothing_and_clients_reconnect(durable_broker, tmp_path: Path) -> None:
    settings = durable_broker
    tansu = _tansu_pid(settings)
    assert listening_addresses(tansu) == {"127.0.0.1"}
    weed = s3store.s3_status(settings).pid
    assert weed is not None and listening_addresses(weed) == {"127.0.0.1"}, "SeaweedFS binds loopback only"

    world = World.load(WORLD_A)
    events = list(generate_events(world, seed=31, n_impressions=4000, start_ts_ms=START_TS_MS))
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    (tmp_path / "worker").mkdir()
    run = isolated_run(settings, tmp_path / "worker", min_pair_impressions=30)
    topics = run.settings.topics
    bootstrap = run.settings.bootstrap_servers
    try:
        with EventProducer(bootstrap, topics, run.settings.producer, timeout_s=120) as out:
            for event in first:
                out.send(event)
            out.flush()
        run.start()
        worker_pid = run.procs[0].pid
        run.wait_for(lambda: table_counts(run.table("ctr")) == (expected_counts(first).impressions,
                                                                 expected_counts(first).clicks),
                     timeout_s=180, what="first half counted")
        follower = TopicFollower(bootstrap, [topics.preference_pairs])  # what the learner service reads with
        seen_pairs: set[str] = set()
        stop = threading.Event()
        errors: list[str] = []

        def follow() -> None:
            while not stop.is_set():
                try:
                    seen_pairs.update(parse_pair(r.value).pair_id for r in follower.poll(timeout_s=0.5))
                except Exception as exc:  # noqa: BLE001 - recorded: a follower that gives up fails the test
                    errors.append(repr(exc))
                    time.sleep(0.5)

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()

        # The producer sends the second half while the broker dies and comes back; flush must see every ack.
        producer = EventProducer(bootstrap, topics, run.settings.producer, timeout_s=120)
        for event in second[: len(second) // 2]:
            producer.send(event)
        os.kill(tansu, signal.SIGKILL)
        wait_until(lambda: not broker.kafka_reachable(bootstrap, timeout_s=0.5), 30, "the broker to be gone")
        for event in second[len(second) // 2 :]:
            producer.send(event)  # queued while the broker is down
        time.sleep(3)
        status = broker.start_broker(settings)
        assert status.running and status.pid != tansu
        producer.flush()  # retried until acknowledged by the restarted broker
        producer.close()
        assert producer.events_sent == len(second)

        expected = expected_counts(events)
        run.wait_for(lambda: table_counts(run.table("ctr")) == (expected.impressions, expected.clicks),
                     timeout_s=240, what="every event counted after the broker restart")
        impressions, clicks = table_counts(run.table("ctr"))
        assert impressions == expected.impressions and clicks == expected.clicks
        assert sum(impressions.values()) == 4000
        assert run.procs[0].pid == worker_pid and run.procs[0].poll() is None, "the same worker reconnected"

        # Nothing lost on the broker: every produced event id is stored (a retried send may store a copy).
        stored = _event_ids(bootstrap, [topics.impressions, topics.clicks])
        assert set(stored) == {e.event_id for e in events}

        pairs = {parse_pair(r.value).pair_id for r in consume_all(bootstrap, [topics.preference_pairs])}
        assert pairs, "pairs were mined"
        wait_until(lambda: seen_pairs >= pairs, 60, "the follower to read every pair after the restart")
        stop.set()
        reader.join(timeout=10)
        follower.close()
        assert seen_pairs == pairs
    finally:
        run.stop()
