"""CTR counters: counting, merge exactness, export, pickling."""

import doctest
import pickle
import random

import streams.ctr
from streams.ctr import CreativeStats, CtrBook


def test_doctests() -> None:
    assert doctest.testmod(streams.ctr).failed == 0


def test_ctr_has_no_division_by_zero() -> None:
    assert CreativeStats().ctr == 0.0
    assert CreativeStats(impressions=4, clicks=1).ctr == 0.25


def test_counts_by_creative_and_by_attribute() -> None:
    book = CtrBook()
    attrs = {"background": "dots", "copy": "yes"}
    for _ in range(3):
        book.record_impression("g1", "p1", "c1", attrs)
    book.record_click("g1", "p1", "c1", attrs)
    book.record_impression("g1", "p1", "c2", {"background": "solid"})
    book.record_impression("g2", "p1", "c1")  # no attributes: creative row only
    assert book.creatives("g1", "p1") == {"c1": CreativeStats(3, 1), "c2": CreativeStats(1, 0)}
    assert book.creatives("g2", "p1") == {"c1": CreativeStats(1, 0)}
    assert book.creatives("g3", "p1") == {}
    assert book.attributes("g1") == {
        ("background", "dots"): CreativeStats(3, 1),
        ("copy", "yes"): CreativeStats(3, 1),
        ("background", "solid"): CreativeStats(1, 0),
    }
    assert book.attributes("g2") == {}
    assert len(book) == 3


def test_creatives_returns_a_new_dict() -> None:
    book = CtrBook()
    book.record_impression("g", "p", "c")
    book.creatives("g", "p").clear()
    assert book.creatives("g", "p") == {"c": CreativeStats(1, 0)}


def _random_events(rng: random.Random, n: int) -> list[tuple[str, str, str, str, dict[str, str]]]:
    events = []
    for _ in range(n):
        kind = "click" if rng.random() < 0.3 else "impression"
        attrs = {"background": rng.choice(["dots", "solid"]), "position": rng.choice(["left", "center"])}
        events.append((kind, f"g{rng.randrange(4)}", f"p{rng.randrange(3)}", f"c{rng.randrange(5)}", attrs))
    return events


def _count(book: CtrBook, events: list) -> None:
    for kind, group, product, creative, attrs in events:
        if kind == "click":
            book.record_click(group, product, creative, attrs)
        else:
            book.record_impression(group, product, creative, attrs)


def test_merging_micro_batches_equals_counting_everything_once() -> None:
    rng = random.Random(0)
    events = _random_events(rng, 5_000)
    whole, merged = CtrBook(), CtrBook()
    _count(whole, events)
    for start in range(0, len(events), 137):
        delta = CtrBook()
        _count(delta, events[start : start + 137])
        merged.merge(delta)
    assert dict(merged.items()) == dict(whole.items())
    assert dict(merged.attribute_items()) == dict(whole.attribute_items())
    assert sum(s.impressions for _, s in merged.items()) == sum(e[0] == "impression" for e in events)
    assert sum(s.clicks for _, s in merged.items()) == sum(e[0] == "click" for e in events)


def test_merge_does_not_share_counters_with_the_delta() -> None:
    total, delta = CtrBook(), CtrBook()
    delta.record_impression("g", "p", "c", {"copy": "none"})
    total.merge(delta)
    delta.record_impression("g", "p", "c", {"copy": "none"})
    delta.record_click("g", "p", "c", {"copy": "none"})
    assert total.creatives("g", "p") == {"c": CreativeStats(1, 0)}
    assert total.attributes("g") == {("copy", "none"): CreativeStats(1, 0)}
    total.merge(delta)
    assert total.creatives("g", "p") == {"c": CreativeStats(3, 1)}
    assert delta.creatives("g", "p") == {"c": CreativeStats(2, 1)}


def test_export_rows() -> None:
    book = CtrBook()
    book.record_impression("g", "p", "c", {"copy": "yes"})
    book.record_click("g", "p", "c", {"copy": "yes"})
    assert list(book.items()) == [(("g", "p", "c"), CreativeStats(1, 1))]
    assert list(book.attribute_items()) == [(("g", "copy", "yes"), CreativeStats(1, 1))]


def test_pickle_round_trip() -> None:
    book = CtrBook()
    _count(book, _random_events(random.Random(1), 500))
    copy = pickle.loads(pickle.dumps(book))
    assert dict(copy.items()) == dict(book.items())
    assert dict(copy.attribute_items()) == dict(book.attribute_items())
    copy.record_impression("g0", "p0", "c0")
    assert copy.creatives("g0", "p0")["c0"].impressions == book.creatives("g0", "p0")["c0"].impressions + 1
