"""Traffic logs (the learner's input format), group features and the logs infra produces from a world."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from learner.data import TrafficError, TrafficLog
from features.group import ATTRIBUTE_VOCABULARY, creative_attributes, read_group_features

PINK, NAVY = "primary=pink", "primary=navy"


def test_log_round_trips_through_its_directory(tmp_path: Path, make_log) -> None:
    log = make_log(n=500)
    log.save(tmp_path / "traffic")
    loaded = TrafficLog.load(tmp_path / "traffic")
    assert loaded.records == log.records
    assert loaded.users == log.users
    assert loaded.meta == log.meta
    assert sorted(loaded.products) == sorted(log.products)
    for pid, product in log.products.items():
        assert loaded.products[pid] == product
        assert loaded.products[pid].image.tobytes() == product.image.tobytes()


def test_a_broken_log_directory_is_refused_with_the_file_named(tmp_path: Path, make_log) -> None:
    with pytest.raises(TrafficError, match="not a traffic log"):
        TrafficLog.load(tmp_path)
    make_log(n=50).save(tmp_path / "t")
    (tmp_path / "t" / "users.jsonl.gz").unlink()
    with pytest.raises(TrafficError, match="users.jsonl.gz: missing"):
        TrafficLog.load(tmp_path / "t")
    make_log(n=50).save(tmp_path / "u")
    with gzip.open(tmp_path / "u" / "traffic.jsonl.gz", "wt") as out:
        out.write("{broken\n")
    with pytest.raises(TrafficError, match=r"traffic.jsonl.gz:1: not valid JSON"):
        TrafficLog.load(tmp_path / "u")


def test_cells_count_impressions_and_clicks_per_group_product_prompt(make_log) -> None:
    log = make_log(n=2000)
    cells = log.cells()
    assert sum(c.impressions for c in cells.values()) == 2000
    assert sum(c.clicks for c in cells.values()) == sum(r.clicked for r in log.records)


def test_group_features_find_each_groups_taste_and_members(tiny_log) -> None:
    features = read_group_features(tiny_log)
    young, old = features["mugs/g0"], features["mugs/g1"]
    assert young.likes[0] == PINK and old.likes[0] == NAVY
    assert NAVY in young.avoids or young.lifts[NAVY] < 1
    assert young.who[0] == "age=young" and old.who[0] == "age=old"
    assert young.share + old.share == pytest.approx(1.0)
    text = young.to_text()
    assert text.startswith("group mugs/g0 | ") and "likes primary=pink" in text and "\n" not in text
    assert young.vector().shape == (2 + len(ATTRIBUTE_VOCABULARY),)


def test_creative_attributes_cover_every_field_and_reject_non_prompts() -> None:
    attrs = creative_attributes(
        'background=spotlight; palette=navy,beige; position=top; scale=0.8; copy=""; style=dark,luxury'
    )
    assert attrs == ("background=spotlight", "primary=navy", "secondary=beige", "position=top", "scale=0.8",
                     "copy=none", "style=dark", "style=luxury")
    assert set(attrs) <= set(ATTRIBUTE_VOCABULARY)
    assert creative_attributes("not a prompt") == ()


def test_world_traffic_is_grouped_like_the_worker_and_held_out_logs_reuse_the_groups() -> None:
    from sim.logs import traffic_from_world
    from sim.world import World

    world = World.load(Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml")
    from streams.grouping import GroupingConfig, ProductAwareGrouper

    # the taste gate off and frequent macro steps (as the feature tests' EARLY_GROUPS), so 12k impressions split a
    # category; the default gate needs 50-100k (tests/streams/test_grouping*.py)
    early = ProductAwareGrouper(GroupingConfig(max_groups=8, taste_alpha=1.0, recluster_every=1000,
                                               recluster_budget=5000.0))
    log, grouper = traffic_from_world(world, n_impressions=12_000, seed=0, creatives_per_product=4, grouper=early)
    assert len(log.records) == 12_000 and log.meta["world"] == "world_a"
    assert {r.category for r in log.records} == {"lipstick", "drill"}
    assert len(log.groups()) > 2  # clicks split at least one category
    assert all(p.image is not None for p in log.products.values())
    before = {c: [g.id for g in grouper.groups(c)] for c in grouper.categories()}
    held, _ = traffic_from_world(world, n_impressions=2_000, seed=1, creatives_per_product=4, grouper=grouper,
                                 learn=False)
    assert set(held.groups()) <= set(log.groups())
    assert {c: [g.id for g in grouper.groups(c)] for c in grouper.categories()} == before
    prompts = {r.prompt for r in log.records} & {r.prompt for r in held.records}
    assert len(prompts) < 10  # other random creatives


def test_event_files_round_trip(tmp_path: Path) -> None:
    from sim.logs import read_event_file, traffic_from_events, write_event_file
    from sim.simulate import generate_events
    from sim.world import World

    world = World.load(Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml")
    events = list(generate_events(world, seed=0, n_impressions=300))
    path = tmp_path / "events.jsonl"
    write_event_file(path, events)
    with open(path, "a") as out:
        out.write('{"type": "impression"}\n')
    parsed, bad = read_event_file(path)
    assert parsed == events and len(bad) == 1 and "events.jsonl:" in bad[0]
    log, _ = traffic_from_events(parsed)
    assert len(log.records) == 300
    assert sum(r.clicked for r in log.records) == sum(e.type == "click" for e in events)
    assert all(p.image is None and p.price for p in log.products.values())
    assert np.isclose(sum(1 for _ in log.cells()), len({(r.group_id, r.product_id, r.prompt) for r in log.records}))
