"""training_frame joins each training row with the features as they were then: no future leakage."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from features.read import FeatureReader, FeatureReadError
from features.rows import group_preferences_row, group_profile_row
from features.sink import FeastSink
from features.store import apply

from .conftest import store_settings

T = datetime(2026, 1, 1, 10, 0, tzinfo=timezone.utc)


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _prefs(group: str, impressions: int, clicks: int) -> dict:
    return group_preferences_row(group, prompts={"p": (impressions, clicks)}, attributes={})


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory):
    """Group g1's CTR was 1% at 10:00 and 5% at 10:10; two updates arrive late, after the 10:10 one."""
    settings = store_settings(tmp_path_factory.mktemp("pit"), "sqlite", "pit", embed_titles=False)
    apply(settings)
    sink = FeastSink(settings)
    sink.open()
    written = 0

    def push(view: str, row: dict, at: datetime) -> None:
        nonlocal written
        written += 1
        sink.push(view, [row], [_us(at)], _us(T) + written)  # created: the order of writing

    push("group_creative_preferences", _prefs("lipstick/g1", 100, 1), T)
    push("group_profile", group_profile_row("lipstick/g1", category="lipstick", rule="all", member_count=10,
                                            weight=1.0, centroid={"a=1": 1.0}), T)
    push("group_creative_preferences", _prefs("lipstick/g1", 200, 10), T + timedelta(minutes=10))
    push("group_creative_preferences", _prefs("lipstick/g1", 150, 3), T + timedelta(minutes=4))  # late
    push("group_creative_preferences", _prefs("lipstick/g1", 160, 4), T + timedelta(minutes=6))  # late, future of 10:05
    push("group_creative_preferences", _prefs("lipstick/g2", 50, 5), T + timedelta(minutes=1))
    sink.close()  # writes the parquet history
    return settings


def test_each_row_gets_the_latest_value_at_or_before_its_time(history) -> None:
    entities = pd.DataFrame(
        {
            "group_id": ["lipstick/g1", "lipstick/g1", "lipstick/g1", "lipstick/g1", "lipstick/g2", "lipstick/g9"],
            "event_timestamp": [T - timedelta(minutes=5), T + timedelta(minutes=5), T + timedelta(minutes=7),
                                T + timedelta(minutes=15), T + timedelta(minutes=5), T + timedelta(minutes=5)],
            "label": [0, 1, 2, 3, 4, 5],
        }
    )
    frame = FeatureReader(history).training_frame(T - timedelta(hours=1), T + timedelta(hours=1), entities)
    assert frame["label"].tolist() == [0, 1, 2, 3, 4, 5], "rows keep their order and their own columns"
    impressions = frame["group_creative_preferences__impressions"].tolist()
    # 09:55: nothing yet (explicitly missing); 10:05: the late 10:04 value, not the 10:06 or 10:10 ones;
    # 10:07: the late 10:06 value; 10:15: the 10:10 value, which the late writes did not replace.
    assert pd.isna(impressions[0]) and impressions[1:4] == [150, 160, 200]
    assert frame["group_creative_preferences__found"].tolist() == [False, True, True, True, True, False]
    assert frame["group_profile__member_count"].tolist()[1:4] == [10, 10, 10]
    assert frame["group_profile__found"].tolist() == [False, True, True, True, False, False]
    assert frame["group_creative_preferences__ctr"].tolist()[4] == 0.1


def test_rows_outside_the_window_are_left_out(history) -> None:
    entities = pd.DataFrame({"group_id": ["lipstick/g1"] * 3,
                             "event_timestamp": [T, T + timedelta(minutes=5), T + timedelta(minutes=30)]})
    frame = FeatureReader(history).training_frame(T + timedelta(minutes=1), T + timedelta(minutes=30), entities)
    assert frame["event_timestamp"].tolist() == [pd.Timestamp(T + timedelta(minutes=5))]


def test_the_default_rows_are_the_recorded_updates(history) -> None:
    frame = FeatureReader(history).training_frame(T, T + timedelta(minutes=8))
    got = list(zip(frame["group_id"], frame["event_timestamp"].dt.strftime("%H:%M"),
                   frame["group_creative_preferences__impressions"]))
    assert got == [("lipstick/g1", "10:00", 100), ("lipstick/g2", "10:01", 50), ("lipstick/g1", "10:04", 150),
                   ("lipstick/g1", "10:06", 160)]


def test_bad_arguments_name_the_fix(history) -> None:
    reader = FeatureReader(history)
    with pytest.raises(FeatureReadError, match="end .* must be after start"):
        reader.training_frame(T, T)
    with pytest.raises(FeatureReadError, match=r"entities: missing column\(s\) \['event_timestamp'\]"):
        reader.training_frame(T, T + timedelta(hours=1), pd.DataFrame({"group_id": ["g"]}))
    with pytest.raises(FeatureReadError, match="start: must be a datetime"):
        reader.training_frame("2026-01-01", T)
