"""One-line errors of ``osmf serve`` that need no running model: missing environment, busy port, settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from infra.settings import ConfigError, load_settings
from serving import server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_missing_environment_names_the_make_target(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, serving={"env_dir": tmp_path / "no-such-env"})
    with pytest.raises(server.TritonEnvError) as info:
        server.start_server(settings)
    message = str(info.value)
    assert "make .venv-triton" in message and "\n" not in message


def test_busy_port_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, serving={"http_port": _free_port(), "grpc_port": _free_port(),
                                                         "metrics_port": _free_port()})
    try:
        server.find_env(settings)
    except server.TritonEnvError as exc:
        if os.environ.get("OSMF_REQUIRE_SERVICES") == "1":
            pytest.fail(f"OSMF_REQUIRE_SERVICES=1 but {exc}", pytrace=False)
        pytest.skip(str(exc))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", settings.serving.grpc_port))
        holder.listen(1)
        with pytest.raises(server.PortBusyError) as info:
            server.start_server(settings)
    message = str(info.value)
    assert "serving.grpc_port" in message and "OSMF_SERVING__GRPC_PORT" in message and "\n" not in message
    assert server.status(settings).pid is None


def test_bad_serving_setting_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(data_dir=tmp_path, serving={"slate_size": 0})
    assert "serving.slate_size" in str(info.value)


def test_config_has_no_machine_paths(tmp_path: Path) -> None:
    from serving.repository import TritonRepository

    settings = load_settings(data_dir=tmp_path)
    root = TritonRepository(settings).prepare()
    for path in root.rglob("config.pbtxt"):
        assert str(tmp_path) not in path.read_text()
    assert (root / "render" / "osmf_code" / "serving" / "render" / "template.py").is_file()
    assert (root / "gmllm" / "osmf_code" / "learner" / "model" / "gmllm.py").is_file()
