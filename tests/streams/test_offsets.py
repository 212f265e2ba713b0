"""The offset guard: a hole in a partition's offsets is reported (the worker reads the records), never passed."""

from __future__ import annotations

from streams.journal import JournalChanges, JournalStore
from streams.offsets import Admit, OffsetGuard


def _admit(guard: OffsetGuard, offsets: list[int]) -> list[str]:
    return [guard.admit("outcomes", 2, offset).value for offset in offsets]


def test_records_are_processed_in_order_and_a_hole_is_reported_not_passed() -> None:
    guard = OffsetGuard()
    guard.expect("outcomes", 2, 2)
    # 2 and 3 in order; 3 again is a re-delivery; 6 while 4 is next is a hole (4 and 5 were skipped).
    assert _admit(guard, [2, 3, 3, 6]) == ["process", "process", "behind", "hole"]
    assert guard.expected("outcomes", 2) == 4, "a hole does not move the partition on"
    assert _admit(guard, [4, 5, 6]) == ["process", "process", "process"]


def test_an_unknown_partition_starts_at_its_first_record() -> None:
    guard = OffsetGuard()
    assert _admit(guard, [7, 8, 10]) == ["process", "process", "hole"]
    assert guard.expected("outcomes", 2) == 9
    assert guard.expected("outcomes", 0) is None


def test_reset_keeps_only_the_given_offsets() -> None:
    guard = OffsetGuard()
    guard.expect("clicks", 1, 40)
    guard.reset({("impressions", 0): 12})
    assert guard.expected("clicks", 1) is None
    assert guard.admit("impressions", 0, 11) is Admit.BEHIND


def test_the_journal_recovers_the_next_offset_of_each_input_partition() -> None:
    table: dict = {}
    store = JournalStore(table, window_ms=None)
    store.write(JournalChanges({"a": 1}, []), 0, 10, offsets={"impressions": 5, "clicks": 2})
    store.write(JournalChanges({"b": 1}, []), 0, 11, offsets={"impressions": 9})
    store.write(JournalChanges({"c": 1}, []), 3, 12, offsets={"clicks": 4})
    store.write(JournalChanges({}, []), 3, 13, offsets={"clicks": 8})  # nothing changed: no entry
    again = JournalStore(table, window_ms=None)
    again.recover()
    assert again.recovered_offsets == {("impressions", 0): 9, ("clicks", 0): 2, ("clicks", 3): 4}
    assert again.entries_per_partition() == {0: 2, 3: 1}
