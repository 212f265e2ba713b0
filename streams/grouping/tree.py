"""Growing the routing tree at a macro step: greedy splits on the attribute whose values respond most differently."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from scipy import sparse

from streams.grouping.category import _Category, _Tree, _Watch
from streams.grouping.config import GroupingConfig
from streams.grouping.evidence import Evidence, build_evidence
from streams.grouping.statistics import _log_p_level, _log_p_pairs, _log_p_same, _log_p_taste_and_split, _log_stirling2

_PAIR_CLICKS = 8  # a node tries pairs of attributes from this many times min_group_clicks clicks
_PAIRS_SEARCHED = 2  # pairs of attributes searched in full at a node, the best by a screening test
_LOG_ROUTES = math.log(2.0)  # the taste gate has two routes: the search, and the leaves of the level tree
_TEST_WORK = 12_000  # a statistical test costs about as much as visiting this many table cells (measured)
_LEVEL_WORK = 3_000  # a level test alone (margins only) costs a quarter of that
_WATCHES = 2  # candidates the looks between macro steps re-test, those closest to significance
_LOOK_WORK = 120_000  # a look's fixed cost beside its tests (measured: 4-6.5 ms a look, 16-26 ns a unit of a step)


Split = tuple[float, Any, list[list[int]], float]
"""A candidate split: adjusted log p-value, attribute name (a pair of names for an interaction), parts of codes,
and the log Bonferroni term that the adjusted p-value includes."""


def _grow(state: _Category, config: GroupingConfig) -> _Tree:
    """Split the category's rows into groups by attribute values (see ``docs/grouping.md``).

    The root first asks whether the category's users differ in *taste* at
    all (``taste_alpha``): if no split shows it, the category stays one
    group. Otherwise the tree grows most significant split first, on taste
    and level evidence. A node where no single attribute splits tries pairs
    of attributes (``interactions``), their cells partitioned like the values
    of one attribute, the Bonferroni factor widened to all pairs and cells.
    """
    n = state.n_rows
    table = state.table
    weights = state.weights[:n]
    codes: dict[Any, np.ndarray] = dict(state.code_arrays())  # attribute, or pair of attributes -> code per row
    names = list(codes)
    tokens_of: dict[Any, dict[int, Any]] = {
        name: {code: token for token, code in vocab.items()} for name, vocab in state.vocab.items()
    }
    log_singles = math.log(max(1, len(names)))  # Bonferroni over the attributes tried
    pairs = list(itertools.combinations(names, 2)) if config.interactions else []
    log_pairs = math.log(max(1, len(pairs))) + math.log(2.0)  # all pairs; the pair stage is a second look
    evidence = _evidence(state, config)
    test_work = _TEST_WORK * (1.0 + 0.2 * len(evidence.names))  # attribute tests cost more than a test per creative
    log_alpha, log_taste = math.log(config.split_alpha), math.log(config.taste_alpha)
    nodes: list[tuple[Any, ...]] = [("leaf", 0)]
    node_rows = {0: np.arange(n)}
    work = 0.0

    def cross(pair: tuple[str, str]) -> np.ndarray:
        a, b = pair
        size = len(state.vocab[b])
        if pair not in codes:
            codes[pair] = codes[a] * size + codes[b]
            tokens_of[pair] = {ca * size + cb: (ta, tb) for ta, ca in state.vocab[a].items() for tb, cb in state.vocab[b].items()}
        return codes[pair]

    def spell(name: Any, parts: list[list[int]]) -> tuple[tuple[Any, ...], ...]:
        """The parts of a candidate as tokens (pairs of tokens): codes of pairs change as vocabularies grow."""
        return tuple(tuple(tokens_of[name][code] for code in part) for part in parts)

    def screen(rows: np.ndarray, sub: sparse.csr_array, pair: tuple[str, str], level: bool = True) -> float:
        """Log p-value of "all cells of ``pair`` alike": which pairs are worth a full search."""
        nonlocal work
        values, inverse = np.unique(cross(pair)[rows], return_inverse=True)
        if len(values) < 2:
            return 0.0
        one_hot = sparse.csr_array((np.ones(len(rows)), (inverse, np.arange(len(rows)))), (len(values), len(rows)))
        summed = (one_hot @ sub).toarray()
        value_i, value_c = summed[:, 0::2], summed[:, 1::2]
        parts = _fold(value_i, config.max_values)
        work += test_work
        part_c = np.stack([value_c[p].sum(axis=0) for p in parts])
        part_i = np.stack([value_i[p].sum(axis=0) for p in parts])
        return _log_p_same(part_c, part_i, evidence, level=level)

    def try_split(rows: np.ndarray, sub: sparse.csr_array, name: Any, log_searched: float, taste: bool) -> tuple[Split, Split | None] | None:
        """The most significant split of ``rows`` (whose table is ``sub``) on ``name``, and (``taste``) the
        candidate with the best taste-only p (its first item the taste-only adjusted log p)."""
        nonlocal work
        values, inverse = np.unique(codes[name][rows], return_inverse=True)
        if len(values) < 2:
            return None
        one_hot = sparse.csr_array((np.ones(len(rows)), (inverse, np.arange(len(rows)))), (len(values), len(rows)))
        summed = (one_hot @ sub).toarray()
        value_i, value_c = summed[:, 0::2], summed[:, 1::2]
        start = _fold(value_i, config.max_values)
        work += test_work * 3 * len(start)  # about 2m pair-vector tests and m partition tests (taste and level at once)
        best: Split | None = None
        best_taste: Split | None = None
        for parts, _ in _merge_path(value_c, value_i, start, config.min_group_clicks, evidence):
            if not 2 <= len(parts) <= config.max_groups:
                continue
            part_c = np.stack([value_c[p].sum(axis=0) for p in parts])
            part_i = np.stack([value_i[p].sum(axis=0) for p in parts])
            searched = _log_stirling2(len(start), len(parts)) + log_searched
            coded = [[int(values[v]) for v in p] for p in parts]
            if taste:
                taste_p, log_p = (p + searched for p in _log_p_taste_and_split(part_c, part_i, evidence))
                if best_taste is None or taste_p < best_taste[0]:
                    best_taste = (taste_p, name, coded, searched)
            else:
                log_p = _log_p_same(part_c, part_i, evidence, level=True) + searched
            if best is None or log_p < best[0]:
                best = (log_p, name, coded, searched)
        return (best, best_taste) if best is not None else None

    def best_split(rows: np.ndarray, taste: bool = False) -> tuple[Split | None, float]:
        """The node's most significant candidate (significant or not), and with ``taste`` the best taste-only
        adjusted log p of the candidates (each candidate also goes to ``gate_watches``, for the looks).

        With ``taste`` (the root's gate), pairs of attributes are also searched
        for a taste difference when no single attribute shows one, even where
        a single attribute splits on level: world A's drill buyers differ in
        taste by gender *and* purchase power, hardly by either alone.
        """
        nonlocal work
        sub = table[rows]
        clicks = float(sub[:, 1::2].sum())
        if clicks < 2 * config.min_group_clicks:
            return None, 0.0
        work += sub.nnz * max(1, len(names))
        found = [f for name in names if (f := try_split(rows, sub, name, log_singles, taste)) is not None]
        best = min((f[0] for f in found), key=lambda split: split[0], default=None)
        tastes = [f[1] for f in found if f[1] is not None]
        best_taste = min((t[0] for t in tastes), default=0.0)
        no_single = best is None or best[0] > log_alpha
        no_taste = taste and best_taste > log_taste - _LOG_ROUTES
        if no_taste and not no_single:  # the cheaper route first: the leaves of the level tree
            best_taste = min(best_taste, level_tree_taste())
            no_taste = best_taste > log_taste - _LOG_ROUTES
        if (no_single or no_taste) and pairs and clicks >= _PAIR_CLICKS * config.min_group_clicks:
            work += sub.nnz * len(pairs)
            screened = sorted(pairs, key=lambda pair: screen(rows, sub, pair, level=no_single))[:_PAIRS_SEARCHED]
            found = [f for pair in screened if (f := try_split(rows, sub, pair, log_pairs, taste)) is not None]
            if no_single:
                best = min([f[0] for f in found] + ([best] if best is not None else []), key=lambda split: split[0], default=None)
            tastes += [f[1] for f in found if f[1] is not None]
            best_taste = min([best_taste] + [f[1][0] for f in found if f[1] is not None])
        for log_p, name, parts, searched in tastes:
            gate_watches.append((log_p, _Watch(None, name, spell(name, parts), searched + _LOG_ROUTES, False, log_taste)))
        return best, best_taste

    def level_tree_taste() -> float:
        """Adjusted log p of "one taste" across the leaves of a tree grown on *level* evidence alone.

        The level tests read only the margins (clicks per attribute tuple and
        per creative, given the impressions); under one shared taste the
        table given its margins does not depend on the levels, so a
        partition chosen from the margins leaves the taste test of its parts
        valid without a search correction. Tested: all leaves, and the
        children of each split (Bonferroni over these).
        """
        nonlocal work
        leaves_rows: list[np.ndarray] = []
        splits: list[list[np.ndarray]] = []
        queue = [np.arange(n)]
        while queue and len(leaves_rows) + len(queue) < config.max_groups:  # breadth first
            rows = queue.pop(0)
            sub = table[rows]
            chosen: tuple[float, list[np.ndarray]] | None = None
            if float(sub[:, 1::2].sum()) >= 2 * config.min_group_clicks:
                work += sub.nnz * max(1, len(names))
                room = config.max_groups - len(leaves_rows) - len(queue)
                for name in names:
                    values, inverse = np.unique(codes[name][rows], return_inverse=True)
                    if len(values) < 2:
                        continue
                    one_hot = sparse.csr_array((np.ones(len(rows)), (inverse, np.arange(len(rows)))), (len(values), len(rows)))
                    summed = (one_hot @ sub).toarray()
                    value_i, value_c = summed[:, 0::2], summed[:, 1::2]
                    start = _fold(value_i, config.max_values)
                    work += _LEVEL_WORK * len(start)
                    for parts, _ in _merge_path(value_c, value_i, start, config.min_group_clicks, evidence, level_only=True):
                        if not 2 <= len(parts) <= room:
                            continue
                        part_c = np.stack([value_c[p].sum(axis=0) for p in parts])
                        part_i = np.maximum(np.stack([value_i[p].sum(axis=0) for p in parts]), part_c)
                        used = (part_c.sum(axis=0) > 0) & ((part_i > 0).sum(axis=0) >= 2)
                        log_p = _log_p_level(part_c[:, used], part_i[:, used], part_c[:, used].sum(axis=0)) if used.any() else 0.0
                        log_p += _log_stirling2(len(start), len(parts)) + log_singles
                        if log_p <= log_alpha and (chosen is None or log_p < chosen[0]):
                            chosen = (log_p, [rows[np.isin(inverse, p)] for p in parts])
            if chosen is None:
                leaves_rows.append(rows)
            else:
                splits.append(chosen[1])
                queue += chosen[1]
        leaves_rows += queue
        if not splits:
            return 0.0
        families = [leaves_rows] + (splits if len(splits) > 1 else [])
        best = 0.0
        for k, family in enumerate(families):
            totals = [_totals(table, rows) for rows in family]
            part_i, part_c = np.stack([t[0] for t in totals]), np.stack([t[1] for t in totals])
            work += test_work
            log_p = _log_p_same(part_c, part_i, evidence)
            best = min(best, log_p)
            if k == 0:  # the leaves, watched as rows: a fixed member of the route's family
                correction = math.log(len(families)) + _LOG_ROUTES
                gate_watches.append((log_p + correction - _LOG_ROUTES, _Watch(None, None, (), correction, False, log_taste, tuple(family))))
        return min(0.0, best + math.log(len(families)))

    gate = config.taste_alpha < 1.0
    gate_watches: list[tuple[float, _Watch]] = []  # the gate's candidates: (adjusted log p less the routes' term, watch)
    root, root_taste = best_split(node_rows[0], taste=gate)
    root_taste = root_taste + _LOG_ROUTES if gate else -math.inf
    significant = root is not None and root[0] <= log_alpha
    frontier = {0: root if significant and root_taste <= log_taste else None}  # no taste difference anywhere: one group
    watches: list[tuple[float, _Watch]] = []  # (how far from significance, the candidate)
    if root_taste > log_taste:
        watches += [(log_p + _LOG_ROUTES - log_taste, watch) for log_p, watch in gate_watches]
    elif root is not None and not significant:
        watches.append((root[0] - log_alpha, _Watch(None, root[1], spell(root[1], root[2]), root[3], True, log_alpha)))
    leaves = 1
    while True:  # most significant split first, up to twice max_groups leaves
        ready = [(split[0], index) for index, split in frontier.items() if split is not None]
        if not ready:
            break
        _, index = min(ready)
        _, name, parts, _ = frontier.pop(index)  # type: ignore[misc]
        if leaves + len(parts) - 1 > 2 * config.max_groups:
            continue
        rows = node_rows.pop(index)
        row_codes = codes[name][rows]
        branches: dict[Any, int] = {}
        heaviest, heaviest_weight = -1, -1.0
        for part in parts:
            child = len(nodes)
            nodes.append(("leaf", 0))
            node_rows[child] = child_rows = rows[np.isin(row_codes, part)]
            for code in part:
                branches[tokens_of[name][code]] = child
            if float(weights[child_rows].sum()) > heaviest_weight:
                heaviest, heaviest_weight = child, float(weights[child_rows].sum())
            split = best_split(child_rows)[0]
            frontier[child] = split if split is not None and split[0] <= log_alpha else None
            if split is not None and split[0] > log_alpha:
                watch = _Watch(child_rows, split[1], spell(split[1], split[2]), split[3], True, log_alpha)
                watches.append((split[0] - log_alpha, watch))
        nodes[index] = ("split", name, branches, heaviest)
        leaves += len(parts) - 1

    leaf_nodes = [i for i, node in enumerate(nodes) if node[0] == "leaf"]
    leaf_i, leaf_c = (np.stack(side) for side in zip(*(_totals(table, node_rows[i]) for i in leaf_nodes)))
    singles = [[j] for j in range(len(leaf_nodes))]
    groups = _merge(leaf_c, leaf_i, singles, config.merge_alpha, config.max_groups, evidence)  # taste and level: taste alone
    # merged too much on the worlds (drill, shoes, sneakers lost groups; measured on seeds 0-4)
    row_group = np.zeros(n, dtype=np.int64)
    for g, members in enumerate(groups):
        for j in members:
            nodes[leaf_nodes[j]] = ("leaf", g)
            row_group[node_rows[leaf_nodes[j]]] = g
    return _Tree(
        nodes=nodes,
        n_groups=len(groups),
        row_group=row_group,
        work=max(work, float(table.nnz)),
        taste_log_p=root_taste,
        split_log_p=root[0] if root is not None else 0.0,
        watches=tuple(watch for _, watch in sorted(watches, key=lambda pair: pair[0])[:_WATCHES]),
    )


def _look(state: _Category, config: GroupingConfig) -> tuple[bool, float]:
    """Re-test the candidates the last macro step watched on the counts now: does one reach its threshold?

    Each is one fixed member of the family its macro step searched and keeps
    that search's Bonferroni term; the term does not cover re-testing it at
    later looks (docs/grouping.md, "Limits and notes"). Returns the answer and
    the counted work (cells visited and tests run, as in :func:`_grow`).
    """
    evidence = _evidence(state, config)
    test_work = _TEST_WORK * (1.0 + 0.2 * len(evidence.names))
    codes = state.code_arrays()
    work = _LOOK_WORK + float(state.n_rows * max(1, len(codes)))
    for watch in state.watches:
        counted = _watched_counts(state, codes, watch)
        if counted is None:
            continue
        part_c, part_i, cells = counted
        work += cells + test_work
        log_p = _log_p_same(part_c, part_i, evidence, level=watch.level) + watch.log_correction
        if log_p <= watch.log_threshold:
            return True, work
    return False, work


def _watched_counts(
    state: _Category, codes: dict[str, np.ndarray], watch: _Watch
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Clicks and impressions per (part, creative) of a watched candidate now, and the table cells read."""
    if watch.row_parts:  # the parts are rows (the leaves of a level tree)
        totals = [_totals(state.table, rows) for rows in watch.row_parts]
        cells = sum(len(rows) for rows in watch.row_parts)
        return np.stack([t[1] for t in totals]), np.stack([t[0] for t in totals]), cells
    names = watch.name if isinstance(watch.name, tuple) else (watch.name,)
    if any(name not in codes for name in names):
        return None
    rows = np.arange(state.n_rows) if watch.rows is None else watch.rows
    key = np.zeros(len(rows), dtype=np.int64)
    for name in names:
        key = key * len(state.vocab[name]) + codes[name][rows]
    label = np.full(len(rows), -1)
    for k, part in enumerate(watch.parts):
        keys = [_key(state.vocab, names, token if isinstance(token, tuple) else (token,)) for token in part]
        label[np.isin(key, [code for code in keys if code is not None])] = k
    kept = np.flatnonzero(label >= 0)
    sub = state.table[rows[kept]]
    one_hot = sparse.csr_array((np.ones(len(kept)), (label[kept], np.arange(len(kept)))), (len(watch.parts), len(kept)))
    summed = (one_hot @ sub).toarray()
    return summed[:, 1::2], summed[:, 0::2], sub.nnz


def _evidence(state: _Category, config: GroupingConfig) -> Evidence:
    """The category's evidence, built again only when its creatives or their attributes changed."""
    key = (config.evidence, tuple(state.creative_tokens))
    if state.evidence_cache is None or state.evidence_cache[0] != key:
        state.evidence_cache = (key, build_evidence(state.creative_tokens, config.evidence))
    return state.evidence_cache[1]


def _key(vocab: dict[str, dict[str, int]], names: tuple[str, ...], tokens: tuple[str, ...]) -> int | None:
    """The code of a value (a pair of values) under the vocabularies now; ``None`` if a token is unknown."""
    key = 0
    for name, token in zip(names, tokens):
        code = vocab[name].get(token)
        if code is None:
            return None
        key = key * len(vocab[name]) + code
    return key


def _totals(table: sparse.csr_array, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Impressions and clicks per creative of ``rows``."""
    summed = np.asarray(table[rows].sum(axis=0)).ravel() if len(rows) else np.zeros(table.shape[1])
    return summed[0::2], summed[1::2]


def _fold(value_i: np.ndarray, max_values: int) -> list[list[int]]:
    """One part per value, the rarest folded together so that at most ``max_values`` remain."""
    order = np.argsort(-value_i.sum(axis=1), kind="stable")
    parts = [[int(v)] for v in order[: max_values - 1]]
    rest = [int(v) for v in order[max_values - 1 :]]
    return parts + [rest] if rest else parts


def keep_apart(clicks: np.ndarray, impressions: np.ndarray, config: GroupingConfig, evidence: Evidence) -> list[list[int]]:
    """Which of the given parts (rows; columns = creatives) the grouper's tests keep apart: merged as the leaves
    are at the end of a macro step (``merge_alpha``, taste and level), then all one unless the merged parts
    differ in taste at ``taste_alpha`` (the gate, without its correction for the search). Given the true
    parts, it tells what the clicks let the grouper keep apart at best.

    >>> from streams.grouping.evidence import creatives_only
    >>> shown = np.full((3, 6), 2000.0)
    >>> clicks = np.array([[80, 20] * 3, [20, 80] * 3, [21, 79] * 3], dtype=float)
    >>> keep_apart(clicks, shown, GroupingConfig(), creatives_only(6))
    [[0], [1, 2]]
    """
    groups = _merge(clicks, impressions, [[j] for j in range(len(clicks))], config.merge_alpha, config.max_groups,
                    evidence)
    if len(groups) < 2:
        return groups
    part_c, part_i = (np.stack([x[g].sum(axis=0) for g in groups]) for x in (clicks, impressions))
    if _log_p_same(part_c, part_i, evidence) > math.log(config.taste_alpha):
        return [[j for g in groups for j in g]]
    return groups


def _merge(
    c: np.ndarray,
    i: np.ndarray,
    parts: list[list[int]],
    alpha: float,
    max_parts: int,
    evidence: Evidence,
    level: bool = True,
) -> list[list[int]]:
    """Merge parts while two are indistinguishable at ``alpha`` or more than ``max_parts`` remain (``level``: the
    level test joins the taste tests in telling parts apart)."""
    for partition, next_log_p in _merge_path(c, i, parts, 0, evidence, level=level):
        if next_log_p <= math.log(alpha) and len(partition) <= max_parts:
            return partition
    return [[row for part in parts for row in part]]


def _merge_path(
    c: np.ndarray,
    i: np.ndarray,
    parts: list[list[int]],
    min_clicks: float,
    evidence: Evidence,
    level_only: bool = False,
    level: bool = True,
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
        pairs = _log_p_pairs(part_c[a], part_i[a], part_c[a + 1 :], part_i[a + 1 :], evidence, level, level_only)
        log_p[a, a + 1 :] = log_p[a + 1 :, a] = pairs
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
        log_p[a, :] = log_p[:, a] = _log_p_pairs(part_c[a], part_i[a], part_c, part_i, evidence, level, level_only)
        log_p[a, a] = -np.inf
    path.append(([list(p) for p in parts], -math.inf))
    return path
