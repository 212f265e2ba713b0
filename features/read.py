"""Typed reads of the feature store for the learner and serving.

* :meth:`FeatureReader.read_group_rows` — group profile and creative
  preferences of many groups at once, as aligned arrays;
* :meth:`FeatureReader.resolve_group` — a user's current group in a category;
* :meth:`FeatureReader.read_products` — product profiles with title embeddings;
* :meth:`FeatureReader.training_frame` — point-in-time correct features for
  training rows, from the parquet history.

An id the store does not know is reported as missing (``found`` False, NaN,
``None``), never as zeros. Online reads go through Feast's
``get_online_features`` and are cached per entity; before every read the
reader fetches the change log (:mod:`features.changes`) and drops exactly the
entities pushed since, so a cached value is never older than the store's.

The module-level functions use one reader per process built from
``infra.settings.get_settings()``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from features.changes import ChangeLog, change_log, entity_key
from features.schema import EVENT_TIMESTAMP, GROUP_VIEWS, VIEWS

if TYPE_CHECKING:
    import pandas as pd

    from infra.settings import Settings

MISSING = None
"""What a missing entity's fields hold (numbers: NaN)."""

CACHE_ENTRIES = 200_000
"""The cache is emptied when it grows past this many entities."""


class FeatureReadError(ValueError):
    """A read was asked wrongly; the message names the argument and the fix."""


@dataclass(frozen=True)
class TopPrompt:
    """One of a group's best prompts with its evidence."""

    prompt: str
    impressions: int
    clicks: int
    score: float


@dataclass(frozen=True)
class GroupRows:
    """Features of several groups, row ``i`` for ``group_ids[i]``.

    ``found_profile[i]`` / ``found_preferences[i]`` say whether the store has
    the group's ``group_profile`` / ``group_creative_preferences`` row; where
    not, numbers are NaN and objects ``None``. ``found`` is both.
    """

    group_ids: tuple[str, ...]
    found_profile: np.ndarray
    found_preferences: np.ndarray
    category: np.ndarray
    rule: np.ndarray
    member_count: np.ndarray
    weight: np.ndarray
    centroid_keys: list[tuple[str, ...] | None]
    centroid: list[np.ndarray | None]
    impressions: np.ndarray
    clicks: np.ndarray
    ctr: np.ndarray
    attribute_keys: list[tuple[str, ...] | None]
    attribute_impressions: list[np.ndarray | None]
    attribute_clicks: list[np.ndarray | None]
    attribute_ctr: list[np.ndarray | None]
    top_prompts: list[tuple[TopPrompt, ...] | None]
    profile_updated_at: np.ndarray
    preferences_updated_at: np.ndarray

    @property
    def found(self) -> np.ndarray:
        """Groups with both rows."""
        return self.found_profile & self.found_preferences

    @property
    def missing(self) -> list[str]:
        """Ids of groups lacking a row of either view."""
        return [g for g, ok in zip(self.group_ids, self.found) if not ok]

    def __len__(self) -> int:
        return len(self.group_ids)

    def profile(self, i: int) -> dict[str, Any]:
        """Group ``i``'s ``group_profile`` row as :func:`features.rows.group_profile_row` lays it out."""
        keys, values = self.centroid_keys[i], self.centroid[i]
        return {
            "group_id": self.group_ids[i],
            "category": self.category[i],
            "rule": self.rule[i],
            "member_count": self.member_count[i],
            "weight": self.weight[i],
            "centroid_keys": None if keys is None else list(keys),
            "centroid": None if values is None else [float(v) for v in values],
        }

    def preferences(self, i: int) -> dict[str, Any]:
        """Group ``i``'s ``group_creative_preferences`` counts as :func:`features.rows.group_preferences_row` lays them out."""
        keys = self.attribute_keys[i]
        shown, clicked = self.attribute_impressions[i], self.attribute_clicks[i]
        return {
            "group_id": self.group_ids[i],
            "impressions": int(self.impressions[i]),
            "clicks": int(self.clicks[i]),
            "attribute_keys": None if keys is None else list(keys),
            "attribute_impressions": None if shown is None else [int(n) for n in shown],
            "attribute_clicks": None if clicked is None else [int(c) for c in clicked],
        }

    def distributions(self, i: int) -> dict[str, dict[str, float]] | None:
        """Group ``i``'s attribute distributions, ``{attribute: {value: share}}`` (None when missing)."""
        keys, values = self.centroid_keys[i], self.centroid[i]
        if keys is None or values is None:
            return None
        out: dict[str, dict[str, float]] = {}
        for key, share in zip(keys, values):
            name, _, value = key.partition("=")
            out.setdefault(name, {})[value] = float(share)
        return out

    def row(self, group_id: str) -> dict[str, Any] | None:
        """Every feature of one group as a dict, or None when it is missing entirely."""
        i = self.group_ids.index(group_id)
        if not (self.found_profile[i] or self.found_preferences[i]):
            return None
        return {name: _item(getattr(self, name), i) for name in _GROUP_FIELDS}


