"""The event contract: round trips and errors that name the field."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.contracts.events import MAX_EVENT_BYTES, Click, EventError, Impression, parse_event, to_bytes

ids = st.text(min_size=1, max_size=40)
names = st.text(min_size=1, max_size=20)
values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)
)
attributes = st.dictionaries(names, values, max_size=8)

impressions = st.builds(
    Impression,
    event_id=ids,
    ts=st.integers(0, 2**48),
    user_id=ids,
    user=attributes,
    product_id=ids,
    category=names,
    product=attributes,
    creative_id=ids,
    prompt=st.one_of(st.none(), st.text(max_size=100)),
    model_version=names,
    placement=names,
)
clicks = st.builds(
    Click, event_id=ids, ts=st.integers(0, 2**48), impression_id=ids, user_id=ids, product_id=ids, creative_id=ids
)


@given(impressions)
def test_impression_round_trips(event: Impression) -> None:
    assert parse_event(to_bytes(event)) == event


@given(clicks)
def test_click_round_trips(event: Click) -> None:
    assert parse_event(to_bytes(event)) == event


def _click_dict() -> dict:
    return json.loads(
        to_bytes(Click(event_id="c1", ts=5, impression_id="i1", user_id="u1", product_id="p1", creative_id="k1"))
    )


def test_wire_form_carries_schema_version_and_type() -> None:
    wire = _click_dict()
    assert wire["schema"] == 1 and wire["type"] == "click"


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda d: d.pop("ts"), "ts", "missing"),
        (lambda d: d.update(ts="5"), "ts", "integer"),
        (lambda d: d.update(ts=-1), "ts", "greater than or equal"),
        (lambda d: d.update(schema=99), "schema", "unsupported version 99"),
        (lambda d: d.update(type="view"), "type", "'impression' or 'click'"),
        (lambda d: d.update(event_id=""), "event_id", "at least 1"),
        (lambda d: d.update(extra=1), "extra", "unknown field"),
        (lambda d: d.pop("impression_id"), "impression_id", "missing"),
    ],
)
def test_bad_field_is_named(mutate, field: str, words: str) -> None:
    wire = _click_dict()
    mutate(wire)
    with pytest.raises(EventError) as err:
        parse_event(json.dumps(wire).encode())
    assert err.value.field == field
    assert words in str(err.value)


def test_nested_attribute_error_names_path() -> None:
    imp = json.loads(
        to_bytes(
            Impression(
                event_id="e", ts=1, user_id="u", user={}, product_id="p", category="c", product={},
                creative_id="k", prompt=None, model_version="m", placement="feed",
            )
        )
    )
    imp["user"] = {"age": [1, 2]}
    with pytest.raises(EventError) as err:
        parse_event(json.dumps(imp).encode())
    assert err.value.field.startswith("user.age")


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"[1,2]", b"42"])
def test_garbage_is_rejected_cleanly(data: bytes) -> None:
    with pytest.raises(EventError):
        parse_event(data)


def test_oversize_payload_rejected_before_parsing() -> None:
    with pytest.raises(EventError, match="over the"):
        parse_event(b" " * (MAX_EVENT_BYTES + 1))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_event_error(data: bytes) -> None:
    try:
        parse_event(data)
    except EventError:
        pass
