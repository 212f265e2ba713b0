"""The streaming pusher: batching by size and time, coalescing, retries, failure counters, never blocking."""

from __future__ import annotations

import doctest
import threading
import time

import pytest

import features.changes
import features.push
import features.rows
import features.schema
from features.push import FeaturePusher, PushConfig, PushObserver
from features.rows import user_group_row
from features.schema import FeatureRowError, validate_row


class Sink:
    """Records pushes; can fail the next ``fail`` pushes or hang until released."""

    def __init__(self, fail: int = 0, fail_open: int = 0) -> None:
        self.pushes: list[tuple[str, list[dict], list[int], float]] = []
        self.fail = fail
        self.fail_open = fail_open
        self.release = threading.Event()
        self.release.set()
        self.closed = False

    def open(self) -> None:
        if self.fail_open:
            self.fail_open -= 1
            raise ConnectionError("store down")

    def push(self, view, rows, event_us, created_us) -> None:  # noqa: ANN001
        self.release.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("store down")
        self.pushes.append((view, list(rows), list(event_us), time.monotonic()))

    def tick(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Observer(PushObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def failed(self, view, rows, error) -> None:  # noqa: ANN001
        self.events.append(("failed", view, rows))

    def dropped(self, view, rows, reason) -> None:  # noqa: ANN001
        self.events.append(("dropped", view, rows, reason))


def users(n: int, start: int = 0, group: str = "drill/g0") -> list[dict]:
    return [user_group_row(f"u{i}", "drill", group) for i in range(start, start + n)]


@pytest.mark.parametrize("module", [features.push, features.rows, features.changes])
def test_docstring_examples(module) -> None:  # noqa: ANN001
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def test_full_batches_go_at_once_and_partial_ones_at_most_flush_s_after_the_last_flush() -> None:
    # flush_s is long, so that "went at once" and "waited for the clock" stay apart on a busy machine.
    sink = Sink()
    pusher = FeaturePusher(sink, PushConfig(batch_rows=100, flush_s=1.5))
    pusher.start()
    try:
        time.sleep(0.05)  # the thread is idle
        submitted = time.monotonic()
        pusher.submit("user_group", users(250), event_us=1)
        assert pusher.flush(5)
        sizes = [len(rows) for _, rows, _, _ in sink.pushes]
        assert sizes[:2] == [100, 100] and sum(sizes) == 250
        assert sink.pushes[0][3] - submitted < 1.0, "a full batch must not wait for the clock"
        time.sleep(1.6)  # quiet longer than flush_s: the next rows go at once
        sink.pushes.clear()
        submitted = time.monotonic()
        pusher.submit("user_group", users(3, start=1000), event_us=2)
        _wait_for_pushes(sink, 1)
        assert sink.pushes[0][3] - submitted < 1.0
        submitted = time.monotonic()  # right after a flush: these wait for the clock
        pusher.submit("user_group", users(3, start=2000), event_us=3)
        _wait_for_pushes(sink, 2)
        waited = sink.pushes[1][3] - submitted
        assert 0.7 <= waited <= 4.0, f"rows right after a flush wait about flush_s, waited {waited:.3f} s"
    finally:
        pusher.close()
    assert sink.closed


def _wait_for_pushes(sink: Sink, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(sink.pushes) < count and time.monotonic() < deadline + 5:
        time.sleep(0.005)
    assert len(sink.pushes) >= count


def test_rows_of_one_key_are_coalesced_to_the_newest() -> None:
    sink = Sink()
    pusher = FeaturePusher(sink, PushConfig(flush_s=10))
    pusher.submit("user_group", users(1, group="drill/g0"), event_us=10)
    pusher.submit("user_group", users(1, group="drill/g3"), event_us=20)
    assert pusher.waiting() == 1
    pusher.start()
    assert pusher.flush(5)
    pusher.close()
    [(view, rows, stamps, _)] = sink.pushes
    assert rows == users(1, group="drill/g3") and stamps == [20]


def test_a_failed_push_is_retried_and_then_counted_and_kept_for_later() -> None:
    sink = Sink(fail=5)
    observer = Observer()
    pusher = FeaturePusher(sink, PushConfig(flush_s=0.01, retries=2, retry_backoff_s=0.01), observer)
    pusher.start()
    pusher.submit("user_group", users(10), event_us=1)
    assert pusher.flush(10)
    pusher.close()
    assert pusher.counters.retries == 4  # 2 per failed push
    assert pusher.counters.failed_pushes == 1  # attempts 1-3 fail, 4-5 fail (retried), 6 succeeds
    assert ("failed", "user_group", 10) in observer.events
    assert sum(len(rows) for _, rows, _, _ in sink.pushes) == 10, "rows of a failed push are pushed later"
    assert "store down" in pusher.counters.last_error


def test_requeued_rows_never_overwrite_newer_ones() -> None:
    sink = Sink(fail=1)
    pusher = FeaturePusher(sink, PushConfig(flush_s=0.01, retries=0, retry_backoff_s=0.2))
    sink.release.clear()  # the first push hangs ...
    pusher.start()
    pusher.submit("user_group", users(1, group="drill/g0"), event_us=1)
    time.sleep(0.1)
    pusher.submit("user_group", users(1, group="drill/g5"), event_us=2)  # ... while a newer row arrives
    sink.release.set()  # ... then fails
    assert pusher.flush(10)
    pusher.close()
    assert [rows[0]["group_id"] for _, rows, _, _ in sink.pushes] == ["drill/g5"]


def test_submit_never_blocks_on_a_hanging_store_and_the_queue_is_bounded() -> None:
    sink = Sink()
    sink.release.clear()
    observer = Observer()
    pusher = FeaturePusher(sink, PushConfig(batch_rows=10, flush_s=0.01, queue_rows=100), observer)
    pusher.start()
    accepted = 0
    for i in range(50):  # the store hangs for good: a submit that waited on it would never return
        accepted += pusher.submit("user_group", users(10, start=i * 10), event_us=i)
    assert accepted <= 110  # the queue, plus at most one batch in flight
    assert pusher.counters.dropped_queue_full == 500 - accepted
    assert any(e[0] == "dropped" and e[3] == "queue_full" for e in observer.events)
    sink.release.set()
    assert pusher.flush(10)
    pusher.close()


def test_an_unreachable_store_is_retried_until_it_answers() -> None:
    sink = Sink(fail_open=2)
    pusher = FeaturePusher(sink, PushConfig(flush_s=0.01, retry_backoff_s=0.01))
    pusher.start()
    pusher.submit("user_group", users(3), event_us=1)
    assert pusher.flush(10)
    pusher.close()
    assert len(sink.pushes) == 1 and "open: ConnectionError" in pusher.counters.last_error


def test_invalid_rows_are_dropped_counted_and_named() -> None:
    observer = Observer()
    pusher = FeaturePusher(Sink(), PushConfig(), observer)
    bad = {"user_id": "u1", "category": "drill", "group_id": 3}
    assert pusher.submit("user_group", [bad, *users(1)], event_us=1) == 1
    assert pusher.submit("no_such_view", users(1), event_us=1) == 0
    assert pusher.counters.dropped_invalid == 2
    assert ("dropped", "user_group", 1, "invalid") in observer.events
    assert "no_such_view.<view>: unknown feature view" in pusher.counters.last_error


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"user_id": "u", "category": "c"}, "user_group.group_id: missing"),
        ({"user_id": "", "category": "c", "group_id": "g"}, "user_group.user_id: entity key must be a non-empty"),
        ({"user_id": "u", "category": "c", "group_id": "g", "extra": 1}, "user_group.extra: not a column"),
    ],
)
def test_row_errors_name_the_field_and_the_fix(row: dict, message: str) -> None:
    with pytest.raises(FeatureRowError, match=message):
        validate_row("user_group", row)


def test_list_items_and_numbers_are_checked() -> None:
    from features.rows import group_profile_row

    row = group_profile_row("c/g0", category="c", rule="all", member_count=1, weight=1.0, centroid={"a=1": 1.0})
    validate_row("group_profile", row)
    with pytest.raises(FeatureRowError, match=r"group_profile.centroid\[0\]: expected float"):
        validate_row("group_profile", {**row, "centroid": ["x"]})
    with pytest.raises(FeatureRowError, match="group_profile.weight: expected a finite float"):
        validate_row("group_profile", {**row, "weight": float("nan")})
    with pytest.raises(FeatureRowError, match="group_profile.member_count: expected int"):
        validate_row("group_profile", {**row, "member_count": True})


def test_push_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="flush_s must be > 0"):
        PushConfig(flush_s=0)
    with pytest.raises(ValueError, match="batch_rows must be >= 1"):
        PushConfig(batch_rows=0)


def test_schema_doctest() -> None:
    assert doctest.testmod(features.schema, optionflags=doctest.ELLIPSIS).failed == 0
