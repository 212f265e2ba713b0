"""Streaming push: micro-batched, on a background thread, never blocking the caller.

The stream worker calls :meth:`FeaturePusher.submit` with feature rows; it
validates them, and puts them in a bounded buffer, coalesced by entity key
(a newer row of a key replaces the waiting one: the online store keeps only
the latest value anyway). A background thread flushes when ``batch_rows`` wait, or
when rows wait and ``flush_s`` passed since the last flush (so rows after a
quiet spell go at once, and none waits much longer than ``flush_s``), through a
:class:`PushSink` (Feast: :class:`features.sink.FeastSink`). A failed push is
retried ``retries`` times with doubling backoff; then it counts as a failed
push, and its rows go back to the buffer (unless newer rows of their keys
arrived) for the next flush. When the buffer is full, new rows are dropped
and counted. Nothing here raises into the caller.

>>> class Memory:
...     def __init__(self): self.rows = []
...     def open(self): pass
...     def push(self, view, rows, event_us, created_us): self.rows.extend(rows)
...     def tick(self): pass
...     def close(self): pass
>>> sink = Memory()
>>> pusher = FeaturePusher(sink, PushConfig(flush_s=0.01))
>>> pusher.start()
>>> pusher.submit("user_group", [{"user_id": "u1", "category": "drill", "group_id": "drill/g0"}], event_us=1)
1
>>> pusher.flush(timeout_s=5)
True
>>> pusher.close()
>>> sink.rows
[{'user_id': 'u1', 'category': 'drill', 'group_id': 'drill/g0'}]
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from features.schema import FeatureRowError, validate_row, view_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushConfig:
    """How rows are batched and retried (defaults as in ``infra.settings.FeaturesSettings``).

    Attributes
    ----------
    batch_rows
        A flush starts as soon as this many rows wait (default 1000; at most this many per view and push).
    flush_s
        Least time between two flushes started by the clock, so the longest a row waits before
        its flush starts (default 0.1 s).
    queue_rows
        Most rows waiting over all views; past it new rows are dropped and counted (default 200_000).
    retries
        Retries of a failed push before it counts as failed (default 3).
    retry_backoff_s
        Wait before the first retry; doubles each time, at most 5 s (default 0.2 s).
    validate
        Check every submitted row against its view's schema (default True).
    """

    batch_rows: int = 1000
    flush_s: float = 0.1
    queue_rows: int = 200_000
    retries: int = 3
    retry_backoff_s: float = 0.2
    validate: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_rows", "queue_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"PushConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if self.flush_s <= 0:
            raise ValueError(f"PushConfig.flush_s must be > 0 seconds (got {self.flush_s})")
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("PushConfig.retries and retry_backoff_s must be >= 0")

    @classmethod
    def from_settings(cls, features: Any) -> PushConfig:
        """From ``settings.features``."""
        return cls(
            batch_rows=features.push_batch_rows,
            flush_s=features.push_flush_s,
            queue_rows=features.push_queue_rows,
            retries=features.push_retries,
            retry_backoff_s=features.push_retry_backoff_s,
        )


class PushSink(Protocol):
    """Where rows go. Every method runs on the pusher's thread."""

    def open(self) -> None:
        """Connect (may be slow: Feast's import); raising makes the pusher retry later."""

    def push(self, view: str, rows: list[dict[str, Any]], event_us: list[int], created_us: int) -> None:
        """Write ``rows`` of ``view`` with their event times (epoch µs); raise on failure."""

    def tick(self) -> None:
        """Called about every ``flush_s`` (periodic work such as appending history)."""

    def close(self) -> None:
        """Flush what is buffered and release connections."""


class PushObserver:
    """Hooks called by the pusher (no-ops here; the worker maps them to Prometheus metrics)."""

    def pushed(self, view: str, rows: int, seconds: float, oldest_wait_s: float) -> None:
        """``rows`` were written in ``seconds``; the oldest had waited ``oldest_wait_s`` since submit."""

    def retried(self, view: str, error: BaseException) -> None:
        """A push attempt failed and will be retried."""

    def failed(self, view: str, rows: int, error: BaseException) -> None:
        """A push failed after every retry; its rows were put back (or dropped when superseded)."""

    def dropped(self, view: str, rows: int, reason: str) -> None:
        """Rows were not pushed: ``queue_full``, ``invalid``, or ``closing`` (the store failed at shutdown)."""

    def queued(self, rows: int) -> None:
        """Rows now waiting."""


@dataclass
class PushCounters:
    """Totals since start, for tests and benchmarks."""

    submitted: int = 0
    pushed: int = 0
    pushes: int = 0
    retries: int = 0
    failed_pushes: int = 0
    dropped_queue_full: int = 0
    dropped_invalid: int = 0
    last_error: str = ""


