"""The `osmf` command: help texts and every user-facing error path, with its message."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from infra.settings import Settings
from infra.contracts.events import Click, Impression, parse_events
from infra.kafka import consume_all

runner = CliRunner()
TAOBAO = Path(__file__).resolve().parents[3] / "shared" / "data" / "taobao" / "fuxictr_taobao_test_sample.csv"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No broker configured anywhere: a private data dir and an unused port."""
    for name in ("OSMF_KAFKA_BOOTSTRAP", "OSMF_CONFIG"):  # set first so teardown restores them
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("OSMF_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OSMF_BROKER__PORT", str(_free_port()))
    return tmp_path


@pytest.fixture
def on_broker(broker_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """CLI commands pointed at the session's test broker (as an external cluster)."""
    monkeypatch.setenv("OSMF_KAFKA_BOOTSTRAP", broker_settings.bootstrap_servers)
    monkeypatch.setenv("OSMF_DATA_DIR", str(broker_settings.data_dir))
    monkeypatch.setenv("OSMF_CONFIG", "")
    monkeypatch.delenv("OSMF_CONFIG")
    return broker_settings


@pytest.mark.parametrize(
    "args", [[], ["broker"], ["world"], ["replay"], ["simulate"], ["demo"], ["bench"], ["world", "oracle"]]
)
def test_every_command_has_help(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_missing_config_file_is_named(isolated: Path) -> None:
    result = runner.invoke(app, ["--config", "/no/such.yaml", "broker", "status"])
    assert result.exit_code == 2
    assert "--config /no/such.yaml: no such file" in result.output


def test_bad_setting_names_field_and_value(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSMF_BROKER__PORT", "not-a-port")
    result = runner.invoke(app, ["broker", "status"])
    assert result.exit_code == 2
    assert "broker.port" in result.output and "not-a-port" in result.output


def test_bad_yaml_setting_names_field(isolated: Path, tmp_path: Path) -> None:
    config = tmp_path / "osmf.yaml"
    config.write_text("broker:\n  storage: floppy\n")
    result = runner.invoke(app, ["--config", str(config), "broker", "status"])
    assert result.exit_code == 2
    assert "broker.storage" in result.output and "floppy" in result.output


def test_status_of_stopped_broker_exits_1_with_hint(isolated: Path) -> None:
    result = runner.invoke(app, ["broker", "status"])
    assert result.exit_code == 1
    assert "not running" in result.output and "osmf broker start" in result.output


def test_simulate_without_broker_says_how_to_start_it(isolated: Path) -> None:
    result = runner.invoke(app, ["simulate", "--duration", "1"])
    assert result.exit_code == 2
    assert "no Kafka broker answers" in result.output and "osmf broker start" in result.output


def test_replay_without_broker_says_how_to_start_it(isolated: Path) -> None:
    result = runner.invoke(app, ["replay", "taobao", str(TAOBAO)])
    assert result.exit_code == 2
    assert "osmf broker start" in result.output


def test_missing_world_file_is_named(isolated: Path) -> None:
    result = runner.invoke(app, ["world", "oracle", "--world", "/no/world.yaml"])
    assert result.exit_code == 2
    assert "--world /no/world.yaml: no such file" in result.output


def test_invalid_world_names_field(isolated: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nusers: {count: -5}\n")
    result = runner.invoke(app, ["world", "oracle", "--world", str(bad), "--prompts", "5"])
    assert result.exit_code == 2
    assert "users.count" in result.output


def test_unknown_benchmark_lists_choices(isolated: Path) -> None:
    result = runner.invoke(app, ["bench", "warp-speed"])
    assert result.exit_code == 2
    assert "unknown benchmark 'warp-speed'" in result.output


def test_alignment_options_are_checked(isolated: Path) -> None:
    result = runner.invoke(app, ["bench", "alignment", "--serve", "best"])
    assert result.exit_code == 2 and "--serve best: choose rerank or slate" in result.output
    result = runner.invoke(app, ["bench", "streams", "--serve", "slate"])
    assert result.exit_code == 2 and "are options of `osmf bench alignment`" in result.output
    result = runner.invoke(app, ["bench", "grouping", "--impressions", "100000"])
    assert result.exit_code == 2 and "--impressions is an option of `osmf bench streams`" in result.output
    result = runner.invoke(app, ["bench", "streams", "--impressions", "10"])
    assert result.exit_code == 2 and "1000" in result.output.replace(",", "")


def test_negative_speedup_is_refused() -> None:
    result = runner.invoke(app, ["replay", "taobao", str(TAOBAO), "--speedup", "-1"])
    assert result.exit_code == 2
    assert "speedup" in result.output


def test_replay_unknown_header_names_file(on_broker: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "notes.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    result = runner.invoke(app, ["replay", "taobao", str(bad)])
    assert result.exit_code == 2
    assert "notes.csv" in result.output and "matches no Taobao format" in result.output


def test_broker_start_on_busy_port_names_the_port(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        monkeypatch.setenv("OSMF_BROKER__PORT", str(port))
        result = runner.invoke(app, ["broker", "start"])
    assert result.exit_code == 2
    assert str(port) in result.output and "OSMF_BROKER__PORT" in result.output


def test_external_bootstrap_start_spawns_nothing(on_broker: Settings, isolated: Path, monkeypatch) -> None:
    monkeypatch.setenv("OSMF_KAFKA_BOOTSTRAP", on_broker.bootstrap_servers)
    result = runner.invoke(app, ["broker", "start"])
    assert result.exit_code == 0, result.output
    assert "external cluster" in result.output
    assert not (isolated / "broker" / "tansu.pid").exists()


def test_simulate_sends_exactly_what_the_world_generates(on_broker: Settings) -> None:
    start = 1_700_000_000_000
    result = runner.invoke(
        app, ["simulate", "--duration", "2", "--rate", "200", "--seed", "7", "--start-ts", str(start)]
    )
    assert result.exit_code == 0, result.output
    records = consume_all(on_broker.bootstrap_servers, [on_broker.topics.impressions, on_broker.topics.clicks])
    ours = [e for r in records for e in parse_events(r.value) if e.ts >= start]
    ours = [e for e in ours if e.event_id.startswith(_prefix_of(ours))]
    impressions = [e for e in ours if isinstance(e, Impression)]
    clicks = [e for e in ours if isinstance(e, Click)]
    assert len(impressions) == 400
    assert f"sent {len(impressions) + len(clicks)} events" in result.output
    assert {c.impression_id for c in clicks} <= {i.event_id for i in impressions}


def _prefix_of(events: list) -> str:
    first = min((e for e in events if isinstance(e, Impression)), key=lambda e: e.ts)
    return first.event_id.rsplit("-", 1)[0]


def test_replay_sends_sample_rows(on_broker: Settings) -> None:
    result = runner.invoke(app, ["replay", "taobao", str(TAOBAO)])
    assert result.exit_code == 0, result.output
    assert "100 impressions" in result.output


def test_demo_reads_back_every_impression_and_prints_the_tables(on_broker: Settings, monkeypatch) -> None:
    monkeypatch.setenv("OSMF_STREAMS__METRICS_PORT", str(_free_port()))
    monkeypatch.setenv("OSMF_STREAMS__SESSION_TIMEOUT_S", "6")
    result = runner.invoke(app, ["demo", "--traffic-only", "--duration", "2", "--rate", "200"])
    assert result.exit_code == 0, result.output
    assert "read back 400 of 400 impressions" in result.output
    assert "lipstick" in result.output and "drill" in result.output
    assert "per group, as the stream worker counted" in result.output
    assert "lipstick/g" in result.output


def test_worker_on_a_busy_metrics_port_names_the_port_and_the_fix(on_broker: Settings, monkeypatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        monkeypatch.setenv("OSMF_STREAMS__METRICS_PORT", str(port))
        result = runner.invoke(app, ["worker"])
    assert result.exit_code == 2, result.output
    assert f"127.0.0.1:{port}" in result.output and "OSMF_STREAMS__METRICS_PORT" in result.output


def test_an_exit_does_not_import_the_learner() -> None:
    """A command that stops (``osmf worker`` on SIGTERM: SystemExit through the error wrapper) must not load
    torch to check whether a learner error was raised; the errors of loaded modules are still recognised."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cli.common import friendly_errors, user_errors\n"
        "import infra.settings\n"
        "names = {e.__name__ for e in user_errors()}\n"
        "try:\n"
        "    friendly_errors(lambda: sys.exit(0))()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('ConfigError' in names, 'LearnerServiceError' in names, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["True", "False", "False"], result.stderr
