"""The feature feed of stage 2, in process: rows equal the stage's tables after every batch."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from features.rows import group_preferences_from_tables, group_preferences_row, product_row
from features.schema import VIEWS, validate_row
from sim.simulate import generate_events
from sim.world import World
from streams.aggregate import AggregateConfig, AggregateStage, AggregateStores, FeatureFeed, OutcomeBatch
from streams.drift import DriftMonitor
from infra.contracts.events import Impression
from streams.grouping import GroupingConfig, ProductAwareGrouper
from streams.pairs import PairMiner, PairMinerConfig

WORLD_A = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml"


class Online:
    """A fake online store: latest row per key, and every stamp seen per view and key."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[tuple, dict]] = defaultdict(dict)
        self.stamps: dict[tuple[str, tuple], list[int]] = defaultdict(list)

    def submit(self, view: str, rows: list[dict], event_us: int) -> int:
        schema = VIEWS[view]
        for row in rows:
            validate_row(view, row)
            key = schema.key_of(row)
            self.rows[view][key] = row
            self.stamps[(view, key)].append(event_us)
        return len(rows)


EARLY_GROUPS = GroupingConfig(max_groups=8, taste_alpha=1.0, recluster_every=1000, recluster_budget=5000.0)
"""Grouping for the feature tests, which need several groups from a short stream: the taste gate is off
(``taste_alpha=1``, as ``streams.grouping_taste_alpha=1`` sets it in the worker), so world A's drill buyers
split by gender on their click level, and macro steps come often (every 1,000 drill impressions, a large
work budget), so they split within ~12k impressions on the seeds used here. With the default gate and budget
they split only once tastes differ significantly (50-100k impressions); tests/streams/test_grouping*.py
cover that."""


def _stage() -> AggregateStage:
    stores = AggregateStores(assigned={}, ctr={}, attr_ctr={}, user_groups={}, grouping={}, group_profiles={})
    return AggregateStage(
        AggregateConfig(),
        stores,
        new_grouper=lambda: ProductAwareGrouper(EARLY_GROUPS),
        miner=PairMiner(PairMinerConfig()),
        drift=DriftMonitor(),
    )


def _batches(n_impressions: int, seed: int, size: int = 300):
    world = World.load(WORLD_A)
    events = list(generate_events(world, seed=seed, n_impressions=n_impressions, start_ts_ms=1_767_225_600_000))
    category_of: dict[str, str] = {}
    impressions = [e for e in events if isinstance(e, Impression)]
    for start in range(0, len(events), size):
        batches: dict[str, OutcomeBatch] = defaultdict(OutcomeBatch)
        chunk = events[start : start + size]
        for event in chunk:
            if isinstance(event, Impression):
                category_of[event.event_id] = event.category
                batches[event.category].impressions.append(
                    [event.event_id, event.user_id, event.user, event.product_id, event.creative_id, event.prompt,
                     event.ts]
                )
            elif event.impression_id in category_of:
                batches[category_of[event.impression_id]].clicks.append([event.impression_id, event.ts])
        yield [e for e in chunk if isinstance(e, Impression)], batches
    assert impressions


def _check_equal(stage: AggregateStage, online: Online) -> None:
    stores = stage.stores
    members = Counter(stores.user_groups.values())
    by_group: dict[str, dict] = defaultdict(dict)
    for key, row in stores.ctr.items():
        group, product = key.split("|", 1)
        by_group[group][product] = row
    for category in stage._groupers:  # noqa: SLF001 - the test looks at every category the stage knows
        live = stage.grouper(category).groups(category)
        for info in live:
            row = online.rows["group_profile"][(info.id,)]
            assert row["rule"] == info.rule and row["weight"] == info.weight
            assert dict(zip(row["centroid_keys"], row["centroid"])) == info.centroid
            assert row["member_count"] == members.get(info.id, 0)
            assert stores.group_profiles[category][info.id]["member_count"] == row["member_count"]
    for group in by_group:
        expected = group_preferences_from_tables(group, by_group[group], stores.attr_ctr.get(group), top_k=5)
        assert online.rows["group_creative_preferences"][(group,)] == expected
    for key, group in stores.user_groups.items():
        category, user = key.split("|", 1)
        assert online.rows["user_group"][(user, category)]["group_id"] == group


def test_rows_equal_a_recomputation_from_the_tables_after_every_batch() -> None:
    stage = _stage()
    online = Online()
    feed = FeatureFeed(stage, online.submit, top_prompts=5)
    for i, (impressions, batches) in enumerate(_batches(20_000, seed=5)):
        feed.after_ingest(impressions)
        for category, batch in batches.items():
            result = stage.apply(category, batch)
            feed.after_batch(category, result, stage.grouper(category).groups(category))
        if i % 25 == 0:
            _check_equal(stage, online)
    _check_equal(stage, online)
    assert len(online.rows["group_profile"]) >= 3, "world A splits drill buyers by gender by now"
    moved = [k for k, stamps in online.stamps.items() if k[0] == "user_group" and len(stamps) > 1]
    assert moved, "reclustering moved some users to a new group"
    products = online.rows["product_profile"]
    assert len(products) == 22 and all(r["title"] and r["price"] > 0 for r in products.values())
    for (view, key), stamps in online.stamps.items():
        if view != "product_profile":
            assert stamps == sorted(set(stamps)), f"{view} {key}: stamps must strictly increase"


