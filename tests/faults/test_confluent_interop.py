"""Interoperability: confluent-kafka (librdkafka) produces to and consumes from the project's topics.

Client settings for the embedded broker (README "Standard Kafka clients"): ``partitioner: murmur2_random``
(the Java client's partitioner, which the project's producers use, so a user's events share a partition
whoever sends them) and, for consumer groups, ``session.timeout.ms: 6000`` (first message after ~3 s instead
of ~23 s with librdkafka's default 45 s).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from faults._support import START_TS_MS, WORLD_A
from helpers.worker_harness import expected_counts, isolated_run, table_counts
from infra.contracts.events import Impression, to_bytes
from infra.contracts.messages import parse_dead_letter
from infra.producer import partition_for
from infra.security import confluent_options
from sim.simulate import generate_events
from sim.world import World

confluent_kafka = pytest.importorskip("confluent_kafka")
pytestmark = [pytest.mark.broker, pytest.mark.slow]

N_BAD = 50


def _consume(bootstrap: str, topic: str, expected: int, conf_extra: dict[str, str], timeout_s: float = 120):
    """Read ``expected`` records of ``topic`` with a librdkafka consumer *group*; returns them and the wait for the first."""
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"interop-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "enable.auto.commit": False, **conf_extra,
    })
    consumer.subscribe([topic])
    out, started, first_after = [], time.monotonic(), None
    try:
        while len(out) < expected and time.monotonic() - started < timeout_s:
            message = consumer.poll(1.0)
            if message is None:
                continue
            assert message.error() is None, message.error()
            first_after = first_after if first_after is not None else time.monotonic() - started
            out.append(message)
    finally:
        consumer.close()
    return out, first_after


def test_confluent_kafka_producer_and_consumer_on_the_project_topics(broker_settings, tmp_path: Path) -> None:
    world = World.load(WORLD_A)
    events = list(generate_events(world, seed=61, n_impressions=2000, start_ts_ms=START_TS_MS))
    expected = expected_counts(events)
    run = isolated_run(broker_settings, tmp_path)
    bootstrap, topics = run.settings.bootstrap_servers, run.settings.topics
    security = confluent_options(run.settings.security.kafka)
    try:
        run.start()
        producer = confluent_kafka.Producer({
            "bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all",
            "linger.ms": 5, **security,
        })
        delivered: list[tuple[str, int]] = []
        failed: list[str] = []

        misplaced: list[str] = []

        def report(err, msg, want: int | None = None) -> None:  # noqa: ANN001
            if err is not None:
                failed.append(str(err))
                return
            delivered.append((msg.topic(), msg.partition()))
            if want is not None and msg.partition() != want:
                misplaced.append(msg.key().decode())

        for e in events:
            topic = topics.impressions if isinstance(e, Impression) else topics.clicks
            want = partition_for(e.user_id, run.settings.topics.partitions)
            producer.produce(topic, key=e.user_id.encode(), value=to_bytes(e),
                             on_delivery=lambda err, msg, want=want: report(err, msg, want))
            producer.poll(0)
        for i in range(N_BAD):
            producer.produce(topics.impressions, key=b"u-bad", value=json.dumps({"event_id": f"cb-{i}"}).encode(),
                             on_delivery=report)
        assert producer.flush(60) == 0
        assert failed == [] and len(delivered) == len(events) + N_BAD
        assert misplaced == [], "murmur2_random puts every user where the project's producers put it"

        run.wait_for(lambda: table_counts(run.table("ctr")) == (expected.impressions, expected.clicks),
                     timeout_s=180, what="confluent-kafka's events counted exactly")
        impressions, clicks = table_counts(run.table("ctr"))
        assert impressions == expected.impressions and clicks == expected.clicks

        letters, first_after = _consume(bootstrap, topics.dead_letter, N_BAD, security)
        assert len(letters) == N_BAD
        parsed = [parse_dead_letter(m.value()) for m in letters]
        assert all(letter.source_topic == topics.impressions and letter.reason for letter in parsed)
        print(f"librdkafka consumer group, session.timeout.ms=6000: first message after {first_after:.1f}s")
        n_imp = sum(isinstance(e, Impression) for e in events)
        records, _ = _consume(bootstrap, topics.impressions, n_imp + N_BAD, security)
        assert len(records) == n_imp + N_BAD
    finally:
        run.stop()
