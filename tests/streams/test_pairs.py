"""Preference-pair mining: the P(A > B) test, thresholds, evidence levels, group-specific pairs.

Also the wire form of the messages the worker emits (PreferencePair, DeadLetter).
"""

import base64
import doctest
import json
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import infra.contracts.messages
import streams.pairs
from streams.ctr import CreativeStats
from infra.contracts.events import EventError
from infra.contracts.messages import (
    MAX_ORIGINAL_BYTES,
    DeadLetter,
    PreferencePair,
    pair_id,
    parse_dead_letter,
    parse_pair,
    to_bytes,
)
from streams.pairs import (
    EXACT_MAX_TERMS,
    PairMiner,
    PairMinerConfig,
    _decisive_prob,
    evidence_level,
    prob_ctr_greater,
)

PROMPT_A = 'background=dots; palette=red,white; position=center; scale=0.5; copy=""; style='
PROMPT_B = 'background=solid; palette=navy,beige; position=left; scale=0.7; copy="Sale"; style=luxury'
PROMPT_C = 'background=stripes; palette=green,white; position=right; scale=0.6; copy="New"; style=bold'


def test_doctests() -> None:
    assert doctest.testmod(streams.pairs).failed == 0
    assert doctest.testmod(infra.contracts.messages).failed == 0


# --- P(CTR_A > CTR_B) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0, 0, 0, 0), 0.5),  # two uniforms
        ((1, 1, 0, 0), 2 / 3),  # Beta(2, 1) vs uniform: E[X] = 2/3
        ((0, 1, 0, 0), 1 / 3),  # Beta(1, 2) vs uniform
        ((9, 9, 0, 0), 10 / 11),  # Beta(a, 1) vs uniform: a / (a + 1)
        ((0, 0, 0, 9), 10 / 11),  # uniform vs Beta(1, 10): 1 - 1/11
        ((7, 200, 7, 200), 0.5),  # same counts
        ((70, 2000, 70, 2000), 0.5),
        ((700, 20_000, 700, 20_000), 0.5),  # Edgeworth branch
    ],
)
def test_known_values(args: tuple[int, int, int, int], expected: float) -> None:
    assert prob_ctr_greater(*args) == pytest.approx(expected, abs=1e-12)


CASES = [
    (3, 100, 0, 100),  # few clicks: normal approximation would be off by 0.03
    (0, 2500, 0, 140),  # no clicks at all: normal approximation off by 0.12
    (1, 150, 9, 120),
    (20, 1000, 35, 1000),
    (95, 100, 80, 100),  # high CTR: sums over the non-clicks
    (80, 100, 95, 100),
    (150, 3000, 120, 3000),  # numpy path of the exact sum
    (200, 10_000, 240, 10_000),
    (200, 10_000, 7_500, 375_000),  # exact sum, many clicks on the other side
    (400, 1_000_000, 5_000, 1_000_000),
    (300, 10_000, 350, 10_000),  # Edgeworth branch
    (2_000, 100_000, 2_100, 100_000),
]


@pytest.mark.parametrize("case", CASES)
def test_agrees_with_monte_carlo(case: tuple[int, int, int, int]) -> None:
    ca, ia, cb, ib = case
    rng = np.random.default_rng(12345)
    draws = 400_000
    x = rng.beta(1 + ca, 1 + ia - ca, draws)
    y = rng.beta(1 + cb, 1 + ib - cb, draws)
    estimate = float((x > y).mean())
    p = prob_ctr_greater(*case)
    sigma = max((p * (1 - p) / draws) ** 0.5, 1e-6)
    assert abs(p - estimate) < 5 * sigma + 1e-6


