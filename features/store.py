"""The Feast store of these settings: ``feature_store.yaml``, apply, status, materialize.

Everything lives under ``<data_dir>/features/`` (the store's repo path):
``feature_store.yaml`` (generated from the settings), ``registry.db``, the
SQLite online store ``online.db`` (embedded mode), the parquet history
``offline/<view>/part-*.parquet`` and the change log readers use to keep
their caches exact (:mod:`features.changes`).

Feast takes ~10 s to import; every function here imports it lazily.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from features.connect import redis_client, repo_path
from features.schema import VIEWS, arrow_schema

if TYPE_CHECKING:
    from feast import FeatureStore, RepoConfig

    from infra.settings import Settings

log = logging.getLogger(__name__)

DEFINITIONS_PACKAGE = "features.repo"
DEFINITIONS_DIR = Path(__file__).resolve().parent / "repo"
INIT_PART = "part-0000000000000-init.parquet"


class FeatureStoreError(RuntimeError):
    """The feature store cannot do what was asked; the message names the setting or step and the fix."""


def history_dir(settings: Settings, view: str) -> Path:
    """Folder of a view's parquet history (the batch source path of its push source)."""
    return repo_path(settings) / "offline" / view


def store_config(settings: Settings) -> dict[str, Any]:
    """The ``feature_store.yaml`` content for these settings.

    >>> from infra.settings import load_settings
    >>> config = store_config(load_settings(data_dir="/srv/osmf", features={"online_store": "redis"}))
    >>> config["online_store"]
    {'type': 'redis', 'connection_string': '127.0.0.1:6379,db=0'}
    >>> config["registry"]["path"]
    '/srv/osmf/features/registry.db'
    """
    features = settings.features
    root = repo_path(settings)
    if features.online_store == "redis":
        online: dict[str, Any] = {"type": "redis", "connection_string": features.redis_connection_string}
    else:
        online = {"type": "sqlite", "path": str(root / "online.db")}
    return {
        "project": features.project,
        "provider": "local",
        "registry": _registry(settings, root),
        "online_store": online,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


def _registry(settings: Settings, root: Path) -> dict[str, Any]:
    """A file registry under data_dir, or Feast's SQL registry when ``features.registry_url`` is set (several machines)."""
    url = settings.features.registry_url
    if url is None:
        return {"registry_type": "file", "path": str(root / "registry.db"), "cache_ttl_seconds": 60}
    return {"registry_type": "sql", "path": url.get_secret_value(), "cache_ttl_seconds": 60,
            "sqlalchemy_config_kwargs": {"pool_pre_ping": True}}


def write_store_yaml(settings: Settings) -> Path:
    """Write ``<data_dir>/features/feature_store.yaml`` from the settings; returns its path.

    With it the Feast CLI works on this store too:
    ``feast -c features/repo -f <data_dir>/features/feature_store.yaml plan``.
    """
    root = repo_path(settings)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "feature_store.yaml"
    text = "# Generated from the OSMF settings by `osmf features apply`; edit the settings, not this file.\n"
    text += yaml.safe_dump(store_config(settings), sort_keys=False)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def repo_config(settings: Settings) -> RepoConfig:
    """Feast's :class:`RepoConfig` for these settings (imports Feast)."""
    from feast import RepoConfig

    return RepoConfig(repo_path=repo_path(settings), **store_config(settings))


def open_store(settings: Settings) -> FeatureStore:
    """A :class:`feast.FeatureStore` on this store (imports Feast; does not apply)."""
    from feast import FeatureStore

    root = repo_path(settings)
    root.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(root), config=repo_config(settings))


def definitions() -> list[Any]:
    """Every Feast object declared in the modules of ``features/repo`` (what ``feast apply`` would find)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    kinds = (Entity, DataSource, FeatureView, FeatureService)
    found: list[Any] = []
    package = importlib.import_module(DEFINITIONS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{DEFINITIONS_PACKAGE}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, kinds) and not any(value is seen for seen in found):
                found.append(value)
    return found


@dataclass
class ApplyReport:
    """What ``apply`` did."""

    yaml_path: Path
    online_store: str
    entities: list[str] = field(default_factory=list)
    feature_views: list[str] = field(default_factory=list)
    push_sources: list[str] = field(default_factory=list)


def apply(settings: Settings) -> ApplyReport:
    """Register the definitions and create the online tables and history folders (idempotent).

    Several workers may call it at once; a file lock serialises them.
    """
    from feast import Entity, FeatureView, PushSource

    yaml_path = write_store_yaml(settings)
    with _lock(repo_path(settings) / ".apply.lock"):
        objects = definitions()
        _check_definitions(objects)
        store = open_store(settings)
        try:
            store.apply(objects)
        except Exception as exc:  # noqa: BLE001 - Feast raises many kinds; name the store and the fix
            raise FeatureStoreError(_store_failure("apply", settings, exc)) from exc
        for view in VIEWS:
            ensure_history(settings, view)
        if settings.features.online_store == "sqlite":
            _wal(repo_path(settings) / "online.db")
        from features.changes import change_log

        with contextlib.suppress(Exception):
            change_log(settings).record_all("*")
    return ApplyReport(
        yaml_path=yaml_path,
        online_store=settings.features.online_store,
        entities=sorted(o.name for o in objects if isinstance(o, Entity)),
        feature_views=sorted(o.name for o in objects if isinstance(o, FeatureView)),
        push_sources=sorted(o.name for o in objects if isinstance(o, PushSource)),
    )


def ensure_history(settings: Settings, view: str) -> Path:
    """Create the view's history folder, with an empty part file while it has none (readers need one file)."""
    import pyarrow.parquet as pq

    folder = history_dir(settings, view)
    folder.mkdir(parents=True, exist_ok=True)
    init = folder / INIT_PART
    if not any(folder.glob("part-*.parquet")):
        tmp = folder / f".{INIT_PART}.tmp"
        pq.write_table(arrow_schema(view).empty_table(), tmp)
        tmp.replace(init)
    return folder


