"""Shared fixtures: one embedded Tansu broker (memory storage) for the whole test session."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from infra.broker import start_broker, stop_broker
from infra.settings import Settings, load_settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def broker_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a Tansu broker (memory storage, free port, data_dir in a tmp dir) running for the session."""
    data_dir = tmp_path_factory.mktemp("osmf-broker")
    settings = load_settings(data_dir=data_dir, kafka_bootstrap=None, broker={"port": _free_port()})
    start_broker(settings)
    try:
        yield settings
    finally:
        stop_broker(settings)
