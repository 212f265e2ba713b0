"""One category's state: users' encoded rows, click/impression counts per creative, routing tree and group ids."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from streams.grouping.config import GroupInfo, GroupingConfig

_SHIFT = 32  # pending counts pack (row << _SHIFT) | column
_MASK = (1 << _SHIFT) - 1
_LOOK_MIN = 1000  # events between looks at the watched candidates, at least ...
_LOOK_SHARE = 10  # ... and at least this share (1/10) of the category's events so far
_DEBT_STEPS = 1.5  # a look may bring a macro step forward while the unpaid work is under 1.5 steps' work


@dataclass(frozen=True, eq=False)
class _Watch:
    """A candidate split that a macro step found not significant yet, re-tested by the looks between steps."""

    rows: np.ndarray | None  # the rows it splits (a leaf's rows); None: every row, new ones included
    name: Any  # the attribute, or pair of attributes
    parts: tuple[tuple[Any, ...], ...]  # the tokens (pairs of tokens) of each part
    log_correction: float  # the search's Bonferroni terms, added to the test's log p-value
    level: bool  # the level test joins the family (a split in the tree), or not (the taste gate)
    log_threshold: float  # a macro step runs as soon as the corrected log p-value reaches this
    row_parts: tuple[np.ndarray, ...] = ()  # or the parts as rows (the leaves of a level tree; name unused)


@dataclass
class _Tree:
    """Result of a macro step: the routing tree and the groups of its leaves."""

    nodes: list[tuple[Any, ...]]  # ("leaf", group) or ("split", attribute or pair, {token(s): child}, default child)
    n_groups: int
    row_group: np.ndarray
    work: float
    taste_log_p: float = 0.0  # the root's best adjusted taste log p-value (diagnostics)
    split_log_p: float = 0.0  # the root's best adjusted split log p-value (diagnostics)
    watches: tuple[_Watch, ...] = ()  # the candidates closest to significance, for the looks


class _Category:
    """Statistics, tree and ids of one category (plain data: picklable)."""

    def __init__(self, name: str, config: GroupingConfig) -> None:
        self.name = name
        self.config = config
        self.events = 0
        self.last_decay_at = 0
        self.gap = min(config.first_recluster, config.recluster_every)
        self.next_recluster = self.gap  # the next step of either kind: the hot path compares this only
        self.next_full = self.gap  # the next macro step
        self.debt = 0.0  # macro work not yet paid for by events at recluster_budget each
        self.debt_at = 0
        self.last_work = 0.0  # work of the last macro step
        self.watches: tuple[_Watch, ...] = ()
        self.evidence_cache: tuple[Any, Any] | None = None  # (creatives' attributes, Evidence): rebuilt on change
        # micro-clusters: one row per encoded attribute tuple
        self.tuple_row: dict[tuple[tuple[str, str], ...], int] = {}
        self.tokens: list[dict[str, str]] = []
        self.vocab: dict[str, dict[str, int]] = {}  # attribute -> token -> code
        self.codes: dict[str, list[int]] = {}  # attribute -> code of each row
        self.creatives: list[str] = []
        self.creative_tokens: list[tuple[str, ...] | None] = []  # visual attributes, aligned with creatives
        self.col_of: dict[str, int] = {}  # creative -> its impressions column; clicks are the next one
        self.weights = np.zeros(0)
        self.table = sparse.csr_array((0, 0))  # row × (impressions, clicks) per creative
        self.pending: list[int] = []
        self.pending_clicks: list[int] = []
        # groups
        self.nodes: list[tuple[Any, ...]] = [("leaf", 0)]
        self.group_ids: list[str] = [f"{name}/g0"]
        self.next_id = 1
        self.created_at: dict[str, int] = {f"{name}/g0": 0}
        self.group_of_row: list[int] = []
        self.gid_of_row: list[str] = []
        self.row_of: dict[tuple[Any, ...], int] = {}  # cache: raw attribute tuple -> row

    @property
    def n_rows(self) -> int:
        return len(self.tokens)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["row_of"] = {}
        state["evidence_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("creative_tokens", [None] * len(state["creatives"]))  # pickles of before attributes
        before_looks = {"next_full": state["next_recluster"], "debt": 0.0, "debt_at": state["events"], "last_work": 0.0}
        for name, value in {**before_looks, "watches": ()}.items():
            state.setdefault(name, value)  # pickles of before the looks
        state["evidence_cache"] = None
        self.__dict__.update(state)

    def row_of_tuple(self, encoded: tuple[tuple[str, str], ...]) -> int | None:
        row = self.tuple_row.get(encoded)
        if row is not None:
            return row
        if self.n_rows >= self.config.max_tuples:
            return None
        row = self.n_rows
        self.tuple_row[encoded] = row
        tokens = dict(encoded)
        self.tokens.append(tokens)
        for name in tokens:
            if name not in self.vocab:
                self.vocab[name] = {"missing": 0}
                self.codes[name] = [0] * row
        for name, vocab in self.vocab.items():
            token = tokens.get(name, "missing")
            code = vocab.get(token)
            if code is None:
                code = vocab[token] = len(vocab)
            self.codes[name].append(code)
        group = self.route(tokens)
        self.group_of_row.append(group)
        self.gid_of_row.append(self.group_ids[group])
        return row

    def add_creative(self, creative: str, tokens: Sequence[str] | None = None) -> int:
        col = 2 * len(self.creatives) + 1  # 0 in a pending impression means "no creative"
        self.col_of[creative] = col
        self.creatives.append(creative)
        self.creative_tokens.append(tuple(tokens) if tokens is not None else None)
        return col

    def describe_creative(self, col: int, tokens: Sequence[str]) -> None:
        """Record the visual attributes of the creative in column ``col`` if it has none yet."""
        k = (col - 1) // 2
        if self.creative_tokens[k] is None:
            self.creative_tokens[k] = tuple(tokens)

    def flush(self) -> None:
        """Move pending counts into the weights and the table."""
        n, width = self.n_rows, 2 * len(self.creatives)
        if len(self.weights) < n:
            self.weights = np.concatenate([self.weights, np.zeros(n - len(self.weights))])
        if self.table.shape != (n, width):
            self.table.resize((n, width))
        if not self.pending and not self.pending_clicks:
            return
        shown = np.asarray(self.pending, dtype=np.int64)
        clicked = np.asarray(self.pending_clicks, dtype=np.int64)
        self.pending, self.pending_clicks = [], []
        rows = shown >> _SHIFT
        self.weights += np.bincount(rows, minlength=n)
        shown = shown[(shown & _MASK) > 0]
        packed = np.concatenate([shown - 1, clicked])  # columns 2k (impressions) and 2k + 1 (clicks)
        counts = sparse.csr_array(
            (np.ones(len(packed)), (packed >> _SHIFT, packed & _MASK)), shape=(n, width)
        )
        self.table = self.table + counts

    def schedule_next(self, work: float, watches: tuple[_Watch, ...] = ()) -> None:
        """After a macro step: the gap doubles from ``first_recluster`` to ``recluster_every``, stretched until
        the events have paid for the work (``recluster_budget`` each); looks at ``watches`` come in between."""
        self.gap = min(2 * self.gap, self.config.recluster_every)
        self._pay(work)
        self.last_work = work
        self.watches = watches
        self.next_full = self.events + max(self.gap, math.ceil(self.debt / self.config.recluster_budget))
        self._schedule_look()

    def looked(self, work: float) -> bool:
        """After a look that cost ``work``: may a macro step run now (the unpaid work is small enough)?"""
        self._pay(work)
        self.next_full = max(self.next_full, self.events + math.ceil(self.debt / self.config.recluster_budget))
        self._schedule_look()
        return self.debt <= _DEBT_STEPS * self.last_work

    def _pay(self, work: float) -> None:
        self.debt = max(0.0, self.debt - self.config.recluster_budget * (self.events - self.debt_at)) + work
        self.debt_at = self.events

    def _schedule_look(self) -> None:
        look = self.events + max(_LOOK_MIN, self.events // _LOOK_SHARE)
        self.next_recluster = min(self.next_full, look) if self.watches else self.next_full

    def decay(self) -> None:
        """Age the counts by ``halflife``; drop creatives whose impressions faded below one."""
        halflife = self.config.halflife
        if halflife is None or self.events == self.last_decay_at:
            return
        factor = 0.5 ** ((self.events - self.last_decay_at) / halflife)
        self.last_decay_at = self.events
        self.weights *= factor
        self.table = self.table * factor
        shown = self.table.sum(axis=0)[0::2]
        keep = np.flatnonzero(shown >= 1.0)
        if len(keep) < len(self.creatives):  # nothing is pending: flushed first
            columns = np.ravel(np.column_stack([2 * keep, 2 * keep + 1]))
            self.table = sparse.csr_array(self.table[:, columns])
            self.creatives = [self.creatives[k] for k in keep]
            self.creative_tokens = [self.creative_tokens[k] for k in keep]
            self.col_of = {creative: 2 * k + 1 for k, creative in enumerate(self.creatives)}

    def route(self, tokens: Mapping[str, str]) -> int:
        """Group index of an attribute tuple under the current tree."""
        node = self.nodes[0]
        while node[0] == "split":
            _, name, branches, default = node
            if isinstance(name, tuple):  # an interaction: the pair of tokens
                key: Any = tuple(tokens.get(part, "missing") for part in name)
            else:
                key = tokens.get(name, "missing")
            node = self.nodes[branches.get(key, default)]
        return int(node[1])

    def code_arrays(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(codes, dtype=np.int64) for name, codes in self.codes.items()}

    def centroids(self, row_group: np.ndarray, n_groups: int) -> np.ndarray:
        """Weighted mean one-hot vector of each group, features ordered by attribute, then code."""
        weights = self.weights[: self.n_rows]
        totals = np.bincount(row_group, weights=weights, minlength=n_groups)
        blocks = [np.zeros((n_groups, 0))]
        for name, codes in self.code_arrays().items():
            size = len(self.vocab[name])
            flat = np.bincount(row_group * size + codes, weights=weights, minlength=n_groups * size)
            blocks.append(flat.reshape(n_groups, size))
        return np.hstack(blocks) / np.maximum(totals, 1e-12)[:, None]

    def install(self, tree: _Tree, ids: list[str], created: dict[str, int]) -> None:
        self.nodes = tree.nodes
        self.group_ids = ids
        self.created_at = {gid: created[gid] for gid in ids}
        self.group_of_row = tree.row_group.tolist()
        self.gid_of_row = [ids[g] for g in self.group_of_row]

    def describe(self) -> list[GroupInfo]:
        row_group = np.asarray(self.group_of_row, dtype=np.int64)
        k = len(self.group_ids)
        weights = np.bincount(row_group, weights=self.weights[: self.n_rows], minlength=k)
        per_row = self.table.sum(axis=1) if self.table.shape[1] else np.zeros(self.n_rows)
        shown = self.table[:, 0::2].sum(axis=1) if self.table.shape[1] else np.zeros(self.n_rows)
        impressions = np.bincount(row_group, weights=shown, minlength=k)
        clicks = np.bincount(row_group, weights=per_row - shown, minlength=k)
        centroids = self.centroids(row_group, k)
        features = [f"{name}={token}" for name, vocab in self.vocab.items() for token in vocab]
        rules = self.rules()
        infos = [
            GroupInfo(
                id=gid,
                weight=float(weights[g]),
                centroid={f: float(v) for f, v in zip(features, centroids[g]) if v > 0},
                created_at=self.created_at[gid],
                rule=rules.get(g, "nobody"),
                impressions=float(impressions[g]),
                clicks=float(clicks[g]),
            )
            for g, gid in enumerate(self.group_ids)
        ]
        return sorted(infos, key=lambda info: int(info.id.rsplit("/g", 1)[1]))

    def rules(self) -> dict[int, str]:
        """Readable membership rule of each group, e.g. ``gender=male & purchase_power in {high, mid}``."""
        everything = {name: set(vocab) for name, vocab in self.vocab.items()}
        terms: dict[int, list[dict[str, frozenset[str]]]] = {}

        def walk(index: int, term: dict[str, frozenset[str]]) -> None:
            node = self.nodes[index]
            if node[0] == "leaf":
                terms.setdefault(int(node[1]), []).append(term)
                return
            _, name, branches, _default = node
            for token, child in branches.items():  # one term per value (pair of values), merged below
                narrowed = dict(term)
                pairs = zip(name, token) if isinstance(name, tuple) else [(name, token)]
                for attribute, value in pairs:
                    narrowed[attribute] = narrowed.get(attribute, frozenset(everything[attribute])) & {value}
                walk(child, narrowed)

        walk(0, {})
        return {group: _describe_terms(group_terms, everything) for group, group_terms in terms.items()}


def _describe_terms(terms: list[dict[str, frozenset[str]]], everything: Mapping[str, set[str]]) -> str:
    """An OR of AND terms: terms that differ in one attribute are united, full value sets dropped."""
    merged = [dict(term) for term in terms]
    changed = True
    while changed:
        changed = False
        for a in range(len(merged)):
            for b in range(a + 1, len(merged)):
                x, y = merged[a], merged[b]
                differing = [name for name in x if x[name] != y[name]] if x.keys() == y.keys() else None
                if differing is not None and len(differing) <= 1:
                    for name in differing:
                        x[name] = x[name] | y[name]
                    merged.pop(b)
                    changed = True
                    break
            if changed:
                break
    texts = []
    for term in merged:
        conditions = []
        for name in sorted(term):
            tokens = sorted(term[name])
            if set(tokens) >= everything[name] - {"missing"}:
                continue
            conditions.append(f"{name}={tokens[0]}" if len(tokens) == 1 else f"{name} in {{{', '.join(tokens)}}}")
        texts.append(" & ".join(conditions) or "all")
    if "all" in texts:
        return "all"
    return " | ".join(f"({t})" if len(texts) > 1 and " & " in t else t for t in sorted(texts))


# ---------------------------------------------------------------------- the macro step
