"""CreativeStats: the counts of one creative in one group."""

import doctest

import streams.ctr
from streams.ctr import CreativeStats


def test_doctests() -> None:
    assert doctest.testmod(streams.ctr).failed == 0


def test_ctr_has_no_division_by_zero() -> None:
    assert CreativeStats().ctr == 0.0
    assert CreativeStats(impressions=4, clicks=1).ctr == 0.25
