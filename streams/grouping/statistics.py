"""Statistics of a split: do two or more sets of rows share one *taste* (click profile up to a level)?

Rows are parts of a candidate split; columns are creatives. The null is the
multiplicative model ``E[clicks] = impressions · level(part) · appeal(creative)``:
parts may click more or less overall (a higher base CTR is no reason for an
own creative), but they rank the creatives alike. Given each creative's
clicks, they spread over the parts in proportion to ``impressions · level``;
the levels are fitted (iterative proportional fitting), which costs one
degree of freedom per part but one.

Each test sums squared deviations over columns — per creative, or per value
of a creative attribute with the creatives' deviations pooled
(:mod:`~streams.grouping.evidence`) — and reads the tail from a chi-square
scaled to the statistic's null mean and variance (Haldane's exact
small-count variance per column). The plain chi-square (or G-test) is far
too liberal when cells hold a click or two. The smallest p-value of the
tests is multiplied by their number (Bonferroni).

Examples
--------
Part 0 likes the even creatives, part 1 the odd ones; part 2 clicks twice as
much as part 1 on everything (another level, the same taste):

>>> import numpy as np
>>> shown = np.full((3, 6), 2000.0)
>>> clicks = np.array([[80, 20] * 3, [20, 80] * 3, [40, 160] * 3], dtype=float)
>>> bool(_log_p_same(clicks[:2], shown[:2]) < np.log(1e-6)), bool(_log_p_same(clicks[1:], shown[1:]) > np.log(0.01))
(True, True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import chdtrc, log_ndtr

from streams.grouping.evidence import Evidence, creatives_only

_LOG_TINY = math.log(1e-300)
_FIT_STEPS = 30


def _log_p_same(c: np.ndarray, i: np.ndarray, evidence: Evidence | None = None, level: bool = False) -> float:
    """Log p-value of "these parts share one taste" (see the module docstring).

    ``c`` and ``i`` are clicks and impressions, rows = parts, columns =
    creatives. With ``level``, the family also holds the level test (parts
    click more or less on the same creatives): "one taste *and* one level".
    """
    return _bonferroni(_log_p_tests(c, i, evidence, level))


def _log_p_taste_and_split(c: np.ndarray, i: np.ndarray, evidence: Evidence | None = None) -> tuple[float, float]:
    """:func:`_log_p_same` without and with ``level``, from one fit (half the cost of two calls)."""
    log_ps = _log_p_tests(c, i, evidence, level=True)
    return _bonferroni(log_ps[1:]), _bonferroni(log_ps)


def _bonferroni(log_ps: list[float]) -> float:
    """The smallest log p-value times the number of tests (``0`` for none), at most ``log 1``."""
    return float(min(0.0, min(log_ps) + math.log(len(log_ps)))) if log_ps else 0.0


def _log_p_tests(c: np.ndarray, i: np.ndarray, evidence: Evidence | None, level: bool) -> list[float]:
    """The log p-values of :func:`_log_p_same`'s family, the level test first (with ``level``); none when no
    creative has clicks and two parts shown."""
    i = np.maximum(i, c)
    clicks = c.sum(axis=0)
    used = (clicks > 0) & ((i > 0).sum(axis=0) >= 2)
    if len(c) < 2 or not used.any():
        return []
    evidence = evidence or creatives_only(c.shape[1])
    c, i, clicks = c[:, used], i[:, used], clicks[used]
    log_ps = [_log_p_level(c, i, clicks)] if level else []
    share = _fit_shares(c, i, clicks)
    expected = clicks * share
    deviation = c - expected
    free = len(c) - 1  # fitted levels
    if evidence.appeal:
        log_ps.append(_log_p_appeal(c, i, clicks, share, deviation))
    if evidence.per_creative:
        present = share > 0
        statistic = float(np.where(present, deviation**2 / np.where(present, expected, 1.0), 0.0).sum())
        parts = present.sum(axis=0)
        inverse = np.where(present, 1.0 / np.where(present, share, 1.0), 0.0).sum(axis=0)
        mean = float((parts - 1).sum()) - free
        variance = float((2.0 * (parts - 1) + (inverse - parts**2 - 2 * parts + 2) / clicks).sum()) - 2.0 * free
        log_ps.append(float(_scaled_chi2(np.array([statistic]), mean, variance)[0]))
    if evidence.names:
        columns = evidence.columns[used]
        pooled = deviation @ columns  # (parts, columns)
        weight = clicks[:, None] * columns  # (creatives, columns)
        diagonal = share @ weight  # expected clicks per (part, column)
        outer = (share[:, None, :] * share[None, :, :]).reshape(len(c) ** 2, -1) @ weight  # (parts², columns)
        covariance = -outer.T.reshape(-1, len(c), len(c))
        covariance[:, np.arange(len(c)), np.arange(len(c))] += diagonal.T
        totals = weight.sum(axis=0)
        ok = totals > 0
        quad = np.zeros(len(totals))
        quad[ok] = _quadratic_forms(pooled[:, ok].T, covariance[ok])
        mean_share = np.divide(diagonal, totals, out=np.zeros_like(diagonal), where=totals > 0)
        present = mean_share > 1e-12
        parts = present.sum(axis=0)
        inverse = np.where(present, 1.0 / np.where(present, mean_share, 1.0), 0.0).sum(axis=0)
        ranks = np.maximum(parts - 1, 0)
        kurtosis = np.divide(inverse - parts**2 - 2 * parts + 2, totals, out=np.zeros(len(totals)), where=ok)
        statistic = quad @ evidence.fields
        mean = ranks @ evidence.fields - free
        variance = (2.0 * ranks + np.where(ranks > 0, kurtosis, 0.0)) @ evidence.fields - 2.0 * free
        log_ps.extend(_scaled_chi2(statistic, mean, variance).tolist())
    return log_ps


def _log_p_appeal(c: np.ndarray, i: np.ndarray, clicks: np.ndarray, share: np.ndarray, deviation: np.ndarray) -> float:
    """Log p-value of "no part's share of a creative's clicks follows the creative's appeal" (``len(c) - 1`` df).

    One direction over the creatives, fixed by the margins: the log of each
    creative's clicks per level-weighted impression (its appeal). Where one
    taste dominates a category's clicks, a part with another taste takes a
    smaller share of the most appealing creatives; a per-creative test
    spreads that over one degree of freedom per creative, this one gathers
    it in one per part. Under the null (one taste, any levels) the shares do
    not depend on the creative, and a direction that is a function of the
    margins leaves the conditional test valid.
    """
    level = (c.sum(axis=1) + 0.5) / (i.sum(axis=1) + 1.0)
    x = np.log((clicks + 0.5) / np.maximum((i * level[:, None]).sum(axis=0), 1e-12))
    x = x - float((clicks * x).sum()) / float(clicks.sum())
    weight = clicks * x**2
    if len(c) < 2 or not (weight > 0).any():
        return 0.0
    covariance = np.diag(share @ weight) - (share * weight) @ share.T
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    kept = eigenvalues > 1e-9 * max(float(eigenvalues.max()), 1e-300)
    projected = eigenvectors[:, kept].T @ (deviation @ x)
    statistic = float((projected**2 / eigenvalues[kept]).sum())
    return float(_log_chi2_sf(np.array(statistic), np.array(float(kept.sum()))))


def _quadratic_forms(deviation: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """``d' C^+ d`` for each (``d``, ``C``) of a batch, where every ``C`` is a sum of multinomial covariances.

    Such a ``C`` has the ones vector in its null space and ``d`` sums to
    zero, so the form equals ``d' C^-1 d`` on all parts but the last; a part
    that holds no clicks (a zero row) is kept solvable by a tiny ridge. Much
    cheaper than a batched pseudo-inverse.
    """
    k = covariance.shape[1]
    if k == 2:
        var = covariance[:, 0, 0]
        return np.divide(deviation[:, 0] ** 2, var, out=np.zeros(len(var)), where=var > 1e-12)
    sub = covariance[:, :-1, :-1]
    scale = np.maximum(np.einsum("kpp->k", sub) / (k - 1), 1e-12)
    sub = sub + (1e-9 * scale)[:, None, None] * np.eye(k - 1)
    d = deviation[:, :-1]
    return np.einsum("kp,kp->k", d, np.linalg.solve(sub, d[:, :, None])[:, :, 0])


def _log_p_level(c: np.ndarray, i: np.ndarray, clicks: np.ndarray) -> float:
    """Log p-value of "the parts click alike on the same creatives" (a generalised Cochran-Mantel-Haenszel test).

    Each part's clicks summed over creatives against their expectation when
    every creative's clicks spread in proportion to impressions, with the
    exact multinomial covariance.
    """
    share = i / i.sum(axis=0)
    covariance = np.diag((clicks * share).sum(axis=1)) - (clicks * share) @ share.T
    deviation = (c - clicks * share).sum(axis=1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # singular: clicks sum to their total
    kept = eigenvalues > 1e-9 * max(float(eigenvalues.max()), 1e-300)
    projected = eigenvectors[:, kept].T @ deviation
    statistic = float((projected**2 / eigenvalues[kept]).sum())
    return float(_log_chi2_sf(np.array(statistic), np.array(float(kept.sum()))))


def _log_p_pairs(
    c: np.ndarray,
    i: np.ndarray,
    cs: np.ndarray,
    is_: np.ndarray,
    evidence: Evidence | None = None,
    level: bool = False,
    level_only: bool = False,
) -> np.ndarray:
    """:func:`_log_p_same` of part (``c``, ``i``) against each row of (``cs``, ``is_``), vectorised.

    ``level_only``: the level test alone (a function of the margins: see :func:`_log_p_level`).
    """
    evidence = evidence or creatives_only(len(c))
    i, is_ = np.maximum(i, c), np.maximum(is_, cs)
    clicks = c + cs  # (pairs, creatives)
    both = (clicks > 0) & (i > 0) & (is_ > 0)
    log_ps = []
    if level or level_only:
        raw = np.where(both, i / np.where(both, i + is_, 1.0), 0.0)
        level_var = (clicks * raw * (1 - raw)).sum(axis=1)
        gap = np.where(both, c - clicks * raw, 0.0).sum(axis=1)
        statistic = np.divide(gap**2, level_var, out=np.zeros_like(level_var), where=level_var > 0)
        log_ps.append(_log_chi2_sf(statistic, (level_var > 0).astype(float)))
        if level_only:
            return np.minimum(0.0, log_ps[0])
    mine, theirs = np.where(both, c, 0.0).sum(axis=1), np.where(both, cs, 0.0).sum(axis=1)
    shift = np.log((mine + 0.5) / (np.where(both, i, 0.0).sum(axis=1) + 1.0))
    shift -= np.log((theirs + 0.5) / (np.where(both, is_, 0.0).sum(axis=1) + 1.0))
    log_ratio = np.log(np.where(both, i, 1.0)) - np.log(np.where(both, is_, 1.0))
    for _ in range(6):  # Newton on the level ratio: pooled deviations sum to zero
        share = 1.0 / (1.0 + np.exp(-(log_ratio + shift[:, None])))
        slope = np.where(both, clicks * share * (1 - share), 0.0).sum(axis=1)
        gap = np.where(both, clicks * share, 0.0).sum(axis=1) - mine
        shift -= np.divide(gap, slope, out=np.zeros_like(gap), where=slope > 0)
    share = np.where(both, 1.0 / (1.0 + np.exp(-(log_ratio + shift[:, None]))), 0.0)
    deviation = np.where(both, c - clicks * share, 0.0)
    spread = np.where(both, clicks * share * (1 - share), 0.0)
    if evidence.appeal:  # as _log_p_appeal for two parts: T^2 / var along the log appeal, 1 df
        level_a = (mine + 0.5) / (np.where(both, i, 0.0).sum(axis=1) + 1.0)
        level_b = (theirs + 0.5) / (np.where(both, is_, 0.0).sum(axis=1) + 1.0)
        exposure = np.maximum(i * level_a[:, None] + is_ * level_b[:, None], 1e-12)
        x = np.where(both, np.log((clicks + 0.5) / exposure), 0.0)
        weight = np.where(both, clicks, 0.0)
        total = weight.sum(axis=1)
        x = np.where(both, x - np.divide((weight * x).sum(axis=1), total, out=np.zeros_like(total), where=total > 0)[:, None], 0.0)
        variance = (spread * x**2).sum(axis=1)
        statistic = np.divide((deviation * x).sum(axis=1) ** 2, variance, out=np.zeros_like(variance), where=variance > 1e-12)
        log_ps.append(_log_chi2_sf(statistic, (variance > 1e-12).astype(float)))
    if evidence.per_creative:
        safe = np.where(spread > 0, spread, 1.0)
        statistic = np.where(spread > 0, deviation**2 / safe, 0.0).sum(axis=1)
        odd = np.where(spread > 0, 1 / np.where(spread > 0, share * (1 - share), 1.0), 0.0)
        mean = (spread > 0).sum(axis=1) - 1.0
        variance = np.where(spread > 0, 2.0 + (odd - 6.0) / np.where(spread > 0, clicks, 1.0), 0.0).sum(axis=1) - 2.0
        log_ps.append(_scaled_chi2(statistic, mean, variance))
    if evidence.names:
        pooled, var = deviation @ evidence.columns, spread @ evidence.columns
        totals = np.where(both, clicks, 0.0) @ evidence.columns
        has = var > 1e-9
        mean_share = np.divide(np.where(both, clicks * share, 0.0) @ evidence.columns, totals, out=np.zeros_like(totals), where=has)
        odd = np.where(has, 1 / np.where(has, mean_share * (1 - mean_share), 1.0), 0.0)
        x2 = np.where(has, pooled**2 / np.where(has, var, 1.0), 0.0)
        extra = np.where(has, 2.0 + (odd - 6.0) / np.where(has, totals, 1.0), 0.0)
        statistic, mean = x2 @ evidence.fields, has @ evidence.fields - 1.0
        log_ps.extend(_scaled_chi2(statistic, mean, extra @ evidence.fields - 2.0).T)
    if not log_ps:
        return np.zeros(len(cs))
    return np.minimum(0.0, np.min(np.stack(log_ps), axis=0) + math.log(len(log_ps)))


def _fit_shares(c: np.ndarray, i: np.ndarray, clicks: np.ndarray) -> np.ndarray:
    """Each part's share of each creative's clicks under the null, with the part levels fitted."""
    level = (c.sum(axis=1) + 0.5) / (i.sum(axis=1) + 1.0)
    observed = c.sum(axis=1)
    for _ in range(_FIT_STEPS):
        weight = i * level[:, None]
        share = weight / weight.sum(axis=0)
        fitted = (clicks * share).sum(axis=1)
        ratio = np.divide(observed, fitted, out=np.ones_like(fitted), where=fitted > 0)
        level = np.maximum(level * ratio, 1e-12)
        if np.all(np.abs(ratio - 1.0) < 1e-9):
            break
    weight = i * level[:, None]
    return weight / weight.sum(axis=0)


def _scaled_chi2(statistic: np.ndarray, mean: Any, variance: Any) -> np.ndarray:
    """Log tail of ``statistic`` under a chi-square scaled to ``mean`` and ``variance`` (0 where ``mean`` <= 0)."""
    statistic = np.asarray(statistic, dtype=float)
    mean, variance = np.broadcast_to(mean, statistic.shape), np.broadcast_to(variance, statistic.shape)
    has = mean > 0
    variance = np.maximum(variance, 2.0 * mean)
    scale = np.where(has, variance / np.where(has, 2.0 * mean, 1.0), 1.0)
    df = np.where(has, 2.0 * mean**2 / np.where(has, variance, 1.0), 0.0)
    return np.where(has, _log_chi2_sf(statistic / scale, df), 0.0)


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
