"""A dict persisted as one changelog record per micro-batch instead of one per key.

Faust tables write a changelog message for every key set; at several keys per
event that traffic dominated the worker's time. :class:`JournalStore` keeps
the live dict in memory and, at each :meth:`flush`, writes the batch's changes
(keys set and deleted) as ONE entry of a Faust table (its changelog topic is
the durable copy). :meth:`recover` replays the entries in order. Entries whose
newest event time is older than the store's window are deleted, so a windowed
store's journal stays bounded.

>>> journal = {}
>>> store = JournalStore(journal, window_ms=1000)
>>> store["a"] = 1; store["b"] = 2; del store["a"]
>>> store.flush(partition=0, ts=5000)
>>> again = JournalStore(journal, window_ms=1000); again.recover(); dict(again)
{'b': 2}
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterator, MutableMapping
from typing import Any


class JournalStore(MutableMapping[str, Any]):
    """In-memory mapping whose changes are journaled per batch into ``table``.

    Parameters
    ----------
    table
        Where entries go: a Faust table (``key -> {"set": {...}, "del": [...], "ts": ms}``)
        or any mapping in tests.
    window_ms
        Entries whose ``ts`` is older than the newest flushed ``ts`` of their
        partition minus this are deleted. ``None`` keeps every entry.
    """

    def __init__(self, table: MutableMapping[str, Any], window_ms: int | None) -> None:
        self.table = table
        self.window_ms = window_ms
        self._data: dict[str, Any] = {}
        self._set: dict[str, Any] = {}
        self._deleted: set[str] = set()
        self._entries: dict[int, deque[tuple[int, str]]] = defaultdict(deque)
        self._last_id = 0

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._set[key] = value
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._set.pop(key, None)
        self._deleted.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def flush(self, partition: int, ts: int) -> None:
        """Write this batch's changes as one entry (call in the context of an event of ``partition``)."""
        if self._set or self._deleted:
            key = f"{partition}:{self._next_id():020d}"
            self.table[key] = {"set": self._set, "del": sorted(self._deleted), "ts": ts}
            self._entries[partition].append((ts, key))
            self._set, self._deleted = {}, set()
        if self.window_ms is not None:
            entries = self._entries[partition]
            while entries and entries[0][0] < ts - self.window_ms:
                self.table.pop(entries.popleft()[1], None)

    def recover(self) -> None:
        """Rebuild the mapping by replaying every journal entry in order."""
        self._data.clear()
        self._entries.clear()
        for key in sorted(self.table.keys(), key=_entry_order):
            entry = self.table[key]
            for deleted in entry["del"]:
                self._data.pop(deleted, None)
            self._data.update(entry["set"])
            self._entries[int(key.split(":", 1)[0])].append((entry["ts"], key))
            self._last_id = max(self._last_id, int(key.split(":", 1)[1]))

    def _next_id(self) -> int:
        self._last_id = max(self._last_id + 1, time.time_ns())
        return self._last_id


def _entry_order(key: str) -> tuple[int, int]:
    partition, entry_id = key.split(":", 1)
    return int(partition), int(entry_id)
