"""A bounded replay buffer of preference pairs, newest weighted most.

Pairs come from the stream worker (``osmf.preference-pairs``). The same pair
is re-sent at higher evidence levels and after a worker restart; the buffer
keeps one entry per (group, product, winner, loser), the latest. When full,
the oldest entries go first. Held-out pairs for the gate are chosen by a hash
of the pair's identity, so a pair never moves between training and held-out.

>>> from infra.contracts.messages import PreferencePair
>>> buffer = PairBuffer(capacity=10, half_life_s=60)
>>> buffer.add(PreferencePair(pair_id="x", ts=0, group_id="g", category="c", product_id="p",
...     winner_creative_id="w", loser_creative_id="l", winner_prompt="a", loser_prompt="b",
...     winner_impressions=100, winner_clicks=9, loser_impressions=100, loser_clicks=1,
...     winner_ctr=0.09, loser_ctr=0.01, prob_winner_better=0.99, evidence_level=0))
True
>>> len(buffer), buffer.new_pairs
(1, 1)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from infra.contracts.messages import PreferencePair


@dataclass(frozen=True)
class TrainingTrigger:
    """Train after ``min_new_pairs`` new pairs, or after ``max_wait_s`` with at least one new pair."""

    min_new_pairs: int = 200
    max_wait_s: float = 600.0


class PairBuffer:
    """Bounded, deduplicated store of the freshest preference pairs.

    Parameters
    ----------
    capacity
        Most pairs kept; the oldest (by ``ts``) are dropped first.
    half_life_s
        Recency weighting: a pair ``half_life_s`` older than the newest weighs half.
    """

    def __init__(self, capacity: int = 20_000, half_life_s: float = 3600.0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.capacity = capacity
        self.half_life_s = half_life_s
        self._pairs: OrderedDict[tuple[str, str, str, str], PreferencePair] = OrderedDict()
        self.new_pairs = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, pair: PreferencePair) -> bool:
        """Keep ``pair`` (replacing an older one of the same identity); True if it is new information."""
        key = (pair.group_id, pair.product_id, pair.winner_creative_id, pair.loser_creative_id)
        old = self._pairs.get(key)
        if old is not None and old.evidence_level >= pair.evidence_level:
            return False
        self._pairs.pop(key, None)
        self._pairs[key] = pair
        self.new_pairs += 1
        while len(self._pairs) > self.capacity:
            oldest = min(self._pairs, key=lambda k: self._pairs[k].ts)
            del self._pairs[oldest]
        return True

    def pairs(self) -> list[PreferencePair]:
        """Every pair held, oldest first."""
        return sorted(self._pairs.values(), key=lambda p: p.ts)

    def recency_weights(self, pairs: list[PreferencePair]) -> np.ndarray:
        """``0.5 ** (age / half_life)`` with age measured from the newest pair."""
        if not pairs:
            return np.zeros(0)
        newest = max(p.ts for p in pairs)
        ages_s = np.array([(newest - p.ts) / 1000.0 for p in pairs])
        return 0.5 ** (ages_s / self.half_life_s)

    def split(self, heldout_fraction: float = 0.2) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """(training, held-out) pairs; membership is fixed by a hash of each pair's identity."""
        train, heldout = [], []
        for pair in self.pairs():
            identity = f"{pair.group_id}|{pair.product_id}|{pair.winner_creative_id}|{pair.loser_creative_id}"
            bucket = int(hashlib.blake2b(identity.encode(), digest_size=4).hexdigest(), 16) / 2**32
            (heldout if bucket < heldout_fraction else train).append(pair)
        return train, heldout

    def should_train(self, trigger: TrainingTrigger, seconds_since_last_round: float) -> bool:
        """Whether enough new pairs (or enough time with some) have arrived."""
        if self.new_pairs >= trigger.min_new_pairs:
            return True
        return self.new_pairs > 0 and seconds_since_last_round >= trigger.max_wait_s

    def mark_trained(self) -> None:
        """Start counting new pairs from zero (after a training round)."""
        self.new_pairs = 0
