"""Where the feature store lives and how to reach its online part: shared by the store and its change log."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.settings import Settings


def repo_path(settings: Settings) -> Path:
    """Folder of this store's files: ``<data_dir>/features``."""
    return Path(settings.data_dir).resolve() / "features"



def redis_client(settings: Settings):  # noqa: ANN201 - redis is imported lazily
    """A redis-py client for ``features.redis_url`` (only the first host of a cluster string).

    It fails fast (one retry, no backoff): its callers — the pusher, readers, ``status`` — retry on their own.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    address, *params = settings.features.redis_connection_string.split(",")
    host, _, port = address.rpartition(":")
    options: dict[str, Any] = {}
    for param in params:
        key, _, value = param.partition("=")
        if key == "db":
            options["db"] = int(value)
        elif key == "password":
            options["password"] = value
        elif key == "ssl":
            options["ssl"] = value.lower() == "true"
    return redis.Redis(
        host=host, port=int(port), socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1), **options
    )
