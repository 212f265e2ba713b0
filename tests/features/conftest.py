"""Fixtures of the feature-store tests: settings on a temporary store, SQLite or Redis.

The Redis tests use the server on 127.0.0.1:6379 (``OSMF_TEST_REDIS_URL`` to
change it). When it does not answer they are skipped — unless
``OSMF_REQUIRE_SERVICES=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings, load_settings

REDIS_URL = os.environ.get("OSMF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    """Skip (or fail, with OSMF_REQUIRE_SERVICES=1) when the test Redis does not answer."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2).ping()
    except redis.RedisError as exc:
        message = f"Redis at {REDIS_URL} does not answer ({exc}); start it (redis-server) or set OSMF_TEST_REDIS_URL"
        if os.environ.get("OSMF_REQUIRE_SERVICES") == "1":
            pytest.fail(f"OSMF_REQUIRE_SERVICES=1 but {message}", pytrace=False)
        pytest.skip(message)


def drop_redis_project(project: str) -> int:
    """Delete every key of ``project`` (Feast's keys end with the project name; ours start with osmf:<project>:)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    suffix, prefix = project.encode(), f"osmf:{project}:".encode()
    doomed = [k for k in client.scan_iter(count=1000) if k.endswith(suffix) or k.startswith(prefix)]
    for start in range(0, len(doomed), 500):
        client.delete(*doomed[start : start + 500])
    return len(doomed)


def store_settings(data_dir: Path, online_store: str, project: str, **features: object) -> Settings:
    """Settings of an isolated feature store under ``data_dir``."""
    return load_settings(
        data_dir=data_dir,
        features={"online_store": online_store, "project": project, "redis_url": REDIS_URL, **features},
    )


@pytest.fixture(params=["sqlite", "redis"])
def online_store(request: pytest.FixtureRequest) -> str:
    """Each test using it runs on both online stores."""
    if request.param == "redis":
        require_redis()
    return request.param


@pytest.fixture
def project() -> Iterator[str]:
    """A fresh Feast project name; its Redis keys are deleted afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    try:
        drop_redis_project(name)
    except Exception:  # noqa: BLE001 - Redis may be absent (SQLite tests)
        pass
