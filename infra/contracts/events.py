"""The event contract: impressions and clicks on the wire (JSON, schema-versioned).

Every event carries ``event_id`` (unique, for idempotence), ``ts`` (epoch ms)
and ``schema`` (version). :func:`parse_event` is the one entry point from bytes;
it raises :class:`EventError` naming the bad field, so the caller can send the
original bytes to the dead-letter topic with that reason.

>>> imp = Impression(event_id="e1", ts=1, user_id="u1", user={"age": "25-34"},
...     product_id="p1", category="lipstick", product={"price": 9.9},
...     creative_id="c1", prompt=None, model_version="random", placement="feed")
>>> parse_event(to_bytes(imp)) == imp
True
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({SCHEMA_VERSION})
MAX_EVENT_BYTES = 16 * 1024

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]
AttributeValue = Union[str, int, float, bool, None]
Attributes = Annotated[dict[Name, AttributeValue], Field(max_length=64)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    event_id: Id = Field(description="Unique id; replays with the same id are counted once.")
    ts: int = Field(ge=0, description="Event time, epoch milliseconds.")
    schema_version: int = Field(SCHEMA_VERSION, alias="schema", description="Contract version.")


class Impression(_Event):
    """A creative was shown to a user for a product."""

    type: Literal["impression"] = "impression"
    user_id: Id
    user: Attributes = Field(description="User attributes (age band, gender, city tier, ...).")
    product_id: Id
    category: Name
    product: Attributes = Field(description="Product attributes (price, title, ...).")
    creative_id: Id
    prompt: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        description="Canonical creative prompt text; None when unknown (replayed logs)."
    )
    model_version: Name = Field(description="Model version that produced the creative.")
    placement: Name


class Click(_Event):
    """A user clicked the creative of an earlier impression."""

    type: Literal["click"] = "click"
    impression_id: Id = Field(description="event_id of the impression that was clicked.")
    user_id: Id
    product_id: Id
    creative_id: Id


Event = Annotated[Union[Impression, Click], Field(discriminator="type")]
_EVENT_ADAPTER: TypeAdapter[Impression | Click] = TypeAdapter(Event)


class EventError(ValueError):
    """An event failed validation; ``field`` names where, ``reason`` says what and how to fix."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_event(data: bytes) -> Impression | Click:
    """Parse wire bytes into an :class:`Impression` or :class:`Click`, or raise :class:`EventError`."""
    if len(data) > MAX_EVENT_BYTES:
        raise EventError("<event>", f"payload is {len(data)} bytes, over the {MAX_EVENT_BYTES}-byte limit")
    try:
        event = _EVENT_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise _first_error(exc) from None
    if event.schema_version not in SUPPORTED_SCHEMAS:
        raise EventError(
            "schema",
            f"unsupported version {event.schema_version}; this build reads {sorted(SUPPORTED_SCHEMAS)}",
        )
    return event


def to_bytes(event: Impression | Click) -> bytes:
    """Serialise an event to its JSON wire form."""
    return event.model_dump_json(by_alias=True).encode()


def _first_error(exc: ValidationError) -> EventError:
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    loc = [str(part) for part in err["loc"]]
    if kind == "json_invalid":
        return EventError("<event>", f"not valid JSON ({err['msg']}); send one JSON object per message")
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return EventError("type", "must be 'impression' or 'click'")
    if kind == "model_attributes_type":
        return EventError("<event>", "must be a JSON object")
    if loc and loc[0] in ("impression", "click"):
        loc = loc[1:]
    field = ".".join(loc) or "<event>"
    if field == "schema_version":
        field = "schema"
    if kind == "missing":
        return EventError(field, "missing; this field is required")
    if kind == "extra_forbidden":
        return EventError(field, "unknown field; remove it or raise the schema version")
    got = err.get("input")
    got_text = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return EventError(field, f"{err['msg']}{got_text}")
