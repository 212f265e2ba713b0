"""Per-pair weights that keep small groups from being drowned by large ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

WEIGHTINGS = ("inverse_share", "uniform")


def group_pair_weights(
    groups: Sequence[str], weighting: str = "inverse_share", power: float = 1.0, prior_pairs: float = 0.0
) -> np.ndarray:
    """Weight of each pair from its group's share of all pairs, normalised to mean 1.

    ``inverse_share`` gives pair *i* the weight ``(n(group_i) + prior_pairs) ** -power``
    where ``n`` counts the group's pairs: with ``power=1`` and no prior every
    group gets the same total weight, whatever its size. ``prior_pairs``
    shrinks that balancing for groups with few pairs (a group's total weight
    is then ∝ ``n / (n + prior_pairs)``), so a handful of pairs is not drawn
    over and over. ``uniform`` weighs every pair 1 (one-size-fits-all training).

    >>> group_pair_weights(["a", "a", "a", "b"]).round(3).tolist()
    [0.667, 0.667, 0.667, 2.0]
    >>> group_pair_weights(["a", "b"], "uniform").tolist()
    [1.0, 1.0]
    >>> group_pair_weights(["a", "a", "a", "b"], prior_pairs=3).round(3).tolist()
    [0.889, 0.889, 0.889, 1.333]
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"group_weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if not groups:
        return np.zeros(0)
    if weighting == "uniform":
        return np.ones(len(groups))
    if prior_pairs < 0:
        raise ValueError(f"prior_pairs must be >= 0, got {prior_pairs}")
    counts = Counter(groups)
    total = len(groups)
    raw = np.array([((counts[g] + prior_pairs) / total) ** -power for g in groups], dtype=np.float64)
    return raw / raw.mean()