_GROUP_FIELDS = (
    "category", "rule", "member_count", "weight", "centroid_keys", "centroid", "impressions", "clicks", "ctr",
    "attribute_keys", "attribute_impressions", "attribute_clicks", "attribute_ctr", "top_prompts",
    "profile_updated_at", "preferences_updated_at",
)


@dataclass(frozen=True)
class ProductFeatures:
    """Features of several products, row ``i`` for ``product_ids[i]``; embeddings stacked (NaN rows when unknown)."""

    product_ids: tuple[str, ...]
    found: np.ndarray
    category: np.ndarray
    price: np.ndarray
    title: np.ndarray
    title_embedding: np.ndarray
    has_embedding: np.ndarray
    image_ref: np.ndarray

    @property
    def missing(self) -> list[str]:
        """Ids of products the store does not know."""
        return [p for p, ok in zip(self.product_ids, self.found) if not ok]


class FeatureReader:
    """Reads online features (cached, invalidated by pushes) and point-in-time training frames.

    Parameters
    ----------
    settings
        OSMF settings; default ``infra.settings.get_settings()``.
    cache
        Cache online rows (default ``settings.features.read_cache``).
    """

    def __init__(self, settings: Settings | None = None, cache: bool | None = None) -> None:
        if settings is None:
            from infra.settings import get_settings

            settings = get_settings()
        self.settings = settings
        self.cache_enabled = settings.features.read_cache if cache is None else cache
        self._store: Any = None
        self._changes: ChangeLog | None = None
        self._seq = 0
        self._cache: dict[tuple[str, str], tuple[dict[str, Any] | None]] = {}  # (row,) or (None,) if missing
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- online

    def read_group_rows(self, group_ids: Sequence[str]) -> GroupRows:
        """Profile and creative preferences of ``group_ids`` (duplicates allowed), aligned arrays."""
        ids = _ids("group_ids", group_ids)
        rows = self._online(GROUP_VIEWS, [(g,) for g in ids])
        profile = [rows[("group_profile", (g,))] for g in ids]
        prefs = [rows[("group_creative_preferences", (g,))] for g in ids]
        n = len(ids)
        return GroupRows(
            group_ids=tuple(ids),
            found_profile=np.array([p is not None for p in profile], dtype=bool).reshape(n),
            found_preferences=np.array([p is not None for p in prefs], dtype=bool).reshape(n),
            category=_objects(profile, "category"),
            rule=_objects(profile, "rule"),
            member_count=_floats(profile, "member_count"),
            weight=_floats(profile, "weight"),
            centroid_keys=[None if p is None else p["centroid_keys"] for p in profile],
            centroid=[None if p is None else p["centroid"] for p in profile],
            impressions=_floats(prefs, "impressions"),
            clicks=_floats(prefs, "clicks"),
            ctr=_floats(prefs, "ctr"),
            attribute_keys=[None if p is None else p["attribute_keys"] for p in prefs],
            attribute_impressions=[None if p is None else p["attribute_impressions"] for p in prefs],
            attribute_clicks=[None if p is None else p["attribute_clicks"] for p in prefs],
            attribute_ctr=[None if p is None else p["attribute_ctr"] for p in prefs],
            top_prompts=[None if p is None else p["top_prompts"] for p in prefs],
            profile_updated_at=_times(profile),
            preferences_updated_at=_times(prefs),
        )

    def resolve_group(self, user_id: str, category: str) -> str | None:
        """The user's current group in ``category``; None when the store does not know the user there."""
        return self.resolve_groups([user_id], category)[0]

    def resolve_groups(self, user_ids: Sequence[str], category: str) -> list[str | None]:
        """:meth:`resolve_group` for many users of one category."""
        ids = _ids("user_ids", user_ids)
        if not isinstance(category, str) or not category:
            raise FeatureReadError(f"category: must be a non-empty string, got {category!r}")
        rows = self._online(("user_group",), [(u, category) for u in ids])
        return [None if (r := rows[("user_group", (u, category))]) is None else r["group_id"] for u in ids]

    def read_products(self, product_ids: Sequence[str]) -> ProductFeatures:
        """Product profiles; ``title_embedding`` is an ``(n, 384)`` array with NaN rows where unknown."""
        from features.embed import DIMENSIONS

        ids = _ids("product_ids", product_ids)
        rows = [self._online(("product_profile",), [(p,) for p in ids])[("product_profile", (p,))] for p in ids]
        embedding = np.full((len(ids), DIMENSIONS), np.nan, dtype=np.float32)
        has = np.zeros(len(ids), dtype=bool)
        for i, row in enumerate(rows):
            vector = None if row is None else row.get("title_embedding")
            if vector is not None and len(vector) == DIMENSIONS:
                embedding[i] = vector
                has[i] = True
        return ProductFeatures(
            product_ids=tuple(ids),
            found=np.array([r is not None for r in rows], dtype=bool).reshape(len(ids)),
            category=_objects(rows, "category"),
            price=_floats(rows, "price"),
            title=_objects(rows, "title"),
            title_embedding=embedding,
            has_embedding=has,
            image_ref=_objects(rows, "image_ref"),
        )

    def invalidate(self) -> None:
        """Drop every cached row."""
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        """Release the change log's connection."""
        with self._lock:
            if self._changes is not None:
                self._changes.close()
                self._changes = None

    def _online(self, views: Sequence[str], keys: list[tuple[str, ...]]) -> dict[tuple[str, tuple[str, ...]], Any]:
        """Rows of ``views`` for entity ``keys``: cached, else one Feast call for all misses."""
        with self._lock:
            self._open()
            self._apply_changes()
            out: dict[tuple[str, tuple[str, ...]], Any] = {}
            misses: list[tuple[str, ...]] = []
            seen: set[tuple[str, ...]] = set()
            for key in keys:
                if key in seen:
                    continue
                seen.add(key)
                hit = True
                for view in views:
                    cached = self._cache.get((view, entity_key(key))) if self.cache_enabled else None
                    if cached is None:
                        hit = False
                        break
                    out[(view, key)] = cached[0]
                if not hit:
                    misses.append(key)
            if misses:
                fetched = self._fetch(views, misses)
                if self.cache_enabled and len(self._cache) + len(fetched) > CACHE_ENTRIES:
                    self._cache.clear()
                for (view, key), row in fetched.items():
                    out[(view, key)] = row
                    if self.cache_enabled:
                        self._cache[(view, entity_key(key))] = (row,)
            return out

    def _fetch(self, views: Sequence[str], keys: list[tuple[str, ...]]) -> dict[tuple[str, tuple[str, ...]], Any]:
        from feast.protos.feast.serving.ServingService_pb2 import FieldStatus
        from feast.type_map import feast_value_type_to_python_type

        names = VIEWS[views[0]].keys
        refs = [f"{view}:{c.name}" for view in views for c in VIEWS[view].features]
        response = self._store.get_online_features(
            features=refs, entity_rows=[dict(zip(names, key)) for key in keys], full_feature_names=True
        )
        proto = response.proto
        columns = {name: i for i, name in enumerate(proto.metadata.feature_names.val)}
        out: dict[tuple[str, tuple[str, ...]], Any] = {}
        for view in views:
            features = [c.name for c in VIEWS[view].features]
            vectors = [proto.results[columns[f"{view}__{f}"]] for f in features]
            # A row exists when its non-nullable column holds a value (Redis answers an unknown key with
            # status PRESENT and empty values, SQLite with NOT_FOUND).
            probe = proto.results[columns[f"{view}__{_required(view)}"]]
            for i, key in enumerate(keys):
                if probe.statuses[i] != FieldStatus.PRESENT or probe.values[i].WhichOneof("val") is None:
                    out[(view, key)] = None
                    continue
                row = {f: feast_value_type_to_python_type(v.values[i]) for f, v in zip(features, vectors)}
                seconds = max(v.event_timestamps[i].seconds + v.event_timestamps[i].nanos / 1e9 for v in vectors)
                row["_updated_at"] = seconds
                out[(view, key)] = _decoded(view, row)
        return out

    def _open(self) -> None:
        if self._store is None:
            from features.store import FeatureStoreError, is_applied, open_store

            if not is_applied(self.settings):
                raise FeatureStoreError(
                    f"no feature store under {self.settings.data_dir}/features; "
                    "run `osmf features apply` (or start the worker) first"
                )
            self._store = open_store(self.settings)
        if self._changes is None and self.cache_enabled:
            self._changes = change_log(self.settings)
            self._seq = self._changes.last_seq()
            self._cache.clear()

    def _apply_changes(self) -> None:
        if not self.cache_enabled or self._changes is None:
            return
        self._seq, changed = self._changes.changes_since(self._seq)
        if changed is None:
            self._cache.clear()
            return
        for view, key in changed:
            if key == "*":
                if view == "*":
                    self._cache.clear()
                else:
                    for cached in [k for k in self._cache if k[0] == view]:
                        del self._cache[cached]
            else:
                self._cache.pop((view, key), None)

    # -------------------------------------------------------------- training

    def training_frame(
        self,
        start: datetime,
        end: datetime,
        entities: pd.DataFrame | None = None,
        views: Sequence[str] = GROUP_VIEWS,
    ) -> pd.DataFrame:
        """Features as they were at each row's time, for rows with ``start <= event_timestamp < end``.

        ``entities`` has the join keys of ``views`` (``group_id`` for the group
        views, ``product_id``, or ``user_id`` + ``category``) and an
        ``event_timestamp`` column (e.g. the preference pairs to train on);
        default: every recorded update of the views' groups in the window,
        from the history. Each row gets the latest value whose event time is
        at or before its own — a value stamped later is never joined (no
        leakage). Feature columns are named ``<view>__<feature>``; a column
        ``<view>__found`` says whether the view had a value by then.
        """
        import pandas as pd

        start, end = _utc("start", start), _utc("end", end)
        if end <= start:
            raise FeatureReadError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
        for view in views:
            if view not in VIEWS:
                raise FeatureReadError(f"views: unknown view {view!r}; use some of {sorted(VIEWS)}")
        keys = sorted({k for view in views for k in VIEWS[view].keys})
        if entities is None:
            if set(views) - set(GROUP_VIEWS):
                raise FeatureReadError("entities: required when views other than the group views are asked")
            entities = self._history_spine(views, start, end)
        else:
            missing = [c for c in (*keys, EVENT_TIMESTAMP) if c not in entities.columns]
            if missing:
                raise FeatureReadError(
                    f"entities: missing column(s) {missing}; give {keys} and {EVENT_TIMESTAMP!r} (UTC times)"
                )
            entities = entities.copy()
            entities[EVENT_TIMESTAMP] = pd.to_datetime(entities[EVENT_TIMESTAMP], utc=True)
        spine = entities[(entities[EVENT_TIMESTAMP] >= start) & (entities[EVENT_TIMESTAMP] < end)]
        spine = spine.reset_index(drop=True)
        columns = [f"{view}__{c.name}" for view in views for c in VIEWS[view].features]
        if spine.empty:
            return pd.DataFrame(columns=[*spine.columns, *columns, *(f"{v}__found" for v in views)])
        from features.store import open_store

        store = self._store or open_store(self.settings)
        refs = [f"{view}:{c.name}" for view in views for c in VIEWS[view].features]
        spine = spine.assign(_row=range(len(spine)))
        joined = store.get_historical_features(
            entity_df=spine[[*keys, EVENT_TIMESTAMP, "_row"]], features=refs, full_feature_names=True
        ).to_df()
        # Feast drops a row whose entity has values only after the row's time; put it back, missing.
        frame = spine.merge(joined[["_row", *columns]], on="_row", how="left")
        frame = frame.sort_values("_row").drop(columns="_row").reset_index(drop=True)
        for view in views:
            probe = f"{view}__{_required(view)}"
            frame[f"{view}__found"] = frame[probe].notna()
        return frame

    def _history_spine(self, views: Sequence[str], start: datetime, end: datetime) -> pd.DataFrame:
        import pandas as pd
        import pyarrow.dataset as ds

        from features.schema import arrow_schema
        from features.store import history_dir

        frames = []
        for view in views:
            folder = history_dir(self.settings, view)
            files = sorted(str(p) for p in folder.glob("part-*.parquet")) if folder.is_dir() else []
            if not files:
                continue
            table = ds.dataset(files, format="parquet", schema=arrow_schema(view)).to_table(
                columns=["group_id", EVENT_TIMESTAMP]
            )
            frames.append(table.to_pandas())
        if not frames:
            return pd.DataFrame({"group_id": pd.Series(dtype=str), EVENT_TIMESTAMP: pd.Series(dtype="datetime64[us, UTC]")})
        spine = pd.concat(frames).drop_duplicates().sort_values([EVENT_TIMESTAMP, "group_id"])
        spine[EVENT_TIMESTAMP] = pd.to_datetime(spine[EVENT_TIMESTAMP], utc=True)
        return spine[(spine[EVENT_TIMESTAMP] >= start) & (spine[EVENT_TIMESTAMP] < end)]


