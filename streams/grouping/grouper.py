"""``ProductAwareGrouper``: a River clusterer (``learn_one`` / ``predict_one``) and the worker's API over one state per category."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from river import base
from scipy.optimize import linear_sum_assignment

from streams.grouping.category import _SHIFT, _Category
from streams.grouping.config import GroupInfo, GroupingConfig, encode_value
from streams.grouping.tree import _grow, _look


class ProductAwareGrouper(base.Clusterer):
    """Groups users per product category from their attributes and clicks, online, with stable ids.

    A River clusterer: ``learn_one(x, ...)`` / ``predict_one(x, ...)`` on a
    dict of user attributes, ``clone()`` and ``_get_params()`` as River
    expects, so it composes with River's tools and passes River's estimator
    checks. The worker uses the category-first verbs (:meth:`learn_and_assign`,
    :meth:`learn_click`, :meth:`assign`), which take the same evidence.

    Parameters
    ----------
    config
        Settings (:class:`GroupingConfig`); defaults when omitted.
    category
        Category of calls that name none (River's ``learn_one(x)``), default ``"all"``.

    Attributes
    ----------
    config : GroupingConfig
        The settings in force.

    Notes
    -----
    Feed every impression through :meth:`learn_and_assign` (with its
    creative) and every attributed click through :meth:`learn_click`. The
    grouper pickles (caches are left out and rebuilt); a copy continues
    exactly like the original. See the package docstring for a runnable
    example and ``docs/grouping.md`` for the algorithm.

    Examples
    --------
    >>> grouper = ProductAwareGrouper(GroupingConfig(max_groups=4))
    >>> grouper.learn_one({"age": "young"}, category="mugs", creative="pink", clicked=True)
    >>> grouper.predict_one({"age": "young"}, category="mugs"), grouper.assign("mugs", {"age": "old"})
    (0, 'mugs/g0')
    >>> grouper.clone().config.max_groups
    4
    """

    def __init__(self, config: GroupingConfig | None = None, category: str = "all") -> None:
        self.config = config or GroupingConfig()
        self.category = category
        self._categories: dict[str, _Category] = {}
        self._encoded: dict[tuple[Any, ...], tuple[tuple[str, str], ...]] = {}

    # ------------------------------------------------------------------ River's verbs

    def learn_one(
        self,
        x: Mapping[Any, Any],
        category: str | None = None,
        creative: str | None = None,
        attributes: Sequence[str] | None = None,
        clicked: bool = False,
    ) -> None:
        """Count one impression to the user with attributes ``x`` (River's protocol).

        Parameters
        ----------
        x
            The user's attributes.
        category
            Product category (default: the ``category`` parameter).
        creative
            The creative shown, when known; without it only the traffic weight is counted.
        attributes
            The creative's visual attributes as ``name=value`` tokens
            (``CreativePrompt.attribute_tokens()``), when known: clicks are
            then also pooled over creatives that share an attribute.
        clicked
            The impression was clicked (the click is counted too; for clicks
            that arrive later use :meth:`learn_click`).
        """
        name = self.category if category is None else category
        self.learn_and_assign(name, x, creative, attributes)
        if clicked and creative is not None:
            self.learn_click(name, x, creative)

    def predict_one(self, x: Mapping[Any, Any], category: str | None = None) -> int:  # type: ignore[override]
        """The number ``N`` of the group ``category/gN`` of the user ``x`` (nothing is learned)."""
        group = self.assign(self.category if category is None else category, x)
        return int(group.rsplit("/g", 1)[1])

    # ------------------------------------------------------------------ the worker's verbs

    def learn_click(
        self, category: str, user: Mapping[str, Any], creative: str, attributes: Sequence[str] | None = None
    ) -> None:
        """Count a click of ``user`` on ``creative``, shown for ``category`` (``attributes`` as in :meth:`learn_one`)."""
        state = self._categories.get(category) or self._add_category(category)
        row = state.row_of.get(tuple(user.items()))
        if row is None:
            row = self._row(state, user)
            if row is None:
                return
        col = state.col_of.get(creative)
        if col is None:
            col = state.add_creative(creative, attributes)
        elif attributes is not None:
            state.describe_creative(col, attributes)
        state.pending_clicks.append(row << _SHIFT | col)

    def assign(self, category: str, user: Mapping[str, Any]) -> str:
        """The id of the group ``user`` belongs to in ``category`` (nothing is learned)."""
        state = self._categories.get(category)
        if state is None:
            return f"{category}/g0"
        row = state.row_of.get(tuple(user.items()))
        if row is not None:
            return state.gid_of_row[row]
        return state.group_ids[state.route(dict(self._encode(user)))]

    def learn_and_assign(
        self,
        category: str,
        user: Mapping[str, Any],
        creative: str | None = None,
        attributes: Sequence[str] | None = None,
    ) -> str:
        """Learn one impression and return ``user``'s group id in ``category`` — the hot path.

        ``attributes``: the creative's ``name=value`` visual attributes, when
        known (read once per creative; see :meth:`learn_one`).
        """
        state = self._categories.get(category)
        if state is None:
            state = self._add_category(category)
        row = state.row_of.get(tuple(user.items()))
        if row is None:
            row = self._row(state, user)
            if row is None:  # past max_tuples: assign without learning
                return state.group_ids[state.route(dict(self._encode(user)))]
        if creative is None:
            state.pending.append(row << _SHIFT)
        else:
            col = state.col_of.get(creative)
            if col is None:
                col = state.add_creative(creative, attributes)
            state.pending.append(row << _SHIFT | col)
        state.events += 1
        if state.events >= state.next_recluster:
            self._step(state)
        return state.gid_of_row[row]

    def groups(self, category: str) -> list[GroupInfo]:
        """The live groups of ``category``, by id; empty for a category never seen."""
        state = self._categories.get(category)
        if state is None:
            return []
        state.flush()
        return state.describe()

    def categories(self) -> list[str]:
        """Categories seen so far, sorted."""
        return sorted(self._categories)

    def ids_minted(self, category: str) -> int:
        """How many group ids ``category`` has handed out, live and retired."""
        state = self._categories.get(category)
        return state.next_id if state is not None else 0

    def recluster(self, category: str) -> None:
        """Run the macro step of ``category`` now (it also runs on its own schedule)."""
        state = self._categories.get(category)
        if state is not None:
            self._recluster(state)

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "category": self.category, "categories": self._categories}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self.category = state.get("category", "all")  # absent in pickles of before River
        self._categories = state["categories"]
        self._encoded = {}

    # ------------------------------------------------------------------ internals

    def _add_category(self, category: str) -> _Category:
        state = _Category(category, self.config)
        self._categories[category] = state
        return state

    def _encode(self, user: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        key = tuple(user.items())
        encoded = self._encoded.get(key)
        if encoded is None:
            wanted = self.config.attributes
            numeric = self.config.numeric_attributes
            encoded = tuple(
                sorted(
                    (str(name), encode_value(value, name in numeric))
                    for name, value in user.items()
                    if wanted is None or name in wanted
                )
            )
            if len(self._encoded) >= self.config.cache_size:
                self._encoded.clear()
            self._encoded[key] = encoded
        return encoded

    def _row(self, state: _Category, user: Mapping[str, Any]) -> int | None:
        row = state.row_of_tuple(self._encode(user))
        if row is not None:
            if len(state.row_of) >= self.config.cache_size:
                state.row_of.clear()
            state.row_of[tuple(user.items())] = row
        return row

    def _step(self, state: _Category) -> None:
        """The macro step when due; between steps, a look at the watched candidates that may bring it forward."""
        if state.events < state.next_full:
            state.flush()
            passed, work = _look(state, self.config)
            if not (state.looked(work) and passed):
                return
        self._recluster(state)

    def _recluster(self, state: _Category) -> None:
        state.flush()
        state.decay()
        tree = _grow(state, self.config)
        state.schedule_next(tree.work, tree.watches)
        old_group = np.asarray(state.group_of_row, dtype=np.int64)
        old_ids = state.group_ids
        weights = state.weights[: state.n_rows]
        new_centroids = state.centroids(tree.row_group, tree.n_groups)
        old_centroids = state.centroids(old_group, len(old_ids))
        old_weight = np.bincount(old_group, weights=weights, minlength=len(old_ids))
        alive = [g for g in range(len(old_ids)) if old_weight[g] > 0]
        ids: list[str | None] = [None] * tree.n_groups
        if alive:
            cost = np.linalg.norm(new_centroids[:, None, :] - old_centroids[None, alive, :], axis=2)
            for new, j in zip(*linear_sum_assignment(cost)):
                if cost[new, j] <= self.config.match_distance:
                    ids[new] = old_ids[alive[j]]
        created = dict(state.created_at)
        for g in range(tree.n_groups):
            if ids[g] is None:
                ids[g] = f"{state.name}/g{state.next_id}"
                state.next_id += 1
                created[ids[g]] = state.events
        state.install(tree, [str(i) for i in ids], created)
