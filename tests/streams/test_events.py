"""The event contract: round trips and errors that name the field."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.contracts.events import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    SCHEMA_VERSION,
    BadEvent,
    Click,
    EventError,
    Impression,
    decode_message,
    encode_batch,
    parse_event,
    parse_events,
    to_bytes,
)

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
    assert wire["schema"] == SCHEMA_VERSION == 2 and wire["type"] == "click"


def test_version_1_single_events_still_parse() -> None:
    wire = _click_dict() | {"schema": 1}
    event = parse_event(json.dumps(wire).encode())
    assert event.schema_version == 1
    assert decode_message(json.dumps(wire).encode()) == [event]


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


def test_attribute_values_keep_their_json_types() -> None:
    """Attribute values are tried as str, int, float, bool, None in that order: each JSON value still gets its
    own type (an int is not read as a float, a bool not as an int, 2.0 stays a float)."""
    imp = json.loads(
        to_bytes(
            Impression(
                event_id="e", ts=1, user_id="u", user={}, product_id="p", category="c", product={},
                creative_id="k", prompt=None, model_version="m", placement="feed",
            )
        )
    )
    imp["user"] = {"s": "1", "i": 3, "f": 2.0, "g": 0.5, "b": True, "n": None}
    for event in (parse_event(json.dumps(imp).encode()), parse_events(encode_batch([json.dumps(imp).encode()]))[0]):
        assert {k: type(v) for k, v in event.user.items()} == {
            "s": str, "i": int, "f": float, "g": float, "b": bool, "n": type(None)
        }
        assert event.user == {"s": "1", "i": 3, "f": 2.0, "g": 0.5, "b": True, "n": None}


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


# --------------------------------------------------------------------------- batches


@given(st.lists(st.one_of(impressions, clicks), min_size=1, max_size=20))
def test_batch_round_trips_in_order(events: list) -> None:
    assert decode_message(encode_batch(to_bytes(e) for e in events)) == events


def test_single_event_message_decodes_to_one_event() -> None:
    wire = to_bytes(Click(event_id="c1", ts=5, impression_id="i1", user_id="u1", product_id="p1", creative_id="k1"))
    assert decode_message(wire) == [parse_event(wire)]


def _clicks(n: int) -> list[bytes]:
    return [
        to_bytes(Click(event_id=f"c{i}", ts=5 + i, impression_id="i1", user_id="u1", product_id="p1", creative_id="k"))
        for i in range(n)
    ]


def test_malformed_event_in_a_batch_is_rejected_alone_and_the_rest_is_kept() -> None:
    good = _clicks(4)
    bad_ts = json.dumps(json.loads(good[1]) | {"ts": "yesterday"}).encode()
    bad_type = json.dumps(json.loads(good[3]) | {"type": "view"}).encode()
    out = decode_message(encode_batch([good[0], bad_ts, good[2], bad_type]))
    assert [type(x).__name__ for x in out] == ["Click", "BadEvent", "Click", "BadEvent"]
    assert (out[1].index, out[1].error.field) == (1, "ts")
    assert (out[3].index, out[3].error.field) == (3, "type")
    assert json.loads(out[1].raw)["ts"] == "yesterday"
    assert [x.event_id for x in out if not isinstance(x, BadEvent)] == ["c0", "c2"]


def test_event_with_unsupported_schema_in_a_batch_is_rejected_alone() -> None:
    good = _clicks(2)
    out = decode_message(encode_batch([good[0], json.dumps(json.loads(good[1]) | {"schema": 9}).encode()]))
    assert isinstance(out[0], Click) and isinstance(out[1], BadEvent)
    assert out[1].error.field == "schema" and out[1].index == 1


def test_oversize_event_in_a_batch_is_rejected_alone() -> None:
    big = json.loads(_clicks(1)[0])
    big = to_bytes(Impression(
        event_id="big", ts=1, user_id="u", user={"bio": "x" * MAX_EVENT_BYTES}, product_id="p", category="c",
        product={}, creative_id="k", prompt=None, model_version="m", placement="feed",
    ))
    out = decode_message(encode_batch([*_clicks(2), big]))
    assert [isinstance(x, BadEvent) for x in out] == [False, False, True]
    assert out[2].error.field == "<event>" and "over the" in out[2].error.reason


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (encode_batch(_clicks(3))[:-5], "<event>"),  # truncated: not JSON
        (b'{"schema":1,"type":"batch","events":[' + b",".join(_clicks(2)) + b"]}", "schema"),
        (b'{"type":"batch","events":[' + b",".join(_clicks(2)) + b"]}", "schema"),
        (b'{"schema":2,"type":"batch","events":{}}', "events"),
        (b'{"schema":2,"type":"batch","events":[]}', "events"),
        (b'{"schema":2,"type":"batch","events":[],"more":1}', "more"),
    ],
)
def test_undecodable_batch_is_rejected_whole(data: bytes, field: str) -> None:
    out = decode_message(data)
    assert len(out) == 1 and isinstance(out[0], BadEvent)
    assert out[0].index is None and out[0].raw == data
    assert out[0].error.field == field and out[0].error.reason


def test_batch_over_the_event_count_limit_is_rejected_whole() -> None:
    data = encode_batch([b"{}"] * (MAX_BATCH_EVENTS + 1))
    out = decode_message(data)
    assert len(out) == 1 and out[0].error.field == "events" and str(MAX_BATCH_EVENTS) in out[0].error.reason


def test_batch_over_the_byte_limit_is_rejected_whole() -> None:
    out = decode_message(b" " * (MAX_BATCH_BYTES + 1))
    assert len(out) == 1 and out[0].error.field == "<message>" and "batch limit" in out[0].error.reason


def test_parse_events_names_the_event_of_the_batch() -> None:
    good = _clicks(3)
    data = encode_batch([good[0], good[1], json.dumps(json.loads(good[2]) | {"ts": -1}).encode()])
    with pytest.raises(EventError) as err:
        parse_events(data)
    assert err.value.field == "events[2].ts"
    assert parse_events(encode_batch(good[:2])) == [parse_event(g) for g in good[:2]]


@given(st.binary(max_size=300))
def test_decode_message_never_raises(data: bytes) -> None:
    out = decode_message(data)
    assert all(isinstance(x, (Impression, Click, BadEvent)) for x in out)


@given(st.lists(st.one_of(impressions, clicks), min_size=1, max_size=5), st.integers(0, 4), st.binary(max_size=30))
def test_any_garbage_element_in_a_batch_costs_only_itself(events: list, where: int, junk: bytes) -> None:
    raws = [to_bytes(e) for e in events]
    where = min(where, len(raws))
    element = json.dumps(junk.decode("latin-1")).encode()  # a JSON string: valid JSON, never an event
    out = decode_message(encode_batch([*raws[:where], element, *raws[where:]]))
    assert [x for x in out if not isinstance(x, BadEvent)] == events
    assert [x.index for x in out if isinstance(x, BadEvent)] == [where]