def _required(view: str) -> str:
    return next(c.name for c in VIEWS[view].features if not c.nullable)


def _ids(name: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str):
        raise FeatureReadError(f"{name}: give a list of ids, not one string ({values!r}); wrap it: [{values!r}]")
    ids = list(values)
    for position, value in enumerate(ids):
        if not isinstance(value, str) or not value:
            raise FeatureReadError(f"{name}[{position}]: ids are non-empty strings, got {value!r}")
    return ids


def _utc(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise FeatureReadError(f"{name}: must be a datetime, got {type(value).__name__} {value!r}")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _objects(rows: list[dict[str, Any] | None], name: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        out[i] = None if row is None else row.get(name)
    return out


def _floats(rows: list[dict[str, Any] | None], name: str) -> np.ndarray:
    return np.array(
        [math.nan if row is None or row.get(name) is None else float(row[name]) for row in rows], dtype=np.float64
    ).reshape(len(rows))


_ARRAYS = {
    "centroid": np.float64,
    "attribute_impressions": np.int64,
    "attribute_clicks": np.int64,
    "attribute_ctr": np.float64,
}


def _decoded(view: str, row: dict[str, Any]) -> dict[str, Any]:
    """A fetched row in the form readers get: read-only numpy arrays, TopPrompt lists, key tuples.

    Done once per fetch, so cached reads only gather (and callers cannot change the cache through them).
    """
    for name, dtype in _ARRAYS.items():
        if name in row:
            array = np.asarray(row[name] or [], dtype=dtype)
            array.flags.writeable = False
            row[name] = array
    for name in ("centroid_keys", "attribute_keys"):
        if name in row:
            row[name] = tuple(row[name] or ())
    if view == "group_creative_preferences":
        row["top_prompts"] = _top(row)
    return row


def _times(rows: list[dict[str, Any] | None]) -> np.ndarray:
    return np.array(
        [np.datetime64("NaT") if row is None else np.datetime64(int(row["_updated_at"] * 1e6), "us") for row in rows],
        dtype="datetime64[us]",
    ).reshape(len(rows))


def _top(row: dict[str, Any]) -> tuple[TopPrompt, ...]:
    return tuple(
        TopPrompt(p, int(i), int(c), float(s))
        for p, i, c, s in zip(
            row["top_prompts"] or [], row["top_prompt_impressions"] or [], row["top_prompt_clicks"] or [],
            row["top_prompt_score"] or [],
        )
    )


def _item(values: Any, i: int) -> Any:
    value = values[i]
    return value.item() if isinstance(value, np.generic) else value


_default: FeatureReader | None = None
_default_lock = threading.Lock()


def default_reader() -> FeatureReader:
    """The process-wide reader on ``infra.settings.get_settings()``."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FeatureReader()
        return _default


def read_group_rows(group_ids: Sequence[str]) -> GroupRows:
    """:meth:`FeatureReader.read_group_rows` on the process-wide reader."""
    return default_reader().read_group_rows(group_ids)


def resolve_group(user_id: str, category: str) -> str | None:
    """:meth:`FeatureReader.resolve_group` on the process-wide reader."""
    return default_reader().resolve_group(user_id, category)


def training_frame(
    start: datetime, end: datetime, entities: pd.DataFrame | None = None, views: Sequence[str] = GROUP_VIEWS
) -> pd.DataFrame:
    """:meth:`FeatureReader.training_frame` on the process-wide reader."""
    return default_reader().training_frame(start, end, entities, views)