def is_applied(settings: Settings) -> bool:
    """True when the registry holds every view (cheap: does not import Feast)."""
    registry = repo_path(settings) / "registry.db"
    if not registry.is_file():
        return False
    data = registry.read_bytes()
    project = settings.features.project.encode()
    return project in data and all(view.encode() in data for view in VIEWS)


@dataclass
class ViewStatus:
    """One view in the registry: history part files and rows, newest event time in the history."""

    name: str
    history_parts: int
    history_rows: int
    newest_event: datetime | None


@dataclass
class StoreStatus:
    """Where the store is and what it holds."""

    repo_path: Path
    online_store: str
    applied: bool
    online_reachable: bool
    online_note: str
    views: list[ViewStatus] = field(default_factory=list)


def status(settings: Settings) -> StoreStatus:
    """Registry, online store reachability and history size of each view (does not import Feast)."""
    import pyarrow.parquet as pq

    root = repo_path(settings)
    applied = is_applied(settings)
    reachable, note = online_reachable(settings)
    views = []
    for view in VIEWS:
        folder = history_dir(settings, view)
        parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
        rows, newest = 0, None
        for part in parts:
            meta = pq.read_metadata(part)
            rows += meta.num_rows
        if rows:
            import pyarrow.dataset as ds

            column = ds.dataset([str(p) for p in parts], format="parquet").to_table(columns=["event_timestamp"])
            import pyarrow.compute as pc

            newest = pc.max(column["event_timestamp"]).as_py()
        views.append(ViewStatus(view, len(parts), rows, newest))
    return StoreStatus(root, settings.features.online_store, applied, reachable, note, views)


def online_reachable(settings: Settings) -> tuple[bool, str]:
    """Whether the online store answers, and a note saying where it is."""
    features = settings.features
    if features.online_store == "sqlite":
        path = repo_path(settings) / "online.db"
        return path.is_file(), f"SQLite {path}" + ("" if path.is_file() else " (not created yet: run apply)")
    import redis

    host_port = features.redis_connection_string.split(",", 1)[0]
    try:
        redis_client(settings).ping()
    except redis.RedisError as exc:
        return False, f"Redis {host_port} does not answer ({exc}); start it or fix features.redis_url"
    return True, f"Redis {host_port}"


def materialize(settings: Settings, start: datetime | None, end: datetime | None = None) -> datetime:
    """Load the parquet history into the online store (all of it, or ``[start, end]``); returns ``end``.

    Use it to rebuild an emptied online store (e.g. a new Redis). Readers drop their caches.
    """
    if not is_applied(settings):
        raise FeatureStoreError(f"no feature store under {repo_path(settings)}; run `osmf features apply` first")
    end = end or datetime.now(timezone.utc)
    store = open_store(settings)
    try:
        if start is None:
            store.materialize_incremental(end_date=end)
        else:
            store.materialize(start_date=start, end_date=end)
    except Exception as exc:  # noqa: BLE001
        raise FeatureStoreError(_store_failure("materialize", settings, exc)) from exc
    from features.changes import change_log

    change_log(settings).record_all("*")
    return end


def _wal(path: Path) -> None:
    """Put the SQLite online store in WAL mode (persistent): readers and the pushing worker never block each other."""
    import sqlite3

    conn = sqlite3.connect(str(path), timeout=10)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _check_definitions(objects: list[Any]) -> None:
    """The repo must declare every view the worker pushes, with a push source each."""
    from feast import FeatureView, PushSource

    views = {o.name: o for o in objects if isinstance(o, FeatureView)}
    for name, schema in VIEWS.items():
        view = views.get(name)
        if view is None:
            raise FeatureStoreError(f"features/repo declares no feature view {name!r}; restore its definition")
        if not isinstance(view.stream_source, PushSource) or view.stream_source.name != schema.push_source:
            raise FeatureStoreError(f"feature view {name!r} must be fed by the push source {schema.push_source!r}")
        declared = [f.name for f in view.features]
        expected = [c.name for c in schema.features]
        if declared != expected:
            raise FeatureStoreError(
                f"feature view {name!r} declares {declared}, but features/schema.py pushes {expected}; "
                "change both together"
            )


def _store_failure(step: str, settings: Settings, exc: Exception) -> str:
    features = settings.features
    where = (
        f"Redis at {features.redis_url} (features.redis_url)"
        if features.online_store == "redis"
        else f"SQLite under {repo_path(settings)} (data_dir)"
    )
    return f"features {step} failed on {where}: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
