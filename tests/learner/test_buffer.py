"""Replay buffer and round history."""

from pathlib import Path

from learner.buffer import PairBuffer, TrainingTrigger
from learner.history import RoundRecord, append_round, read_rounds
from infra.contracts.messages import PreferencePair


def _pair(ts: int, group: str = "g", winner: str = "w", level: int = 0) -> PreferencePair:
    return PreferencePair(
        pair_id=f"{group}{winner}{level}", ts=ts, group_id=group, category="c", product_id="p",
        winner_creative_id=winner, loser_creative_id="l", winner_prompt="a", loser_prompt="b",
        winner_impressions=100, winner_clicks=9, loser_impressions=100, loser_clicks=1,
        winner_ctr=0.09, loser_ctr=0.01, prob_winner_better=0.99, evidence_level=level,
    )


def test_same_pair_is_kept_once_at_its_highest_evidence() -> None:
    buffer = PairBuffer()
    assert buffer.add(_pair(1))
    assert not buffer.add(_pair(2))  # same evidence again: nothing new
    assert buffer.add(_pair(3, level=1))
    assert len(buffer) == 1 and buffer.pairs()[0].evidence_level == 1


def test_capacity_drops_the_oldest() -> None:
    buffer = PairBuffer(capacity=2)
    for ts, winner in ((5, "a"), (1, "b"), (9, "c")):
        buffer.add(_pair(ts, winner=winner))
    assert [p.winner_creative_id for p in buffer.pairs()] == ["a", "c"]


def test_recency_weights_halve_per_half_life() -> None:
    buffer = PairBuffer(half_life_s=10)
    pairs = [_pair(0, winner="a"), _pair(10_000, winner="b")]
    assert buffer.recency_weights(pairs).tolist() == [0.5, 1.0]


def test_split_is_stable_and_trigger_counts_new_pairs() -> None:
    buffer = PairBuffer()
    for i in range(200):
        buffer.add(_pair(i, winner=f"w{i}"))
    train, held = buffer.split(0.2)
    assert 20 < len(held) < 60 and len(train) + len(held) == 200
    assert buffer.split(0.2)[1] == held
    assert buffer.should_train(TrainingTrigger(min_new_pairs=100), 0)
    buffer.mark_trained()
    assert not buffer.should_train(TrainingTrigger(min_new_pairs=100, max_wait_s=60), 30)
    buffer.add(_pair(500, winner="late"))
    assert buffer.should_train(TrainingTrigger(min_new_pairs=100, max_wait_s=60), 61)


def test_history_appends_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    record = RoundRecord(1, 0.0, (0, 1), {"g": 3}, 1, [0.7, 0.6], {"promote": True}, "promoted", 2, 1)
    append_round(path, record)
    with open(path, "a") as handle:
        handle.write('{"round": 2, "trunc')
    rounds = read_rounds(path)
    assert len(rounds) == 1 and rounds[0]["version"] == 2
