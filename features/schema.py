"""Column layout of every feature view, as the pusher and the parquet history see it.

Pure Python (no Feast import), so the stream worker can validate rows on its
hot path without loading Feast. ``tests/features/test_definitions.py`` pins
this layout to the Feast definitions in ``features/repo/definitions.py``.

A *row* is a plain dict: the entity join keys and every feature column of one
view. Timestamps are added by the pusher (``event_timestamp``, ``created``).

>>> validate_row("user_group", {"user_id": "u1", "category": "drill", "group_id": "drill/g2"})
>>> validate_row("user_group", {"user_id": "u1", "category": "drill", "group_id": 7})
Traceback (most recent call last):
...
features.schema.FeatureRowError: user_group.group_id: expected str, got int 7; pass it as a string
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EVENT_TIMESTAMP = "event_timestamp"
CREATED = "created"

# kinds: "str", "int", "float", "list[str]", "list[int]", "list[float]", "list[float32]"


@dataclass(frozen=True)
class Column:
    """One column of a view: name, kind, and whether it may be None."""

    name: str
    kind: str
    nullable: bool = False


@dataclass(frozen=True)
class ViewSchema:
    """Entity join keys and feature columns of one feature view."""

    name: str
    keys: tuple[str, ...]
    features: tuple[Column, ...]

    @property
    def push_source(self) -> str:
        """Name of the view's Feast push source."""
        return f"{self.name}_push"

    @property
    def columns(self) -> tuple[str, ...]:
        """Entity keys, then features, then the two timestamps: the parquet column order."""
        return (*self.keys, *(c.name for c in self.features), EVENT_TIMESTAMP, CREATED)

    def key_of(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """The entity key of ``row``."""
        return tuple(row[k] for k in self.keys)


VIEWS: dict[str, ViewSchema] = {
    view.name: view
    for view in (
        ViewSchema(
            "group_profile",
            ("group_id",),
            (
                Column("category", "str"),
                Column("rule", "str"),
                Column("member_count", "int"),
                Column("weight", "float"),
                Column("centroid_keys", "list[str]"),
                Column("centroid", "list[float]"),
            ),
        ),
        ViewSchema(
            "group_creative_preferences",
            ("group_id",),
            (
                Column("impressions", "int"),
                Column("clicks", "int"),
                Column("ctr", "float"),
                Column("attribute_keys", "list[str]"),
                Column("attribute_impressions", "list[int]"),
                Column("attribute_clicks", "list[int]"),
                Column("attribute_ctr", "list[float]"),
                Column("top_prompts", "list[str]"),
                Column("top_prompt_impressions", "list[int]"),
                Column("top_prompt_clicks", "list[int]"),
                Column("top_prompt_score", "list[float]"),
            ),
        ),
        ViewSchema("user_group", ("user_id", "category"), (Column("group_id", "str"),)),
        ViewSchema(
            "product_profile",
            ("product_id",),
            (
                Column("category", "str"),
                Column("price", "float", nullable=True),
                Column("title", "str", nullable=True),
                Column("title_embedding", "list[float32]", nullable=True),
                Column("image_ref", "str", nullable=True),
            ),
        ),
    )
}
"""Every view the worker pushes, by name."""

GROUP_VIEWS = ("group_profile", "group_creative_preferences")


class FeatureRowError(ValueError):
    """A feature row does not fit its view; the message names ``view.field`` and the fix."""

    def __init__(self, view: str, field: str, reason: str) -> None:
        super().__init__(f"{view}.{field}: {reason}")
        self.view = view
        self.field = field
        self.reason = reason


def view_schema(view: str) -> ViewSchema:
    """The schema of ``view``, or :class:`FeatureRowError` naming the views there are."""
    schema = VIEWS.get(view)
    if schema is None:
        raise FeatureRowError(view, "<view>", f"unknown feature view; use one of {sorted(VIEWS)}")
    return schema


def validate_row(view: str, row: Mapping[str, Any]) -> None:
    """Check that ``row`` has exactly the view's keys and features, each of the right type."""
    schema = view_schema(view)
    expected = set(schema.keys) | {c.name for c in schema.features}
    extra = set(row) - expected
    if extra:
        name = sorted(extra)[0]
        raise FeatureRowError(view, name, f"not a column of this view; columns are {sorted(expected)}")
    for key in schema.keys:
        value = row.get(key)
        if not isinstance(value, str) or not value:
            raise FeatureRowError(view, key, f"entity key must be a non-empty string, got {_show(value)}")
    for column in schema.features:
        if column.name not in row:
            raise FeatureRowError(view, column.name, "missing; every feature column must be given (None if nullable)")
        _check(view, column, row[column.name])


def _check(view: str, column: Column, value: Any) -> None:
    if value is None:
        if not column.nullable:
            raise FeatureRowError(view, column.name, "is None but the column is not nullable; give a value")
        return
    kind = column.kind
    if kind == "str":
        if not isinstance(value, str):
            raise FeatureRowError(view, column.name, f"expected str, got {_show(value)}; pass it as a string")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise FeatureRowError(view, column.name, f"expected int, got {_show(value)}; pass a whole number")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FeatureRowError(view, column.name, f"expected a finite float, got {_show(value)}")
    else:
        if not isinstance(value, (list, tuple)):
            raise FeatureRowError(view, column.name, f"expected a list ({kind}), got {_show(value)}")
        item = kind[5:-1]
        for position, element in enumerate(value):
            ok = (
                isinstance(element, str)
                if item == "str"
                else isinstance(element, int) and not isinstance(element, bool)
                if item == "int"
                else isinstance(element, (int, float)) and not isinstance(element, bool) and math.isfinite(element)
            )
            if not ok:
                raise FeatureRowError(
                    view, f"{column.name}[{position}]", f"expected {item}, got {_show(element)}"
                )


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def arrow_schema(view: str):  # noqa: ANN201 - pyarrow is imported lazily
    """The pyarrow schema of the view's parquet history (keys, features, timestamps in UTC)."""
    import pyarrow as pa

    types = {
        "str": pa.string(),
        "int": pa.int64(),
        "float": pa.float64(),
        "list[str]": pa.list_(pa.string()),
        "list[int]": pa.list_(pa.int64()),
        "list[float]": pa.list_(pa.float64()),
        "list[float32]": pa.list_(pa.float32()),
    }
    schema = view_schema(view)
    fields = [pa.field(k, pa.string(), nullable=False) for k in schema.keys]
    fields += [pa.field(c.name, types[c.kind]) for c in schema.features]
    fields += [pa.field(EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")), pa.field(CREATED, pa.timestamp("us", tz="UTC"))]
    return pa.schema(fields)