@dataclass
class _Entry:
    row: dict[str, Any]
    event_us: int
    since: float  # monotonic time of the first submit of this key still waiting


@dataclass
class _Pending:
    entries: dict[tuple[str, ...], _Entry] = field(default_factory=dict)


class FeaturePusher:
    """Batches feature rows per view and pushes them from a background thread."""

    def __init__(self, sink: PushSink, config: PushConfig | None = None, observer: PushObserver | None = None) -> None:
        self.sink = sink
        self.config = config or PushConfig()
        self.observer = observer or PushObserver()
        self.counters = PushCounters()
        self._pending: dict[str, _Pending] = {}
        self._count = 0
        self._inflight = 0
        self._cond = threading.Condition()
        self._closing = False
        self._forced = 0  # flush() calls waiting: rows are due now
        self._last_flush = -1e9  # monotonic start of the last flush
        self._thread: threading.Thread | None = None
        self._opened = False
        self._first_open = threading.Event()  # set once the sink's first open attempt ended
        self._invalid_logged: set[tuple[str, str]] = set()
        self._open_logged = -1e9

    # ------------------------------------------------------------ caller side

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="osmf-feature-push", daemon=True)
                self._thread.start()

    def wait_opened(self, timeout_s: float) -> bool:
        """Wait until the first attempt to open the sink ended; True when the sink is open."""
        self._first_open.wait(timeout_s)
        return self._opened

    def submit(self, view: str, rows: Sequence[Mapping[str, Any]], event_us: int) -> int:
        """Queue ``rows`` of ``view`` stamped with event time ``event_us`` (epoch µs); returns rows accepted.

        Never blocks on the store and never raises for bad rows: invalid rows
        and rows past ``queue_rows`` are dropped and counted.
        """
        if not rows:
            return 0
        try:
            schema = view_schema(view)
        except FeatureRowError as exc:
            self._drop_invalid(view, len(rows), exc)
            return 0
        valid: list[dict[str, Any]] = []
        for row in rows:
            if self.config.validate:
                try:
                    validate_row(view, row)
                except FeatureRowError as exc:
                    self._drop_invalid(view, 1, exc)
                    continue
            valid.append(dict(row))
        now = time.monotonic()
        accepted = 0
        full = 0
        with self._cond:
            pending = self._pending.setdefault(view, _Pending())
            for row in valid:
                key = schema.key_of(row)
                entry = pending.entries.get(key)
                if entry is not None:
                    entry.row, entry.event_us = row, max(event_us, entry.event_us)
                    accepted += 1
                elif self._count < self.config.queue_rows:
                    pending.entries[key] = _Entry(row, event_us, now)
                    self._count += 1
                    accepted += 1
                else:
                    full += 1
            self.counters.submitted += accepted
            self.counters.dropped_queue_full += full
            if self._count >= self.config.batch_rows or (accepted and self._count == accepted):
                self._cond.notify()  # a full batch, or the first rows the idle thread has to time
            count = self._count
        if full:
            self.observer.dropped(view, full, "queue_full")
        self.observer.queued(count)
        return accepted

    def waiting(self) -> int:
        """Rows waiting to be pushed (not counting a push in flight)."""
        with self._cond:
            return self._count

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Push everything waiting now; True once nothing waits and nothing is in flight."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._forced += 1
            try:
                self._cond.notify_all()
                while self._count or self._inflight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(min(remaining, 0.05))
                    self._cond.notify_all()
            finally:
                self._forced -= 1
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Push what waits (within ``timeout_s``), close the sink, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    # ------------------------------------------------------------ thread side

    def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._opened and not self._open():
                if self._wait_closing(min(max(self.config.retry_backoff_s, 0.5), 5.0)):
                    break
                continue
            batch = self._take(backoff)
            if batch is None:
                break
            ok = True
            for view, entries in batch:
                ok = self._push(view, entries) and ok
            with self._cond:
                self._inflight = 0
                self._cond.notify_all()
            backoff = 0.0 if ok else min(max(backoff * 2, self.config.retry_backoff_s, 0.05), 5.0)
            self._tick()
        if self._opened:
            try:
                self.sink.close()
            except Exception as exc:  # noqa: BLE001 - closing must not raise into shutdown
                log.warning("feature sink close failed: %s", exc)

    def _open(self) -> bool:
        try:
            try:
                self.sink.open()
            finally:
                self._first_open.set()
        except Exception as exc:  # noqa: BLE001 - any failure: retry later, the stream goes on
            message = f"open: {type(exc).__name__}: {exc}"
            now = time.monotonic()
            if message != self.counters.last_error or now - self._open_logged >= 60:
                log.warning("feature store cannot be opened, retrying (logged once a minute): %s", exc)
                self._open_logged = now
            self.counters.last_error = message
            self.counters.failed_pushes += 1  # nothing can be pushed while the store cannot be opened
            self.observer.failed("<open>", 0, exc)
            return False
        self._opened = True
        return True

    def _wait_closing(self, seconds: float) -> bool:
        with self._cond:
            if not self._closing:
                self._cond.wait(seconds)
            return self._closing

    def _take(self, backoff: float) -> list[tuple[str, list[tuple[tuple[str, ...], _Entry]]]] | None:
        """Wait until a flush is due; take the due rows (at most ``batch_rows`` per view)."""
        cfg = self.config
        with self._cond:
            if backoff:
                self._cond.wait(backoff)
            while True:
                if self._closing and not self._count:
                    return None
                now = time.monotonic()
                since_flush = now - self._last_flush
                if self._count and (
                    self._closing or self._forced or self._count >= cfg.batch_rows or since_flush >= cfg.flush_s
                ):
                    break
                self._cond.wait(max(cfg.flush_s - since_flush, 0.001) if self._count else cfg.flush_s)
                if not self._count:
                    self._tick_unlocked()
            batch = []
            for view, pending in self._pending.items():
                if not pending.entries:
                    continue
                taken = []
                for key in list(pending.entries)[: cfg.batch_rows]:
                    taken.append((key, pending.entries.pop(key)))
                self._count -= len(taken)
                batch.append((view, taken))
            self._inflight = sum(len(t) for _, t in batch)
            self._last_flush = time.monotonic()
            count = self._count
        self.observer.queued(count)
        return batch

    def _tick_unlocked(self) -> None:
        self._cond.release()
        try:
            self._tick()
        finally:
            self._cond.acquire()

    def _tick(self) -> None:
        try:
            self.sink.tick()
        except Exception as exc:  # noqa: BLE001
            self.counters.last_error = f"tick: {type(exc).__name__}: {exc}"
            log.warning("feature sink periodic work failed: %s", exc)

    def _push(self, view: str, entries: list[tuple[tuple[str, ...], _Entry]]) -> bool:
        rows = [e.row for _, e in entries]
        event_us = [e.event_us for _, e in entries]
        oldest = min(e.since for _, e in entries)
        delay = self.config.retry_backoff_s
        for attempt in range(self.config.retries + 1):
            start = time.monotonic()
            try:
                self.sink.push(view, rows, event_us, int(time.time() * 1_000_000))
            except Exception as exc:  # noqa: BLE001 - any store error: retry, then count and requeue
                self.counters.last_error = f"{view}: {type(exc).__name__}: {exc}"
                if attempt < self.config.retries:
                    self.counters.retries += 1
                    self.observer.retried(view, exc)
                    if self._wait_closing(delay):
                        delay = 0.0
                    delay = min(delay * 2, 5.0)
                    continue
                self.counters.failed_pushes += 1
                self.observer.failed(view, len(rows), exc)
                log.warning("feature push of %d %s rows failed after %d retries: %s",
                            len(rows), view, self.config.retries, exc)
                self._requeue(view, entries)
                return False
            end = time.monotonic()
            self.counters.pushed += len(rows)
            self.counters.pushes += 1
            self.observer.pushed(view, len(rows), end - start, end - oldest)
            return True
        return False  # pragma: no cover - the loop always returns

    def _requeue(self, view: str, entries: list[tuple[tuple[str, ...], _Entry]]) -> None:
        """Put failed rows back in front of the waiting ones, unless newer rows of their keys wait."""
        dropped = 0
        with self._cond:
            if self._closing:  # shutting down with the store failing: give up on these rows
                self.counters.dropped_queue_full += len(entries)
                dropped_now = len(entries)
            else:
                dropped_now = 0
        if dropped_now:
            self.observer.dropped(view, dropped_now, "closing")
            return
        with self._cond:
            pending = self._pending.setdefault(view, _Pending())
            merged: dict[tuple[str, ...], _Entry] = {}
            for key, entry in entries:
                if key in pending.entries:
                    continue
                if self._count + len(merged) >= self.config.queue_rows:
                    dropped += 1
                    continue
                merged[key] = entry
            self._count += len(merged)
            merged.update(pending.entries)
            pending.entries = merged
            self.counters.dropped_queue_full += dropped
        if dropped:
            self.observer.dropped(view, dropped, "queue_full")

    def _drop_invalid(self, view: str, rows: int, exc: FeatureRowError) -> None:
        self.counters.dropped_invalid += rows
        self.counters.last_error = str(exc)
        self.observer.dropped(view, rows, "invalid")
        marker = (exc.view, exc.field)
        if marker not in self._invalid_logged:
            self._invalid_logged.add(marker)
            log.error("invalid feature row dropped (logged once per field): %s", exc)
