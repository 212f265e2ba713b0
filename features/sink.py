"""The pusher's sink into Feast: online writes, parquet history, change log.

Per flushed batch of one view: fill product title embeddings, write the rows
to the online store, append their keys to the change log, and buffer them for
the parquet history, which is written as one part file per view every
``offline_flush_s``.

The online write goes to the provider of the :class:`feast.FeatureStore`
(``Provider.online_write_batch``) with the feature view resolved once and the
rows turned into Feast's value protos directly from the typed rows. Measured
here: ``store.push`` re-reads and re-validates every view from the registry on
each call (~8 ms of a 10-row push) and goes through pandas and arrow
(~0.07 ms a row); writing the protos costs ~0.02 ms a row.

Why the history is not written with ``PushMode.OFFLINE``: Feast's file
offline store rewrites the whole parquet file on every offline push, so each
push would cost as much as the history is long.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.changes import ChangeLog, change_log, entity_key
from features.schema import CREATED, EVENT_TIMESTAMP, VIEWS, arrow_schema, view_schema
from features.store import INIT_PART, apply, history_dir, open_store

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
COMPACT_AFTER_PARTS = 200
"""A view's history is compacted into one part file once it has this many."""


class FeastSink:
    """Writes pushed rows to Feast (online), the change log and the parquet history.

    Parameters
    ----------
    settings
        The OSMF settings (``features`` section and ``data_dir``).
    embedder
        Title embedder for ``product_profile`` rows; default: all-MiniLM-L6-v2
        when ``features.embed_titles`` is on, else none (embeddings stay null).
    apply_if_needed
        Apply the definitions on open (default True; idempotent, under a file lock).
    """

    def __init__(self, settings: Settings, embedder: Any = None, apply_if_needed: bool = True) -> None:
        self.settings = settings
        self.apply_if_needed = apply_if_needed
        if embedder is None and settings.features.embed_titles:
            from features.embed import TitleEmbedder

            embedder = TitleEmbedder()
        self.embedder = embedder
        self.history = HistoryWriter(settings)
        self._store: Any = None
        self._provider: Any = None
        self._views: dict[str, Any] = {}
        self._changes: ChangeLog | None = None

    def open(self) -> None:
        """Import Feast, apply the definitions if needed, resolve the views, load the title encoder (seconds)."""
        if self.apply_if_needed:
            apply(self.settings)  # idempotent and quick once Feast is imported; keeps the registry in step
        store = open_store(self.settings)
        views = {fv.name: fv for fv in store.list_feature_views()}
        missing = sorted(set(VIEWS) - set(views))
        if missing:
            raise RuntimeError(f"feature views {missing} are not registered; run `osmf features apply`")
        self._views = views
        self._provider = store._get_provider()  # noqa: SLF001 - see the module docstring
        self._store = store
        self._changes = change_log(self.settings)
        if self.embedder is not None and hasattr(self.embedder, "load"):
            try:
                self.embedder.load()  # seconds (torch): now, not in the middle of the first product push
            except Exception as exc:  # noqa: BLE001 - products are pushed without embeddings then
                log.warning("title encoder not loaded, product titles stay without embeddings: %s", exc)
                self.embedder = None

    def push(self, view: str, rows: list[dict[str, Any]], event_us: list[int], created_us: int) -> None:
        """Write one batch of ``view`` online, then announce its keys and buffer it for the history."""
        import pyarrow as pa

        if self._provider is None or self._changes is None or self._store is None:
            raise RuntimeError("FeastSink.push before open()")
        schema = view_schema(view)
        if view == "product_profile" and self.embedder is not None:
            self._embed(rows)
        data = write_protos(view, rows, event_us, created_us)
        try:
            self._provider.online_write_batch(self._store.config, self._views[view], data, progress=None)
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            log.warning("online table of %s is gone (%s); applying the definitions again", view, exc)
            apply(self.settings)  # the SQLite file was replaced: recreate its tables, then write
            self._provider.online_write_batch(self._store.config, self._views[view], data, progress=None)
        self._changes.record(view, [entity_key(schema.key_of(row)) for row in rows])
        columns: dict[str, Any] = {name: [row[name] for row in rows] for name in schema.columns[:-2]}
        columns[EVENT_TIMESTAMP] = pa.array(event_us, type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        columns[CREATED] = pa.array([created_us] * len(rows), type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        self.history.append(view, pa.Table.from_pydict(columns, schema=arrow_schema(view)))

    def tick(self) -> None:
        """Write the history when it is due."""
        self.history.flush_if_due()

    def close(self) -> None:
        """Write the buffered history and close the change log."""
        self.history.flush()
        if self._changes is not None:
            with contextlib.suppress(Exception):
                self._changes.close()

    def _embed(self, rows: list[dict[str, Any]]) -> None:
        titled = [row for row in rows if row.get("title") and row.get("title_embedding") is None]
        if not titled:
            return
        try:
            vectors = self.embedder.embed([row["title"] for row in titled])
        except Exception as exc:  # noqa: BLE001 - no embedding is better than no product row
            log.warning("title embedding failed, pushing products without it: %s", exc)
            return
        for row, vector in zip(titled, vectors):
            row["title_embedding"] = vector


def write_protos(
    view: str, rows: list[dict[str, Any]], event_us: list[int], created_us: int
) -> list[tuple[Any, dict[str, Any], datetime, datetime]]:
    """Rows of ``view`` as Feast's online-write tuples ``(entity key, {feature: value}, event time, created)``."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Int64List, StringList, Value

    makers = {
        "str": lambda v: Value(string_val=v),
        "int": lambda v: Value(int64_val=v),
        "float": lambda v: Value(double_val=v),
        "list[str]": lambda v: Value(string_list_val=StringList(val=v)),
        "list[int]": lambda v: Value(int64_list_val=Int64List(val=v)),
        "list[float]": lambda v: Value(double_list_val=DoubleList(val=v)),
        "list[float32]": lambda v: Value(float_list_val=FloatList(val=v)),
    }
    schema = view_schema(view)
    columns = [(c.name, makers[c.kind]) for c in schema.features]
    created = _EPOCH + timedelta(microseconds=created_us)
    out = []
    for row, stamp in zip(rows, event_us):
        key = EntityKey(join_keys=list(schema.keys), entity_values=[Value(string_val=row[k]) for k in schema.keys])
        values = {name: Value() if row[name] is None else make(row[name]) for name, make in columns}
        out.append((key, values, _EPOCH + timedelta(microseconds=stamp), created))
    return out


class HistoryWriter:
    """Buffers pushed rows per view and appends them to ``offline/<view>/`` as parquet part files."""

    def __init__(self, settings: Settings, flush_s: float | None = None) -> None:
        self.settings = settings
        self.flush_s = settings.features.offline_flush_s if flush_s is None else flush_s
        self._buffers: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._seq = 0

    def append(self, view: str, table: Any) -> None:
        """Buffer ``table`` (rows of ``view``, in the view's arrow schema)."""
        with self._lock:
            self._buffers.setdefault(view, []).append(table)

    def flush_if_due(self) -> None:
        """Write the buffers when ``flush_s`` passed since the last write."""
        if time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> list[Path]:
        """Write every buffered view as one new part file each; returns the files written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._lock:
            buffers, self._buffers = self._buffers, {}
            self._last = time.monotonic()
        written = []
        for view, tables in buffers.items():
            folder = history_dir(self.settings, view)
            folder.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            name = f"part-{int(time.time() * 1000):013d}-{self._tag}-{self._seq:06d}.parquet"
            tmp = folder / f".{name}.tmp"
            pq.write_table(pa.concat_tables(tables), tmp)
            tmp.replace(folder / name)
            written.append(folder / name)
            (folder / INIT_PART).unlink(missing_ok=True)  # an empty part breaks Dask's sort; data parts suffice now
            if len(list(folder.glob("part-*.parquet"))) >= COMPACT_AFTER_PARTS:
                compact_history(self.settings, view)
        return written


def compact_history(settings: Settings, view: str) -> Path | None:
    """Merge a view's part files into one (skipped when another process is compacting it)."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    folder = history_dir(settings, view)
    with open(folder / ".compact.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        parts = sorted(p for p in folder.glob("part-*.parquet") if p.name != INIT_PART)
        if len(parts) < 2:
            return None
        table = ds.dataset([str(p) for p in parts], format="parquet", schema=arrow_schema(view)).to_table()
        name = parts[-1].name.replace(".parquet", "-compacted.parquet")
        tmp = folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(folder / name)
        for part in parts:
            part.unlink(missing_ok=True)
        return folder / name
