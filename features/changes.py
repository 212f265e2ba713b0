"""The change log: which entity keys each push touched, so reader caches stay exact.

A reader (:class:`features.read.FeatureReader`) caches online rows. After
every online write the pusher appends one entry per view — a sequence number
and the keys written — and a reader, before answering, fetches the entries
past the last one it saw and drops exactly those keys from its cache. One
indexed query (SQLite) or one round trip (Redis) when nothing changed.

A reader that finds a gap in the sequence (entries trimmed before it read
them) drops its whole cache. The key ``"*"`` means "every key of the view"
(written by ``apply`` and ``materialize``, which change rows behind the pusher).

Backends follow the online store: a SQLite file beside ``online.db``
(``online-changes.db``, WAL mode, readers in other processes) or a Redis
stream ``osmf:<project>:feature-changes`` whose ids are the sequence numbers.

>>> log = SqliteChangeLog(":memory:")
>>> start = log.last_seq()
>>> log.record("group_profile", ["lipstick/g1", "lipstick/g2"])
>>> log.changes_since(start)
(1, [('group_profile', 'lipstick/g1'), ('group_profile', 'lipstick/g2')])
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from features.connect import redis_client, repo_path

if TYPE_CHECKING:
    from infra.settings import Settings

KEY_SEPARATOR = "\x1f"
"""Joins the values of a multi-column entity key (``user_id``, ``category``)."""

KEEP_ENTRIES = 20_000
"""Entries kept; a reader further behind than this drops its whole cache."""

MAX_FETCH = 2_000
"""A reader more than this many entries behind drops its whole cache instead of reading them."""

Changes = tuple[int, list[tuple[str, str]] | None]
"""``(last sequence number, [(view, key), ...])``; ``None`` instead of the list means "drop everything"."""


class ChangeLog(Protocol):
    """Where pushes announce the keys they wrote."""

    def record(self, view: str, keys: list[str]) -> None:
        """Append one entry: ``keys`` of ``view`` were written."""

    def record_all(self, view: str) -> None:
        """Every key of ``view`` (or of every view, for ``"*"``) may have changed."""

    def last_seq(self) -> int:
        """The newest sequence number (0 when empty)."""

    def changes_since(self, seq: int) -> Changes:
        """Entries after ``seq``."""

    def close(self) -> None:
        """Release connections."""


class SqliteChangeLog:
    """The change log in a SQLite file (WAL mode, so readers in other processes never block the writer)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, view TEXT NOT NULL, "
            "keys TEXT NOT NULL)"
        )
        self._writes = 0

    def record(self, view: str, keys: list[str]) -> None:
        with self._lock:
            cur = self._conn.execute("INSERT INTO changes (view, keys) VALUES (?, ?)", (view, json.dumps(keys)))
            self._writes += 1
            if self._writes % 500 == 0:
                self._conn.execute("DELETE FROM changes WHERE seq <= ?", ((cur.lastrowid or 0) - KEEP_ENTRIES,))

    def record_all(self, view: str) -> None:
        self.record(view, ["*"])

    def last_seq(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def changes_since(self, seq: int) -> Changes:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, view, keys FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (seq, MAX_FETCH + 1)
            ).fetchall()
        return _collect(seq, [(int(s), v, k) for s, v, k in rows])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


_RECORD = """
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'view', ARGV[1], 'keys', ARGV[2])
return seq
"""


class RedisChangeLog:
    """The change log in a Redis stream; an ``INCR`` counter gives gap-free sequence numbers."""

    def __init__(self, client, project: str) -> None:  # noqa: ANN001 - a redis.Redis
        self._client = client
        self._counter = f"osmf:{project}:feature-changes:seq"
        self._stream = f"osmf:{project}:feature-changes"
        self._script = client.register_script(_RECORD)

    def record(self, view: str, keys: list[str]) -> None:
        self._script(keys=[self._counter, self._stream], args=[view, json.dumps(keys), KEEP_ENTRIES])

    def record_all(self, view: str) -> None:
        self.record(view, ["*"])

    def last_seq(self) -> int:
        return int(self._client.get(self._counter) or 0)

    def changes_since(self, seq: int) -> Changes:
        entries = self._client.xrange(self._stream, min=f"({seq}-0", max="+", count=MAX_FETCH + 1)
        rows = []
        for entry_id, fields in entries:
            rows.append((int(entry_id.split(b"-")[0]), fields[b"view"].decode(), fields[b"keys"].decode()))
        if not rows and self.last_seq() > seq:
            return self.last_seq(), None  # trimmed away entirely
        return _collect(seq, rows)

    def close(self) -> None:
        self._client.close()


def _collect(seq: int, rows: list[tuple[int, str, str]]) -> Changes:
    if not rows:
        return seq, []
    last = rows[-1][0]
    if rows[0][0] != seq + 1 or len(rows) > MAX_FETCH:
        return last, None  # a gap (trimmed or rolled back) or too far behind: drop everything
    changed: list[tuple[str, str]] = []
    for _, view, keys in rows:
        changed.extend((view, key) for key in json.loads(keys))
    return last, changed


def change_log(settings: Settings) -> ChangeLog:
    """The change log beside the configured online store."""
    if settings.features.online_store == "redis":
        return RedisChangeLog(redis_client(settings), settings.features.project)
    root = repo_path(settings)
    root.mkdir(parents=True, exist_ok=True)
    return SqliteChangeLog(root / "online-changes.db")


def entity_key(values: tuple[str, ...] | list[str]) -> str:
    """One string for an entity key's values."""
    return KEY_SEPARATOR.join(values)
