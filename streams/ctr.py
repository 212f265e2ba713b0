"""Click-through counters per (group, product, creative) and per (group, visual attribute).

:class:`CtrBook` is plain nested dicts, cheap to update in the worker's hot path
and to pickle. The worker counts one micro-batch into a fresh book and adds it to
its long-lived book with :meth:`CtrBook.merge`.

>>> book = CtrBook()
>>> book.record_impression("g1", "p1", "c1", {"background": "dots"})
>>> book.record_click("g1", "p1", "c1", {"background": "dots"})
>>> book.record_impression("g1", "p1", "c2", {"background": "solid"})
>>> book.creatives("g1", "p1")
{'c1': CreativeStats(impressions=1, clicks=1), 'c2': CreativeStats(impressions=1, clicks=0)}
>>> book.attributes("g1")[("background", "dots")].ctr
1.0
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_NO_ATTRIBUTES: Mapping[str, str] = {}


@dataclass(slots=True)
class CreativeStats:
    """Impression and click counts of one creative (or one attribute value) in one group.

    Attributes
    ----------
    impressions
        Times shown.
    clicks
        Times clicked. In a micro-batch delta it can exceed ``impressions``
        (the click's impression was counted in an earlier batch).

    Examples
    --------
    >>> CreativeStats().ctr
    0.0
    >>> CreativeStats(impressions=50, clicks=2).ctr
    0.04
    """

    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        """Observed click-through rate ``clicks / impressions``; 0.0 before any impression."""
        return self.clicks / self.impressions if self.impressions else 0.0

    def add(self, other: CreativeStats) -> None:
        """Add another counter's counts to this one."""
        self.impressions += other.impressions
        self.clicks += other.clicks


class CtrBook:
    """Counters keyed by (group, product, creative) and by (group, attribute, value).

    Attribute counters give each group's CTR on visual creative attributes (the
    ``attributes()`` of a :class:`streams.prompt.CreativePrompt`), one of the
    group preference features.

    Examples
    --------
    >>> total, delta = CtrBook(), CtrBook()
    >>> delta.record_impression("g1", "p1", "c1")
    >>> delta.record_click("g1", "p1", "c1")
    >>> total.merge(delta)
    >>> total.merge(delta)
    >>> list(total.items())
    [(('g1', 'p1', 'c1'), CreativeStats(impressions=2, clicks=2))]
    """

    __slots__ = ("_creatives", "_attributes")

    def __init__(self) -> None:
        self._creatives: dict[tuple[str, str], dict[str, CreativeStats]] = {}
        self._attributes: dict[str, dict[tuple[str, str], CreativeStats]] = {}

    def record_impression(
        self, group: str, product: str, creative: str, attributes: Mapping[str, str] = _NO_ATTRIBUTES
    ) -> None:
        """Count one impression of ``creative`` for ``product`` in ``group`` (and of each attribute value)."""
        self._creative(group, product, creative).impressions += 1
        if attributes:
            table = self._attribute_table(group)
            for item in attributes.items():
                stats = table.get(item)
                if stats is None:
                    stats = table[item] = CreativeStats()
                stats.impressions += 1

    def record_click(
        self, group: str, product: str, creative: str, attributes: Mapping[str, str] = _NO_ATTRIBUTES
    ) -> None:
        """Count one click on ``creative`` for ``product`` in ``group`` (and on each attribute value)."""
        self._creative(group, product, creative).clicks += 1
        if attributes:
            table = self._attribute_table(group)
            for item in attributes.items():
                stats = table.get(item)
                if stats is None:
                    stats = table[item] = CreativeStats()
                stats.clicks += 1

    def creatives(self, group: str, product: str) -> dict[str, CreativeStats]:
        """Counters of every creative seen for ``product`` in ``group`` (empty if none).

        The dict is new; its values are the book's live counters (read them, do not change them).
        """
        return dict(self._creatives.get((group, product), _NO_CREATIVES))

    def attributes(self, group: str) -> dict[tuple[str, str], CreativeStats]:
        """Counters of every (attribute, value) seen in ``group``; new dict, live counters."""
        return dict(self._attributes.get(group, _NO_VALUES))

    def merge(self, delta: CtrBook) -> None:
        """Add every count of ``delta`` to this book (``delta`` is left unchanged and unshared)."""
        for key, table in delta._creatives.items():
            mine = self._creatives.get(key)
            if mine is None:
                mine = self._creatives[key] = {}
            for creative, stats in table.items():
                _add_into(mine, creative, stats)
        for group, values in delta._attributes.items():
            mine_values = self._attribute_table(group)
            for item, stats in values.items():
                _add_into(mine_values, item, stats)

    def items(self) -> Iterator[tuple[tuple[str, str, str], CreativeStats]]:
        """Every ``((group, product, creative), stats)`` row, for export."""
        for (group, product), table in self._creatives.items():
            for creative, stats in table.items():
                yield (group, product, creative), stats

    def attribute_items(self) -> Iterator[tuple[tuple[str, str, str], CreativeStats]]:
        """Every ``((group, attribute, value), stats)`` row, for export."""
        for group, values in self._attributes.items():
            for (attribute, value), stats in values.items():
                yield (group, attribute, value), stats

    def __len__(self) -> int:
        """Number of (group, product, creative) rows."""
        return sum(len(table) for table in self._creatives.values())

    def __getstate__(self) -> tuple[dict, dict]:
        return self._creatives, self._attributes

    def __setstate__(self, state: tuple[dict, dict]) -> None:
        self._creatives, self._attributes = state

    def _creative(self, group: str, product: str, creative: str) -> CreativeStats:
        key = (group, product)
        table = self._creatives.get(key)
        if table is None:
            table = self._creatives[key] = {}
        stats = table.get(creative)
        if stats is None:
            stats = table[creative] = CreativeStats()
        return stats

    def _attribute_table(self, group: str) -> dict[tuple[str, str], CreativeStats]:
        table = self._attributes.get(group)
        if table is None:
            table = self._attributes[group] = {}
        return table


_NO_CREATIVES: dict[str, CreativeStats] = {}
_NO_VALUES: dict[tuple[str, str], CreativeStats] = {}


def _add_into(table: dict, key: object, stats: CreativeStats) -> None:
    mine = table.get(key)
    if mine is None:
        table[key] = CreativeStats(stats.impressions, stats.clicks)
    else:
        mine.impressions += stats.impressions
        mine.clicks += stats.clicks