@pytest.mark.parametrize("case", CASES)
def test_agrees_with_numerical_integration(case: tuple[int, int, int, int]) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    integrate = pytest.importorskip("scipy.integrate")
    ca, ia, cb, ib = case
    a, b = scipy_stats.beta(1 + ca, 1 + ia - ca), scipy_stats.beta(1 + cb, 1 + ib - cb)
    # P(X_A > X_B) = integral of pdf_A * cdf_B, over where pdf_A has its mass.
    lo, hi = a.ppf(1e-13), a.isf(1e-13)
    reference, _ = integrate.quad(lambda t: a.pdf(t) * b.cdf(t), lo, hi, epsabs=1e-13, epsrel=1e-11, limit=200)
    exact = min(1 + ca, 1 + ia - ca, 1 + cb, 1 + ib - cb) <= EXACT_MAX_TERMS
    assert prob_ctr_greater(*case) == pytest.approx(reference, abs=1e-9 if exact else 3e-4)


@given(st.integers(0, 3_000), st.integers(0, 3_000), st.integers(0, 3_000), st.integers(0, 3_000))
def test_complement_and_range(n_a: int, c_a: int, n_b: int, c_b: int) -> None:
    c_a, c_b = min(c_a, n_a), min(c_b, n_b)
    p = prob_ctr_greater(c_a, n_a, c_b, n_b)
    assert 0.0 <= p <= 1.0
    assert p + prob_ctr_greater(c_b, n_b, c_a, n_a) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "case",
    [
        (50, 1_000_000, 5_000, 1_000_000),  # first term of the sum below the float range
        (90, 1_000_000, 100_000, 200_000),  # terms grow past 1e250 before they are scaled
        (200, 1_000_000, 100_000, 200_000),  # the same on the numpy path
        (1_000_000, 1_000_000, 0, 1_000_000),
    ],
)
def test_extreme_counts_stay_finite(case: tuple[int, int, int, int]) -> None:
    ca, ia, cb, ib = case
    p, q = prob_ctr_greater(ca, ia, cb, ib), prob_ctr_greater(cb, ib, ca, ia)
    assert 0.0 <= p <= 1.0 and 0.0 <= q <= 1.0
    assert p + q == pytest.approx(1.0)
    assert (p > 0.5) == (ca / ia > cb / ib)


@given(
    st.integers(100, 50_000),
    st.floats(0.0, 0.2),
    st.integers(100, 50_000),
    st.floats(0.5, 1.5),
    st.sampled_from([0.9, 0.95, 0.99]),
)
def test_the_screen_never_hides_a_decisive_pair(n_a: int, ctr: float, n_b: int, ratio: float, conf: float) -> None:
    c_a, c_b = int(n_a * ctr), min(n_b, int(n_b * ctr * ratio))
    exact = prob_ctr_greater(c_a, n_a, c_b, n_b)
    screened = _decisive_prob(c_a, n_a, c_b, n_b, conf)
    if screened is None:
        assert 1 - conf < exact < conf
    else:
        assert screened == exact


def test_monotone_in_clicks() -> None:
    values = [prob_ctr_greater(c, 1_000, 30, 1_000) for c in range(0, 80, 5)]
    assert values == sorted(values)


def test_clicks_are_clipped_to_impressions() -> None:
    assert prob_ctr_greater(150, 100, 3, 100) == prob_ctr_greater(100, 100, 3, 100)
    assert prob_ctr_greater(-1, 100, 3, 100) == prob_ctr_greater(0, 100, 3, 100)


def test_evidence_level() -> None:
    assert [evidence_level(n, 10**6, 100) for n in (99, 100, 199, 200, 399, 400, 1_600)] == [-1, 0, 0, 1, 1, 2, 4]
    assert evidence_level(10**6, 250, 100) == 1


# --- mining ---------------------------------------------------------------------------------------


def _slate(*rows: tuple[str, int, int, str | None]) -> dict[str, tuple[CreativeStats, str | None]]:
    return {creative: (CreativeStats(impressions, clicks), prompt) for creative, impressions, clicks, prompt in rows}


