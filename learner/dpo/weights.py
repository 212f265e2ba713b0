"""Per-pair weights that keep small groups from being drowned by large ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

WEIGHTINGS = ("inverse_share", "uniform")


def group_pair_weights(groups: Sequence[str], weighting: str = "inverse_share", power: float = 1.0) -> np.ndarray:
    """Weight of each pair from its group's share of all pairs, normalised to mean 1.

    ``inverse_share`` gives pair *i* the weight ``share(group_i) ** -power``:
    with ``power=1`` every group gets the same total weight, whatever its size.
    ``uniform`` weighs every pair 1 (one-size-fits-all training).

    >>> group_pair_weights(["a", "a", "a", "b"]).round(3).tolist()
    [0.667, 0.667, 0.667, 2.0]
    >>> group_pair_weights(["a", "b"], "uniform").tolist()
    [1.0, 1.0]
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"group_weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if not groups:
        return np.zeros(0)
    if weighting == "uniform":
        return np.ones(len(groups))
    counts = Counter(groups)
    total = len(groups)
    raw = np.array([(counts[g] / total) ** -power for g in groups], dtype=np.float64)
    return raw / raw.mean()
