"""Which offset each input partition must deliver next, so that no record is skipped.

Faust's consumer can hand a stream a partition's records with a hole and commit
past it as if the missing records had been processed (observed: a restarted
worker never received one outcome message and committed past it). Its code has
the means: the fetch loop drops a record below the last offset it handed over
(e.g. records re-fetched after a seek while older ones were still on their way),
and offsets it never delivered count as done (``Consumer._add_gap``). Those
records' counts are then lost.
:class:`OffsetGuard` keeps the next offset of every partition a stage has
processed (journaled with the stage's entries, so a restarted worker knows it
too); a record above it reveals a hole, which the worker reads itself
(:func:`read_records`) before going on. The worker's topics have no holes of
their own (no compaction, no transactions).

>>> guard = OffsetGuard()
>>> guard.expect("t", 0, 5)
>>> [guard.admit("t", 0, o).value for o in (4, 5, 8)], guard.expected("t", 0)
(['behind', 'process', 'hole'], 6)
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord


class Admit(enum.Enum):
    """What to do with a record."""

    PROCESS = "process"
    """The next offset (or the first record of a partition the guard does not know): process it."""
    BEHIND = "behind"
    """Below the next offset: a re-delivery (or a re-created topic); process it, the stages drop what they
    counted already by event id."""
    HOLE = "hole"
    """Above the next offset: read the records from :meth:`OffsetGuard.expected` up to it first."""


class OffsetGuard:
    """Next offset to process per ``(topic, partition)``."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def expect(self, topic: str, partition: int, offset: int) -> None:
        """Set the next offset of a partition."""
        self._next[(topic, partition)] = offset

    def reset(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Forget every partition, then expect ``offsets`` (``(topic, partition) -> next offset``)."""
        self._next = dict(offsets)

    def expected(self, topic: str, partition: int) -> int | None:
        """The next offset of a partition; ``None`` while unknown."""
        return self._next.get((topic, partition))

    def admit(self, topic: str, partition: int, offset: int) -> Admit:
        """Classify a record; :attr:`Admit.PROCESS` moves the partition past it."""
        expected = self._next.get((topic, partition))
        if expected is None or offset == expected:
            self._next[(topic, partition)] = offset + 1
            return Admit.PROCESS
        return Admit.BEHIND if offset < expected else Admit.HOLE


async def read_records(bootstrap: str, options: Mapping[str, Any], topic: str, partition: int, start: int, end: int,
                       timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Records ``start <= offset < end`` of one partition, read by a consumer of its own (no group;
    ``options``: aiokafka client options such as security).

    Fewer come back only when the log lacks some (then the caller goes on without them); raises
    :class:`TimeoutError` when the broker does not deliver them within ``timeout_s``.
    """
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100, **options)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: offsets {start}-{end - 1} not read in {timeout_s:.0f} s")
            fetched = await consumer.getmany(tp, timeout_ms=500)
            records.extend(r for r in fetched.get(tp, []) if start <= r.offset < end)
            await asyncio.sleep(0)
        return records
    finally:
        await consumer.stop()
