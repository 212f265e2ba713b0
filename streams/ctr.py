"""Click-through counts of one creative (or one attribute value) in one group.

The worker keeps its counts in the ``ctr`` and ``attr_ctr`` tables
(:mod:`streams.aggregate`); :class:`CreativeStats` is how pair mining and the
learner read one of them.
"""

from __future__ import annotations

from dataclasses import dataclass


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
