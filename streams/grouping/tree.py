"""Growing the routing tree at a macro step: greedy splits on the attribute whose values respond most differently."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import sparse

from streams.grouping.category import _Category, _Tree
from streams.grouping.config import GroupingConfig
from streams.grouping.statistics import _log_p_pairs, _log_p_same, _log_stirling2

_TEST_WORK = 20_000  # a statistical test costs about as much as visiting this many table cells


def _grow(state: _Category, config: GroupingConfig) -> _Tree:
    """Split the category's rows into groups by attribute values (see the module docstring)."""
    n = state.n_rows
    table = state.table
    weights = state.weights[:n]
    codes = state.code_arrays()
    names = list(codes)
    tokens_of = {name: {code: token for token, code in vocab.items()} for name, vocab in state.vocab.items()}
    log_candidates = math.log(max(1, len(names)))  # Bonferroni over the attributes tried
    nodes: list[tuple[Any, ...]] = [("leaf", 0)]
    node_rows = {0: np.arange(n)}
    work = 0.0

    def totals(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Impressions and clicks per creative of ``rows``."""
        summed = np.asarray(table[rows].sum(axis=0)).ravel() if len(rows) else np.zeros(table.shape[1])
        return summed[0::2], summed[1::2]

    def try_split(rows: np.ndarray, sub: sparse.csr_array, name: str) -> tuple[float, str, list[list[int]]] | None:
        """The most significant split of ``rows`` (whose table is ``sub``) on ``name``."""
        nonlocal work
        values, inverse = np.unique(codes[name][rows], return_inverse=True)
        if len(values) < 2:
            return None
        one_hot = sparse.csr_array((np.ones(len(rows)), (inverse, np.arange(len(rows)))), (len(values), len(rows)))
        summed = (one_hot @ sub).toarray()
        value_i, value_c = summed[:, 0::2], summed[:, 1::2]
        start = _fold(value_i, config.max_values)
        work += _TEST_WORK * 3 * len(start)  # about 2m pair-vector tests and m partition tests
        best = None
        for parts, _ in _merge_path(value_c, value_i, start, config.min_group_clicks):
            if len(parts) < 2:
                continue
            part_c = np.stack([value_c[p].sum(axis=0) for p in parts])
            part_i = np.stack([value_i[p].sum(axis=0) for p in parts])
            log_p = _log_p_same(part_c, part_i) + _log_stirling2(len(start), len(parts)) + log_candidates
            if best is None or log_p < best[0]:
                best = (log_p, name, [[int(values[v]) for v in p] for p in parts])
        return best

    def best_split(rows: np.ndarray) -> tuple[float, str, list[list[int]]] | None:
        nonlocal work
        sub = table[rows]
        if sub[:, 1::2].sum() < 2 * config.min_group_clicks:
            return None
        work += sub.nnz * max(1, len(names))
        splits = [split for name in names if (split := try_split(rows, sub, name)) is not None]
        best = min(splits, key=lambda split: split[0], default=None)
        return best if best is not None and best[0] <= math.log(config.split_alpha) else None

    frontier = {0: best_split(node_rows[0])}
    leaves = 1
    while True:  # most significant split first, up to twice max_groups leaves
        ready = [(split[0], index) for index, split in frontier.items() if split is not None]
        if not ready:
            break
        _, index = min(ready)
        _, name, parts = frontier.pop(index)  # type: ignore[misc]
        if leaves + len(parts) - 1 > 2 * config.max_groups:
            continue
        rows = node_rows.pop(index)
        row_codes = codes[name][rows]
        branches: dict[str, int] = {}
        heaviest, heaviest_weight = -1, -1.0
        for part in parts:
            child = len(nodes)
            nodes.append(("leaf", 0))
            node_rows[child] = child_rows = rows[np.isin(row_codes, part)]
            for code in part:
                branches[tokens_of[name][code]] = child
            if float(weights[child_rows].sum()) > heaviest_weight:
                heaviest, heaviest_weight = child, float(weights[child_rows].sum())
            frontier[child] = best_split(child_rows)
        nodes[index] = ("split", name, branches, heaviest)
        leaves += len(parts) - 1

    leaf_nodes = [i for i, node in enumerate(nodes) if node[0] == "leaf"]
    leaf_i, leaf_c = (np.stack(side) for side in zip(*(totals(node_rows[i]) for i in leaf_nodes)))
    groups = _merge(leaf_c, leaf_i, [[j] for j in range(len(leaf_nodes))], config.merge_alpha, config.max_groups)
    row_group = np.zeros(n, dtype=np.int64)
    for g, members in enumerate(groups):
        for j in members:
            nodes[leaf_nodes[j]] = ("leaf", g)
            row_group[node_rows[leaf_nodes[j]]] = g
    return _Tree(nodes=nodes, n_groups=len(groups), row_group=row_group, work=max(work, float(table.nnz)))


def _fold(value_i: np.ndarray, max_values: int) -> list[list[int]]:
    """One part per value, the rarest folded together so that at most ``max_values`` remain."""
    order = np.argsort(-value_i.sum(axis=1), kind="stable")
    parts = [[int(v)] for v in order[: max_values - 1]]
    rest = [int(v) for v in order[max_values - 1 :]]
    return parts + [rest] if rest else parts


def _merge(c: np.ndarray, i: np.ndarray, parts: list[list[int]], alpha: float, max_parts: int) -> list[list[int]]:
    """Merge parts while two are indistinguishable at ``alpha`` or more than ``max_parts`` remain."""
    for partition, next_log_p in _merge_path(c, i, parts, 0):
        if next_log_p <= math.log(alpha) and len(partition) <= max_parts:
            return partition
    return [[row for part in parts for row in part]]


def _merge_path(
    c: np.ndarray, i: np.ndarray, parts: list[list[int]], min_clicks: float
) -> list[tuple[list[list[int]], float]]:
    """The agglomeration of ``parts`` (lists of rows of ``c``/``i``) down to one, most similar pair first.

    Returns each partition on the way in which every part has at least
    ``min_clicks`` clicks (smaller parts first join their most similar
    partner), with the log p-value of the merge that follows it (``-inf``
    after the last).
    """
    parts = [list(p) for p in parts]
    part_c = np.stack([c[p].sum(axis=0) for p in parts])
    part_i = np.stack([i[p].sum(axis=0) for p in parts])
    log_p = np.full((len(parts), len(parts)), -np.inf)
    for a in range(len(parts) - 1):
        log_p[a, a + 1 :] = log_p[a + 1 :, a] = _log_p_pairs(part_c[a], part_i[a], part_c[a + 1 :], part_i[a + 1 :])
    path: list[tuple[list[list[int]], float]] = []
    while len(parts) > 1:
        sizes = part_c.sum(axis=1)
        if sizes.min() < min_clicks:  # the smallest part joins its most similar partner
            a = int(np.argmin(sizes))
            b = int(np.argmax(log_p[a]))
        else:
            a, b = (int(v) for v in np.unravel_index(int(np.argmax(log_p)), log_p.shape))
            path.append(([list(p) for p in parts], float(log_p[a, b])))
        a, b = min(a, b), max(a, b)
        parts[a] += parts.pop(b)
        part_c[a] += part_c[b]
        part_i[a] += part_i[b]
        part_c, part_i = np.delete(part_c, b, axis=0), np.delete(part_i, b, axis=0)
        log_p = np.delete(np.delete(log_p, b, axis=0), b, axis=1)
        log_p[a, :] = log_p[:, a] = _log_p_pairs(part_c[a], part_i[a], part_c, part_i)
        log_p[a, a] = -np.inf
    path.append(([list(p) for p in parts], -math.inf))
    return path
