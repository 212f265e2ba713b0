"""The grouper on simulated worlds: an interaction segment is found, one shared taste stays one group."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.grouping import _bench_world, attribute_ceiling, nmi, separable_ceiling, taste_labels
from infra.contracts.events import Impression
from infra.contracts.prompt import parse_prompt
from sim.simulate import generate_events
from sim.world import World
from streams.grouping import ProductAwareGrouper

EXAMPLES = Path(__file__).resolve().parents[2] / "sim" / "examples"


def _learn(world: World, n_impressions: int, seed: int = 0) -> ProductAwareGrouper:
    grouper = ProductAwareGrouper()
    last = None
    for event in generate_events(world, seed=seed, n_impressions=n_impressions):
        if isinstance(event, Impression):
            last = event
            tokens = parse_prompt(event.prompt).attribute_tokens() if event.prompt else None
            grouper.learn_and_assign(event.category, event.user, event.creative_id, tokens)
        else:
            assert last is not None and last.event_id == event.impression_id
            grouper.learn_click(last.category, last.user, last.creative_id)
    return grouper


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interaction_world_is_grouped_right(seed: int) -> None:
    """Measured on seeds 0-4: sofas (the interaction) is found by 50k impressions on all five, kettles by 50k
    on four and by 100k on all five; 100k leaves the margin."""
    world = World.load(EXAMPLES / "world_interaction.yaml")
    grouper = _learn(world, 100_000, seed)
    for category in world.categories:
        truth = taste_labels(world, category)
        predicted = [grouper.assign(category, dict(user.attributes)) for user in world.users]
        assert nmi(truth, predicted) >= 0.9 * attribute_ceiling(world, category)[0]
    rules = sorted(info.rule for info in grouper.groups("sofas"))
    assert rules == ["(age=older & city=big) | (age=young & city=small)", "(age=older & city=small) | (age=young & city=big)"]
    assert [info.rule for info in grouper.groups("kettles")] != ["all"]
    assert all("&" not in info.rule for info in grouper.groups("kettles"))  # no interaction invented


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_world_of_one_shared_taste_stays_one_group_per_category(seed: int) -> None:
    world = World.load(EXAMPLES / "world_shared_taste.yaml")  # segments differ in base CTR only
    grouper = _learn(world, 60_000, seed)  # measured: one group on seeds 0-4 up to 200k
    for category in world.categories:
        assert [info.rule for info in grouper.groups(category)] == ["all"]
        assert grouper.ids_minted(category) == 1


@pytest.mark.parametrize("path", ["world_a.yaml", "world_b.yaml"])
def test_with_users_shuffled_no_category_ever_splits(path: str) -> None:
    """The null stream of ``python -m bench.grouping --null``: each impression (and its click) gets a random user
    of the world, so the attributes no longer predict the clicks, though the tastes behind them differ as much
    as in the real stream. Measured with `--null`: no split in 130 category x seed runs (the ten example worlds, seeds
    0-4, up to 200k; docs/grouping.md)."""
    world = World.load(EXAMPLES / path)
    for seed in (0, 1):
        result = _bench_world(world, (20_000, 60_000), None, seed, null=True)
        for category, stats in result["categories"].items():
            assert stats["ids_minted"] == 1, (category, seed, stats["rules"])
        real = _bench_world(world, (60_000,), None, seed)  # the same stream unshuffled does split somewhere
        assert any(stats["groups@60000"] > 1 for stats in real["categories"].values())


def test_separable_ceiling_keeps_apart_only_what_the_clicks_show() -> None:
    """``python -m bench.grouping --separable``: the world's true grouping merged by the grouper's own tests.
    At 20k impressions world A's clicks tell no taste apart in lipstick (one group, nmi 0); by 200k both
    categories' tastes are all kept apart (the ceiling)."""
    world = World.load(EXAMPLES / "world_a.yaml")
    bound = separable_ceiling(world, 0, (20_000, 200_000))
    assert bound["lipstick"][20_000] == 0.0
    assert bound["lipstick"][200_000] == bound["drill"][200_000] == 1.0


def test_grouping_bench_reports_the_separable_ceiling(tmp_path: Path) -> None:
    """``osmf bench grouping`` scores the separable ceiling of its own stream beside the grouper."""
    from bench.common import BenchOptions
    from bench.grouping import run

    figures = run(BenchOptions(quick=True, world=EXAMPLES / "world_a.yaml", output_dir=tmp_path))
    lipstick = figures["worlds"]["world_a"]["categories"]["lipstick"]
    bound = separable_ceiling(World.load(EXAMPLES / "world_a.yaml"), 0, (5_000, 20_000))
    assert [lipstick[f"separable_over_ceiling@{n}"] for n in (5_000, 20_000)] == [bound["lipstick"][n] for n in (5_000, 20_000)]
    assert figures["min_separable_over_ceiling@20000"] is not None
    assert figures["min_separable_over_ceiling@20000"] <= figures["mean_separable_over_ceiling@20000"] <= 1.0
