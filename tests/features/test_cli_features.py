"""`osmf features apply | status | materialize`, and their error messages."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features.read import FeatureReader
from features.rows import user_group_row
from features.sink import FeastSink
from cli.features import features_app
from infra.settings import load_settings

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("OSMF_CONFIG", "OSMF_FEATURES__ONLINE_STORE", "OSMF_FEATURES__REDIS_URL"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("OSMF_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OSMF_FEATURES__PROJECT", "cli_test")
    return tmp_path


def test_status_before_apply_says_what_to_run(data_dir: Path) -> None:
    result = runner.invoke(features_app, ["status"])
    assert result.exit_code == 1
    assert "applied: no (run `osmf features apply`)" in result.output


def test_apply_then_status_then_materialize_refills_an_emptied_online_store(data_dir: Path) -> None:
    result = runner.invoke(features_app, ["apply"])
    assert result.exit_code == 0, result.output
    assert "feature views: group_creative_preferences, group_profile, product_profile, user_group" in result.output
    assert (data_dir / "features" / "feature_store.yaml").is_file()

    settings = load_settings()
    sink = FeastSink(settings, embedder=None)
    sink.open()
    sink.push("user_group", [user_group_row("u1", "drill", "drill/g2")], [1_767_225_600_000_000], 0)
    sink.close()
    status = runner.invoke(features_app, ["status"])
    assert status.exit_code == 0, status.output
    assert "user_group" in status.output and "history         1 rows" in status.output

    reader = FeatureReader(settings)
    assert reader.resolve_group("u1", "drill") == "drill/g2"
    for name in ("online.db", "online.db-wal", "online.db-shm"):  # the online store is lost ...
        (data_dir / "features" / name).unlink(missing_ok=True)
    assert runner.invoke(features_app, ["apply"]).exit_code == 0
    assert FeatureReader(settings).resolve_group("u1", "drill") is None
    result = runner.invoke(features_app, ["materialize", "--start", "2025-01-01"])
    assert result.exit_code == 0, result.output
    assert FeatureReader(settings).resolve_group("u1", "drill") == "drill/g2"  # ... and refilled from history


def test_materialize_checks_its_window(data_dir: Path) -> None:
    result = runner.invoke(features_app, ["materialize", "--start", "2026-02-01", "--end", "2026-01-01"])
    assert result.exit_code == 2
    assert "--end 2026-01-01T00:00:00+00:00 must be after --start" in result.output
    result = runner.invoke(features_app, ["materialize"])
    assert result.exit_code == 2 and "run `osmf features apply` first" in result.output


def test_apply_names_an_unreachable_redis(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OSMF_FEATURES__ONLINE_STORE", "redis")
    monkeypatch.setenv("OSMF_FEATURES__REDIS_URL", f"redis://127.0.0.1:{port}/0")
    result = runner.invoke(features_app, ["apply"])
    assert result.exit_code == 2
    assert f"Redis 127.0.0.1:{port} does not answer" in result.output and "features.redis_url" in result.output


def test_a_bad_setting_is_one_line(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSMF_FEATURES__ONLINE_STORE", "mongo")
    result = runner.invoke(features_app, ["status"])
    assert result.exit_code == 2
    assert result.output.startswith("error: settings: features.online_store: Input should be 'sqlite' or 'redis'")


@pytest.mark.parametrize("args", [["features"], ["features", "apply"], ["features", "status"], ["features", "materialize"]])
def test_the_osmf_command_has_the_features_commands(args: list[str]) -> None:
    from cli.main import BENCHMARKS, app

    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert BENCHMARKS["freshness"] == "bench.freshness" and BENCHMARKS["feature-read"] == "bench.feature_read"


def test_store_and_settings_examples() -> None:
    import doctest

    import features.store
    import infra.settings

    assert doctest.testmod(features.store).failed == 0
    assert doctest.testmod(infra.settings).failed == 0
