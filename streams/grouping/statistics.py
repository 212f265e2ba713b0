"""Statistics of a split: is the click profile of two sets of rows the same (exact null moments, log p-values)?"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import chdtrc, log_ndtr

_LOG_TINY = math.log(1e-300)


def _log_p_same(c: np.ndarray, i: np.ndarray) -> float:
    """Log p-value of "these rows share one click-through rate per creative".

    ``c`` and ``i`` are clicks and impressions, rows = parts, columns =
    creatives. Given a creative's clicks, the null spreads them over the
    parts in proportion to their impressions (multinomial), so each creative's
    own rate cancels. Two statistics, the smaller p-value doubled (Bonferroni):

    * *level* — each part's clicks summed over creatives against their
      expectation, with the exact multinomial covariance (a generalised
      Cochran-Mantel-Haenszel test): parts that click more or less overall;
    * *profile* — Pearson's X² summed over creatives: parts that prefer
      different creatives. Its null mean and variance are exact per creative
      (Haldane), and the tail is the chi-square scaled to match both; the
      plain chi-square (or G-test) is far too liberal when cells hold a click
      or two, as they do here.
    """
    i = np.maximum(i, c)
    clicks, shown = c.sum(axis=0), i.sum(axis=0)
    used = clicks > 0
    if len(c) < 2 or not used.any():
        return 0.0
    c, i, clicks, shown = c[:, used], i[:, used], clicks[used], shown[used]
    present = i > 0
    share = i / shown
    expected = clicks * share
    covariance = np.diag((clicks * share).sum(axis=1)) - (clicks * share) @ share.T
    deviation = (c - expected).sum(axis=1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # singular: clicks sum to their total
    kept = eigenvalues > 1e-9 * max(float(eigenvalues.max()), 1e-300)
    rank = int(kept.sum())
    projected = eigenvectors[:, kept].T @ deviation
    level = float((projected**2 / eigenvalues[kept]).sum())
    statistic = float(((c - expected) ** 2 / np.where(present, expected, 1.0)).sum())
    parts = present.sum(axis=0)
    inverse = np.where(present, 1.0 / np.where(present, share, 1.0), 0.0).sum(axis=0)
    mean = float((parts - 1).sum())
    variance = float((2.0 * (parts - 1) + (inverse - parts**2 - 2 * parts + 2) / clicks).sum())
    return float(_combine(np.array([level]), np.array([float(rank)]), np.array([statistic]), mean, variance)[0])


def _log_p_pairs(c: np.ndarray, i: np.ndarray, cs: np.ndarray, is_: np.ndarray) -> np.ndarray:
    """:func:`_log_p_same` of part (``c``, ``i``) against each row of (``cs``, ``is_``), vectorised."""
    i, is_ = np.maximum(i, c), np.maximum(is_, cs)
    clicks, shown = c + cs, i + is_  # (pairs, creatives)
    used = clicks > 0
    share = np.divide(i, shown, out=np.zeros_like(shown), where=shown > 0)
    both = used & (i > 0) & (is_ > 0)
    expected = clicks * share
    level_var = (clicks * share * (1 - share)).sum(axis=1)
    deviation = (c - expected).sum(axis=1)
    level = np.divide(deviation**2, level_var, out=np.zeros_like(level_var), where=level_var > 0)
    safe = np.where(both, share * (1 - share) * clicks, 1.0)
    statistic = np.where(both, (c - expected) ** 2 / safe, 0.0).sum(axis=1)
    inverse = np.where(both, 1 / np.where(both, share, 1.0) + 1 / np.where(both, 1 - share, 1.0), 0.0)
    mean = both.sum(axis=1).astype(float)
    variance = np.where(both, 2.0 + (inverse - 6.0) / np.where(both, clicks, 1.0), 0.0).sum(axis=1)
    return _combine(level, (level_var > 0).astype(float), statistic, mean, variance)


def _combine(level: np.ndarray, level_df: np.ndarray, statistic: np.ndarray, mean: Any, variance: Any) -> np.ndarray:
    """Both p-values in logs, the smaller doubled; 0 where neither test has data."""
    mean, variance = np.broadcast_to(mean, statistic.shape), np.broadcast_to(variance, statistic.shape)
    variance = np.maximum(variance, 2.0 * mean)
    has = mean > 0
    scale = np.where(has, variance / np.where(has, 2.0 * mean, 1.0), 1.0)
    df = np.where(has, 2.0 * mean**2 / np.where(has, variance, 1.0), 0.0)
    log_p_profile = np.where(has, _log_chi2_sf(statistic / scale, df), 0.0)
    log_p_level = np.where(level_df > 0, _log_chi2_sf(level, level_df), 0.0)
    return np.minimum(0.0, np.minimum(log_p_level, log_p_profile) + math.log(2.0))


def _log_chi2_sf(x: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Natural log of the chi-square survival function, also below float range (0 where ``df`` is 0)."""
    x, df = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(df, dtype=float))
    ok = df > 0
    safe_df = np.where(ok, df, 1.0)
    p = chdtrc(safe_df, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (np.cbrt(x / safe_df) - (1 - 2 / (9 * safe_df))) / np.sqrt(2 / (9 * safe_df))  # Wilson-Hilferty
        tail = np.minimum(log_ndtr(-z), _LOG_TINY)
        out = np.where(p > 1e-300, np.log(np.maximum(p, 1e-300)), tail)
    return np.where(ok, out, 0.0)


def _log_stirling2(n: int, k: int) -> float:
    """Log of the Stirling number of the second kind: the ways to split ``n`` values into ``k`` parts."""
    row = [1] + [0] * k
    for m in range(1, n + 1):
        row = [0] + [j * row[j] + row[j - 1] for j in range(1, k + 1)]
    return math.log(max(row[k], 1))
