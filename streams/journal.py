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
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any


@dataclass
class JournalChanges:
    """Keys set and deleted since the last entry (see :meth:`JournalStore.detach`)."""

    set: dict[str, Any]
    deleted: list[str]


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
        self.recovered_views: dict[int, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
        """After :meth:`recover`: per partition, the newest rows of each view its retained entries hold."""
        self.recovered_offsets: dict[tuple[str, int], int] = {}
        """After :meth:`recover`: ``(topic, partition) -> next offset`` of the input the retained entries covered."""

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

    def detach(self) -> JournalChanges:
        """Take the changes made since the last entry; :meth:`write` journals them later.

        Lets the worker first make durable what a replay of the batch would skip (its outcome
        messages), then journal the state that makes the replay skip it.
        """
        changes = JournalChanges(self._set, sorted(self._deleted))
        self._set, self._deleted = {}, set()
        return changes

    def write(self, changes: JournalChanges, partition: int, ts: int,
              views: dict[str, dict[str, Any]] | None = None, offsets: dict[str, int] | None = None) -> None:
        """Write ``changes`` (and the rows of ``views`` they imply) as one entry of ``partition``.

        Call in the context of an event of ``partition``. ``views`` are rows of other tables
        (``name -> {key: value}``) written by the same batch: journaled here, they are restored
        by :meth:`recover` even when the kill came before the tables themselves were written.
        ``offsets`` (``topic -> next offset`` of the input records of ``partition`` the batch
        covered) go into the entry when there is one.
        """
        views = {name: rows for name, rows in (views or {}).items() if rows}
        if changes.set or changes.deleted or views:
            key = f"{partition}:{self._next_id():020d}"
            entry: dict[str, Any] = {"set": changes.set, "del": changes.deleted, "ts": ts}
            if views:
                entry["views"] = views
            if offsets:
                entry["offsets"] = offsets
            self.table[key] = entry
            self._entries[partition].append((ts, key))
        if self.window_ms is not None:
            entries = self._entries[partition]
            while entries and entries[0][0] < ts - self.window_ms:
                self.table.pop(entries.popleft()[1], None)

    def flush(self, partition: int, ts: int, views: dict[str, dict[str, Any]] | None = None) -> None:
        """Write this batch's changes as one entry (call in the context of an event of ``partition``)."""
        self.write(self.detach(), partition, ts, views)

    def recover(self) -> None:
        """Rebuild the mapping by replaying every journal entry in order."""
        self._data.clear()
        self._entries.clear()
        self.recovered_views.clear()
        self.recovered_offsets.clear()
        for key in sorted(self.table.keys(), key=_entry_order):
            entry = self.table[key]
            for deleted in entry["del"]:
                self._data.pop(deleted, None)
            self._data.update(entry["set"])
            partition = int(key.split(":", 1)[0])
            self._entries[partition].append((entry["ts"], key))
            for name, rows in entry.get("views", {}).items():
                self.recovered_views[partition][name].update(rows)
            for topic, offset in entry.get("offsets", {}).items():
                self.recovered_offsets[(topic, partition)] = max(offset, self.recovered_offsets.get((topic, partition), 0))
            self._last_id = max(self._last_id, int(key.split(":", 1)[1]))

    def entries_per_partition(self) -> dict[int, int]:
        """How many journal entries each partition retains (after :meth:`recover`, or as written)."""
        return {partition: len(entries) for partition, entries in self._entries.items() if entries}

    def _next_id(self) -> int:
        self._last_id = max(self._last_id + 1, time.time_ns())
        return self._last_id


def _entry_order(key: str) -> tuple[int, int]:
    partition, entry_id = key.split(":", 1)
    return int(partition), int(entry_id)


RowWriter = Callable[[int, dict[str, Any]], None]
"""``(partition, rows)``: writes rows into a view's table (and its changelog)."""


class BufferedView(MutableMapping[str, Any]):
    """A table whose writes wait for the journal entry that makes them safe to replay.

    Reads see pending writes. :meth:`take` hands them over to be journaled with the batch's
    entry (:meth:`JournalStore.write`); once that entry is durable, :meth:`publish` writes them
    into the table. So a kill at any moment leaves the table either without the batch (it is
    replayed) or with it recoverable from the journal (the replay is skipped) - never half.

    >>> table = {}
    >>> view = BufferedView(table)
    >>> view["a"] = 1
    >>> table, view["a"]
    ({}, 1)
    >>> rows = view.take(); view.publish(0, rows); table
    {'a': 1}
    """

    def __init__(self, table: MutableMapping[str, Any], writer: RowWriter | None = None) -> None:
        self.table = table
        self._writer = writer
        self._pending: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key in self._pending:
            return self._pending[key]
        return self.table[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._pending[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("a buffered view only sets rows; expire them in the journal instead")

    def __contains__(self, key: object) -> bool:
        return key in self._pending or key in self.table

    def __iter__(self) -> Iterator[str]:
        yield from self._pending
        yield from (key for key in list(self.table.keys()) if key not in self._pending)

    def __len__(self) -> int:
        return len(self._pending) + sum(1 for key in list(self.table.keys()) if key not in self._pending)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._pending:
            return self._pending[key]
        return self.table.get(key, default)

    def take(self) -> dict[str, Any]:
        """The rows written since the last take (to journal, then :meth:`publish`)."""
        rows, self._pending = self._pending, {}
        return rows

    def publish(self, partition: int, rows: dict[str, Any]) -> None:
        """Write ``rows`` into the table (of changelog partition ``partition``)."""
        if self._writer is not None:
            self._writer(partition, rows)
        else:
            self.table.update(rows)