def test_emits_a_pair_when_the_winner_is_clear() -> None:
    miner = PairMiner()
    creatives = _slate(("a", 1_000, 60, PROMPT_A), ("b", 1_000, 20, PROMPT_B))
    (pair,) = miner.mine("g1", "lipstick", "p1", creatives, ts=42)
    assert (pair.winner_creative_id, pair.loser_creative_id) == ("a", "b")
    assert (pair.winner_prompt, pair.loser_prompt) == (PROMPT_A, PROMPT_B)
    counts = (pair.winner_impressions, pair.winner_clicks, pair.loser_impressions, pair.loser_clicks)
    assert counts == (1000, 60, 1000, 20)
    assert (pair.winner_ctr, pair.loser_ctr) == (0.06, 0.02)
    assert pair.prob_winner_better == pytest.approx(prob_ctr_greater(60, 1_000, 20, 1_000))
    assert pair.prob_winner_better > 0.999
    assert pair.evidence_level == 3  # 1000 // 100 = 10 -> floor(log2 10) = 3
    assert pair.pair_id == pair_id("g1", "p1", "a", "b", 3)
    assert (pair.ts, pair.group_id, pair.category, pair.product_id) == (42, "g1", "lipstick", "p1")


def test_confidence_threshold() -> None:
    # P(A > B) is about 0.93 here: no pair at 0.95, a pair at 0.9.
    creatives = _slate(("a", 500, 18, PROMPT_A), ("b", 500, 10, PROMPT_B))
    p = prob_ctr_greater(18, 500, 10, 500)
    assert 0.9 < p < 0.95
    assert PairMiner(PairMinerConfig(confidence=0.95)).mine("g", "c", "p", creatives, ts=0) == []
    (pair,) = PairMiner(PairMinerConfig(confidence=0.9)).mine("g", "c", "p", creatives, ts=0)
    assert pair.winner_creative_id == "a"


def test_loser_first_in_the_mapping_still_loses() -> None:
    creatives = _slate(("a", 1_000, 5, PROMPT_A), ("b", 1_000, 40, PROMPT_B))
    (pair,) = PairMiner().mine("g", "c", "p", creatives, ts=0)
    assert (pair.winner_creative_id, pair.loser_creative_id) == ("b", "a")


def test_needs_min_impressions_on_both_sides() -> None:
    miner = PairMiner(PairMinerConfig(min_impressions=100))
    assert miner.mine("g", "c", "p", _slate(("a", 5_000, 500, PROMPT_A), ("b", 99, 0, PROMPT_B)), ts=0) == []
    assert len(miner.mine("g", "c", "p", _slate(("a", 5_000, 500, PROMPT_A), ("b", 100, 0, PROMPT_B)), ts=0)) == 1


def test_creatives_without_a_prompt_or_with_the_same_prompt_are_skipped() -> None:
    miner = PairMiner()
    creatives = _slate(
        ("a", 1_000, 80, None), ("e", 1_000, 80, ""), ("b", 1_000, 10, PROMPT_B), ("c", 1_000, 90, PROMPT_B)
    )
    assert miner.mine("g", "c", "p", creatives, ts=0) == []


def test_once_per_evidence_level_then_again_when_evidence_doubles() -> None:
    miner = PairMiner(PairMinerConfig(min_impressions=100))
    first = miner.mine("g", "c", "p", _slate(("a", 120, 15, PROMPT_A), ("b", 130, 1, PROMPT_B)), ts=0)
    assert [p.evidence_level for p in first] == [0]
    # More evidence inside the same level: nothing new.
    assert miner.mine("g", "c", "p", _slate(("a", 190, 22, PROMPT_A), ("b", 199, 2, PROMPT_B)), ts=1) == []
    # The smaller side doubles: level 1, a new pair id.
    second = miner.mine("g", "c", "p", _slate(("a", 250, 30, PROMPT_A), ("b", 200, 2, PROMPT_B)), ts=2)
    assert [p.evidence_level for p in second] == [1]
    assert second[0].pair_id != first[0].pair_id
    assert miner.emitted_level("g", "p", "a", "b") == 1
    # A jump over several levels emits only the reached one.
    third = miner.mine("g", "c", "p", _slate(("a", 2_000, 240, PROMPT_A), ("b", 1_700, 17, PROMPT_B)), ts=3)
    assert [p.evidence_level for p in third] == [4]


