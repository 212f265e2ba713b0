"""The learner's group features read from a real Feast store equal those derived from a log of the same events.

Stage 2 of the stream worker runs in process on simulated world-A traffic
(as in ``tests/features/test_feed.py``) and its feature feed pushes through
the real pusher into a SQLite Feast store; the log is every impression with
the group the stage assigned it, its prompt and its click.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from features.push import FeaturePusher, PushConfig
from features.read import FeatureReader
from features.rows import group_preferences_row, group_profile_row
from features.sink import FeastSink
from features.store import apply
from sim.judge import store_group_members
from sim.world import World
from learner.data import TrafficLog, TrafficRecord
from features.group import (
    ATTRIBUTE_VOCABULARY,
    PROBE_GAP,
    read_group_features,
    store_group_features,
)
from streams.aggregate import FeatureFeed
from tests.features.conftest import store_settings
from tests.features.test_feed import WORLD_A, _batches, _stage

T0 = 1_767_225_600_000_000  # 2026-01-01, epoch µs


class _Run:
    def __init__(self, reader: FeatureReader, pusher: FeaturePusher, log: TrafficLog, user_groups: dict[str, str]):
        self.reader, self.pusher, self.log, self.user_groups = reader, pusher, log, user_groups


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Run]:
    settings = store_settings(
        tmp_path_factory.mktemp("store-features"), "sqlite", f"t_{uuid.uuid4().hex[:10]}", embed_titles=False
    )
    apply(settings)
    pusher = FeaturePusher(FeastSink(settings), PushConfig(flush_s=0.02))
    pusher.start()
    stage = _stage()
    feed = FeatureFeed(stage, pusher.submit)
    shown = {}
    for impressions, batches in _batches(18_000, seed=3):  # drill splits (gender) at ~12k with EARLY_GROUPS
        feed.after_ingest(impressions)
        shown.update((imp.event_id, imp) for imp in impressions)
        for category, batch in batches.items():
            result = stage.apply(category, batch)
            feed.after_batch(category, result, stage.grouper(category).groups(category))
    assert pusher.flush(60), pusher.counters
    # Every impression, labelled as the stage counted it (the attribution window outlives the run).
    records = []
    for event_id, imp in shown.items():
        group, product, _, ts, clicked, category, _ = stage.stores.assigned[event_id]
        records.append(TrafficRecord(ts, imp.user_id, group, category, product, imp.prompt, bool(clicked)))
    users = {imp.user_id: dict(imp.user) for imp in shown.values()}
    reader = FeatureReader(settings)
    yield _Run(reader, pusher, TrafficLog({}, users, records), dict(stage.stores.user_groups))
    pusher.close()
    reader.close()


def test_store_features_equal_the_log_features_of_the_same_events(run: _Run) -> None:
    from_log = read_group_features(run.log)
    assert len({f.category for f in from_log.values()}) == 2 and len(from_log) >= 3, sorted(from_log)
    for group, expected in from_log.items():
        got = store_group_features(run.reader, [group])[group]  # one group asked: its category's others are found
        assert (got.group_id, got.category) == (expected.group_id, expected.category)
        assert (got.impressions, got.clicks) == (expected.impressions, expected.clicks)
        assert got.share == pytest.approx(expected.share, rel=1e-12)
        assert got.ctr == pytest.approx(expected.ctr)
        # The worker counts every attribute, style words included, under the learner's names.
        assert any(k.startswith("style=") for k in got.lifts), group
        assert set(got.lifts) == set(expected.lifts), group
        assert got.lifts == pytest.approx(expected.lifts, rel=1e-9)
        assert (got.likes, got.avoids) == (expected.likes, expected.avoids)
        assert got.product_lifts == {}
        if got.centroid:  # (a retired group's is empty)
            assert sum(v for k, v in got.centroid.items() if k.startswith("gender=")) == pytest.approx(1)
        assert set(got.who) <= set(got.centroid)

        text = got.to_text()
        parts = text.split(" | ")
        assert parts[0] == f"group {group}" and parts[1] == f"{round(100 * expected.share)}% of {expected.category}"
        assert parts[2] == f"ctr {100 * expected.ctr:.1f}%"
        assert parts[-2].startswith("likes ") and parts[-1].startswith("avoids ")
        assert len(parts) == 5 + bool(got.who) and "nan" not in text
        assert got.vector().shape == (2 + len(ATTRIBUTE_VOCABULARY),)

    shares = Counter()
    both = store_group_features(run.reader, sorted(from_log))
    assert set(both) == set(from_log)
    for features in both.values():
        shares[features.category] += features.share
    assert all(total == pytest.approx(1.0) for total in shares.values()), shares
    assert any(f.who for f in both.values()), "world A's groups differ by who is in them"


def test_worker_attribute_names_are_the_learner_vocabulary(run: _Run) -> None:
    groups = sorted({r.group_id for r in run.log.records})
    rows = run.reader.read_group_rows(groups)
    keys = {k for i in range(len(rows)) for k in rows.attribute_keys[i] or ()}
    assert keys and keys <= set(ATTRIBUTE_VOCABULARY), keys - set(ATTRIBUTE_VOCABULARY)
    assert {k.split("=")[0] for k in keys} == {"background", "primary", "secondary", "position", "scale", "copy",
                                               "style"}


def test_groups_missing_in_the_store_are_left_out(run: _Run) -> None:
    some = next(iter(sorted({r.group_id for r in run.log.records})))
    got = store_group_features(run.reader, [some, "lipstick/g999", "nowhere/g0", some])
    assert list(got) == [some]
    assert store_group_features(run.reader, ["nowhere/g0"]) == {}
    assert store_group_features(run.reader, []) == {}


def test_share_counts_every_group_of_the_category_the_store_knows(run: _Run) -> None:
    """Groups are found by id up to PROBE_GAP unknown ids past the last one; a group with only one of its rows is left out."""

    def push(group: str, impressions: int, clicks: int, profile: bool = True) -> None:
        if profile:
            centroid = {"age=old": 1.0} if group.endswith("g0") else {"age=young": 1.0}
            run.pusher.submit("group_profile", [group_profile_row(
                group, category="mugs", rule="all", member_count=3, weight=float(impressions), centroid=centroid)], T0)
        run.pusher.submit("group_creative_preferences", [group_preferences_row(
            group, prompts={}, attributes={"primary=pink": (impressions, clicks)}, impressions=impressions,
            clicks=clicks)], T0)

    push("mugs/g0", 300, 30)
    push("mugs/g2", 100, 1)
    push(f"mugs/g{2 + PROBE_GAP}", 600, 6)  # after PROBE_GAP - 1 unknown ids: found
    push(f"mugs/g{3 + 2 * PROBE_GAP}", 10_000, 10)  # after PROBE_GAP unknown ids: not looked for
    push("mugs/g1", 200, 2, profile=False)  # preferences only: counted in the total, not described
    assert run.pusher.flush(30), run.pusher.counters

    got = store_group_features(run.reader, ["mugs/g0", "mugs/g1"])
    assert list(got) == ["mugs/g0"]
    assert got["mugs/g0"].share == pytest.approx(300 / (300 + 200 + 100 + 600))
    assert got["mugs/g0"].who == ("age=old",)
    assert got["mugs/g0"].lifts == pytest.approx({"primary=pink": 1.0})


def test_store_group_members_count_each_users_stored_group(run: _Run) -> None:
    world = World.load(WORLD_A)
    expected: dict[str, Counter] = {}
    for category in world.categories:
        for user in world.users:
            group = run.user_groups.get(f"{category}|{user.id}")
            if group is not None:
                expected.setdefault(group, Counter())[world.segment_of(user, category).key] += 1
    got = store_group_members(world, run.reader)
    assert got == expected
    assert 0 < sum(sum(c.values()) for c in got.values()) < len(world.users) * len(world.categories)