def test_a_rebuilt_feed_continues_exactly_and_resends_every_group() -> None:
    stage = _stage()
    online = Online()
    feed = FeatureFeed(stage, online.submit)
    batches = list(_batches(3000, seed=9))
    for impressions, by_category in batches[:6]:
        for category, batch in by_category.items():
            feed.after_batch(category, stage.apply(category, batch), stage.grouper(category).groups(category))
    restarted = Online()
    feed = FeatureFeed(stage, restarted.submit)  # as after recovery: state rebuilt from the tables
    for impressions, by_category in batches[6:]:
        for category, batch in by_category.items():
            feed.after_batch(category, stage.apply(category, batch), stage.grouper(category).groups(category))
    online.rows["user_group"].update(restarted.rows["user_group"])
    for view in ("group_profile", "group_creative_preferences"):
        online.rows[view].update(restarted.rows[view])
    _check_equal(stage, online)
    groups_with_counts = {k.split("|")[0] for k in stage.stores.ctr}
    assert {k[0] for k in restarted.rows["group_creative_preferences"]} == groups_with_counts


def test_stamps_increase_even_when_event_time_does_not() -> None:
    stage = _stage()
    online = Online()
    feed = FeatureFeed(stage, online.submit)
    imp = ["e1", "u1", {"age": "x"}, "p1", "c1", None, 1000]
    for batch in (OutcomeBatch(impressions=[imp]), OutcomeBatch(clicks=[["e1", 900]])):
        feed.after_batch("mugs", stage.apply("mugs", batch), stage.grouper("mugs").groups("mugs"))
    stamps = online.stamps[("group_creative_preferences", ("mugs/g0",))]
    assert stamps == [1_000_000, 1_000_001]
    assert online.rows["group_creative_preferences"][("mugs/g0",)]["clicks"] == 1


def test_users_of_a_retired_group_keep_it_until_they_return() -> None:
    stage = _stage()
    online = Online()
    feed = FeatureFeed(stage, online.submit)
    stage.stores.user_groups["mugs|u9"] = "mugs/g7"  # a group the grouper no longer has
    feed.rebuild()
    imp = ["e1", "u1", {"age": "x"}, "p1", "c1", None, 1000]
    feed.after_batch("mugs", stage.apply("mugs", OutcomeBatch(impressions=[imp])), stage.grouper("mugs").groups("mugs"))
    retired = online.rows["group_profile"][("mugs/g7",)]
    assert retired["rule"] == "retired" and retired["member_count"] == 1
    imp = ["e2", "u9", {"age": "x"}, "p1", "c1", None, 1001]
    feed.after_batch("mugs", stage.apply("mugs", OutcomeBatch(impressions=[imp])), stage.grouper("mugs").groups("mugs"))
    assert online.rows["group_profile"][("mugs/g7",)]["member_count"] == 0
    assert online.rows["user_group"][("u9", "mugs")]["group_id"] == "mugs/g0"


def test_products_are_pushed_when_new_or_changed() -> None:
    stage = _stage()
    online = Online()
    feed = FeatureFeed(stage, online.submit)

    def imp(price: float, ts: int) -> Impression:
        return Impression(event_id=f"e{ts}", ts=ts, user_id="u", user={}, product_id="p1", category="mugs",
                          product={"title": "Big mug", "price": price, "image_url": "s3://img/p1.png"},
                          creative_id="c", prompt=None, model_version="m", placement="feed")

    feed.after_ingest([imp(5.0, 10), imp(5.0, 11)])
    feed.after_ingest([imp(5.0, 12)])
    feed.after_ingest([imp(6.5, 13)])
    assert online.stamps[("product_profile", ("p1",))] == [10_000, 13_000]
    row = online.rows["product_profile"][("p1",)]
    assert row["price"] == 6.5 and row["image_ref"] == "s3://img/p1.png" and row["title_embedding"] is None


def test_top_prompts_need_evidence_not_luck() -> None:
    row = group_preferences_row(
        "g", prompts={"lucky": (2, 1), "solid": (400, 40), "weak": (400, 8)}, attributes={}, top_k=2
    )
    assert row["top_prompts"] == ["solid", "lucky"]
    assert row["ctr"] == pytest.approx(49 / 802)


def test_product_rows_read_only_sound_values() -> None:
    row = product_row("p", "c", {"price": float("inf"), "title": 5})
    assert row["price"] is None and row["title"] is None and row["image_ref"] is None