def test_a_flip_emits_the_new_winner() -> None:
    miner = PairMiner()
    (before,) = miner.mine("g", "c", "p", _slate(("a", 400, 24, PROMPT_A), ("b", 400, 6, PROMPT_B)), ts=0)
    assert (before.winner_creative_id, before.evidence_level) == ("a", 2)
    assert miner.mine("g", "c", "p", _slate(("a", 500, 24, PROMPT_A), ("b", 500, 9, PROMPT_B)), ts=1) == []
    # b catches up and overtakes, still at level 2.
    (after,) = miner.mine("g", "c", "p", _slate(("a", 700, 25, PROMPT_A), ("b", 700, 60, PROMPT_B)), ts=2)
    assert (after.winner_creative_id, after.loser_creative_id, after.evidence_level) == ("b", "a", 2)
    assert miner.mine("g", "c", "p", _slate(("a", 750, 25, PROMPT_A), ("b", 750, 64, PROMPT_B)), ts=3) == []


def test_the_same_prompts_form_opposite_pairs_in_two_groups() -> None:
    miner = PairMiner()
    young = miner.mine("young", "lipstick", "p1", _slate(("a", 2_000, 140, PROMPT_A), ("b", 2_000, 60, PROMPT_B)), 0)
    older = miner.mine("older", "lipstick", "p1", _slate(("a", 2_000, 50, PROMPT_A), ("b", 2_000, 130, PROMPT_B)), 0)
    assert [(p.group_id, p.winner_prompt, p.loser_prompt) for p in young] == [("young", PROMPT_A, PROMPT_B)]
    assert [(p.group_id, p.winner_prompt, p.loser_prompt) for p in older] == [("older", PROMPT_B, PROMPT_A)]
    assert young[0].pair_id != older[0].pair_id


def test_at_most_max_pairs_per_check_most_confident_first() -> None:
    miner = PairMiner(PairMinerConfig(max_pairs_per_check=2))
    prompts = [PROMPT_A, PROMPT_B, PROMPT_C]
    creatives = _slate(*((f"c{i}", 3_000, 30 + 90 * i, prompts[i]) for i in range(3)))
    first = miner.mine("g", "c", "p", creatives, ts=0)
    assert len(first) == 2
    assert first[0].prob_winner_better >= first[1].prob_winner_better
    rest = miner.mine("g", "c", "p", creatives, ts=1)
    assert len(rest) == 1
    assert {(p.winner_creative_id, p.loser_creative_id) for p in first + rest} == {
        ("c2", "c1"),
        ("c2", "c0"),
        ("c1", "c0"),
    }
    assert miner.mine("g", "c", "p", creatives, ts=2) == []


def test_remembered_keys_are_bounded() -> None:
    miner = PairMiner(PairMinerConfig(max_tracked=3))
    creatives = _slate(("a", 1_000, 60, PROMPT_A), ("b", 1_000, 20, PROMPT_B))
    for g in range(10):
        assert len(miner.mine(f"g{g}", "c", "p", creatives, ts=g)) == 1
        assert len(miner) <= 3
    # The oldest are forgotten (and would be re-sent with the same pair id); the newest are remembered.
    assert miner.emitted_level("g0", "p", "a", "b") == -1
    assert miner.emitted_level("g9", "p", "a", "b") == 3
    (again,) = miner.mine("g0", "c", "p", creatives, ts=11)
    assert again.pair_id == pair_id("g0", "p", "a", "b", 3)


def test_state_pickles() -> None:
    miner = PairMiner(PairMinerConfig(min_impressions=50))
    creatives = _slate(("a", 1_000, 60, PROMPT_A), ("b", 1_000, 20, PROMPT_B))
    assert len(miner.mine("g", "c", "p", creatives, ts=0)) == 1
    restored = pickle.loads(pickle.dumps(miner))
    assert restored.config == miner.config
    assert restored.mine("g", "c", "p", creatives, ts=1) == []


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="confidence"):
        PairMinerConfig(confidence=0.4)
    with pytest.raises(ValueError, match="min_impressions"):
        PairMinerConfig(min_impressions=0)


# --- wire form ------------------------------------------------------------------------------------


def _pair(**changes: object) -> PreferencePair:
    fields: dict = {
        "pair_id": pair_id("g", "p", "a", "b", 0),
        "ts": 1,
        "group_id": "g",
        "category": "lipstick",
        "product_id": "p",
        "winner_creative_id": "a",
        "loser_creative_id": "b",
        "winner_prompt": PROMPT_A,
        "loser_prompt": PROMPT_B,
        "winner_impressions": 100,
        "winner_clicks": 9,
        "loser_impressions": 120,
        "loser_clicks": 1,
        "winner_ctr": 0.09,
        "loser_ctr": 1 / 120,
        "prob_winner_better": 0.99,
        "evidence_level": 0,
    }
    return PreferencePair(**{**fields, **changes})


def test_mined_pairs_round_trip() -> None:
    creatives = _slate(("a", 1_000, 60, PROMPT_A), ("b", 1_000, 20, PROMPT_B))
    for pair in PairMiner().mine("g", "c", "p", creatives, ts=0):
        assert parse_pair(to_bytes(pair)) == pair


def test_pair_wire_form() -> None:
    wire = json.loads(to_bytes(_pair()))
    assert wire["schema"] == 1 and wire["winner_prompt"] == PROMPT_A
    wire["schema"] = 2
    with pytest.raises(EventError, match="schema"):
        parse_pair(json.dumps(wire).encode())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"extra": 1}, "extra"),
        ({"winner_clicks": -1}, "winner_clicks"),
        ({"prob_winner_better": 1.5}, "prob_winner_better"),
        ({"evidence_level": "1"}, "evidence_level"),
        ({"winner_clicks": 101}, "<event>"),  # more clicks than impressions
        ({"loser_creative_id": "a"}, "<event>"),  # winner == loser
    ],
)
def test_bad_pairs_name_the_field(change: dict, field: str) -> None:
    wire = json.loads(to_bytes(_pair()))
    wire.update(change)
    with pytest.raises(EventError) as info:
        parse_pair(json.dumps(wire).encode())
    assert info.value.field == field


def test_pair_ids_are_deterministic_and_distinct() -> None:
    assert pair_id("g", "p", "a", "b", 1) == pair_id("g", "p", "a", "b", 1)
    ids = {pair_id("g", "p", "a", "b", 1), pair_id("g", "p", "b", "a", 1), pair_id("g", "p", "a", "b", 2)}
    ids |= {pair_id("g", "pa", "", "b", 1), pair_id("gp", "", "a", "b", 1)}
    assert len(ids) == 5


@given(st.binary(max_size=2_000), st.text(max_size=100), st.integers(0, 2**31), st.integers(0, 2**62))
def test_dead_letters_round_trip(original: bytes, reason: str, partition: int, offset: int) -> None:
    letter = DeadLetter(
        ts=7, source_topic="osmf.impressions", partition=partition, offset=offset, reason=reason, original=original
    )
    data = to_bytes(letter)
    assert parse_dead_letter(data) == letter
    assert base64.b64decode(json.loads(data)["original"], validate=True) == original  # standard base64


def test_dead_letter_from_an_event_error() -> None:
    error = EventError("ts", "missing; this field is required")
    letter = DeadLetter.from_error(error, b'{"type": "click"}', source_topic="osmf.clicks", partition=2, offset=9, ts=5)
    assert (letter.field, letter.reason, letter.original) == ("ts", error.reason, b'{"type": "click"}')
    big = DeadLetter.from_error(error, b"x" * (MAX_ORIGINAL_BYTES + 10), source_topic="t", partition=0, offset=0, ts=0)
    assert big.original == b"x" * MAX_ORIGINAL_BYTES and "cut" in big.reason
    assert parse_dead_letter(to_bytes(big)) == big


def test_dead_letter_rejects_bad_base64() -> None:
    wire = json.loads(to_bytes(DeadLetter(ts=1, source_topic="t", partition=0, offset=0, reason="r", original=b"ab")))
    wire["original"] = "not base64!"
    with pytest.raises(EventError) as info:
        parse_dead_letter(json.dumps(wire).encode())
    assert info.value.field == "original"
