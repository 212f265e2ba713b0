"""On-policy Group-DPO rounds: a group with consistent pairs gains CTR, a group without pairs does not move."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import torch
import pytest
import yaml

from infra.settings import LearnerSettings
from streams.ctr import CreativeStats
from streams.pairs import PairMinerConfig

TINY_WORLD = {
    "name": "tiny_onpolicy",
    "seed": 5,
    "render_size": 48,
    "membership_noise": 0.01,
    "users": {"count": 400, "attributes": {"age_band": {"values": ["young", "old"]}}},
    "categories": [{
        "name": "mugs", "products": 4, "price": [5.0, 19.0], "title_words": ["ceramic", "travel", "enamel"],
        "shape": "box",
        "segments": [
            {"name": "pinkish", "share": 0.5, "membership": {"age_band": {"young": 1.0}}, "base_ctr": 0.04,
             "preferences": {"hue": {"target": 330, "weight": 3.0}, "brightness": {"target": 0.8, "weight": 2.0}}},
            {"name": "calm", "share": 0.5, "membership": {"age_band": {"old": 1.0}}, "base_ctr": 0.04,
             "preferences": {"hue": {"target": 150, "weight": 3.0}, "brightness": {"target": 0.25, "weight": 2.0}}},
        ],
    }],
    "click_noise": {"floor": 0.0},
}
"""One category, two segments with opposite tastes; learned groups are the segments themselves."""

SETTINGS = {
    "model": {"vocab_size": 500, "hidden_size": 48, "layers": 2, "heads": 4, "intermediate_size": 96,
              "vision_hidden_size": 16, "vision_layers": 1, "image_size": 16, "patch_size": 8},
    "pretrain": {"impressions": 20_000, "creatives_per_product": 8, "steps": 400, "batch_size": 8,
                 "warmup_steps": 10, "feature_snapshots": 1},
    "dpo": {"max_steps": 60, "batch_size": 8, "learning_rate": 1e-3, "beta": 0.3, "preserve_weight": 5.0},
    "loop": {"onpolicy_candidates": 8, "onpolicy_impressions": 3000, "onpolicy_products": 4},
}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):  # noqa: ANN001, ANN201
    """A tiny world, its traffic labelled by hidden segment, and a small pre-trained base."""
    from features.group import read_group_features
    from learner.data import TrafficLog
    from learner.pretrain import pretrain, torch_threads
    from sim.logs import traffic_from_world
    from sim.world import World

    path = tmp_path_factory.mktemp("world") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_WORLD))
    world = World.load(path)
    settings = LearnerSettings(**SETTINGS)
    log, _ = traffic_from_world(world, n_impressions=settings.pretrain.impressions, seed=0, creatives_per_product=8)
    users = {u.id: u for u in world.users}
    records = [replace(r, group_id=f"mugs/{world.segment_of(users[r.user_id], 'mugs').name}") for r in log.records]
    log = TrafficLog(log.products, log.users, records, dict(log.meta))
    with torch_threads(1):
        base, _, _ = pretrain(log, settings)
    features = read_group_features(log)
    members = {f"mugs/{s.name}": Counter({s.key: len(world.members(s))}) for s in world.segments["mugs"]}
    return world, settings, base, features, members, log.products


def _policy_ctr(world, model, features, members, products,  # noqa: ANN001
                n: int = 32) -> dict[str, tuple[float, float]]:
    """Per group: mean simulated CTR of ``n`` samples per product (no rerank: what the policy writes) and its
    standard error over those samples."""
    from sim.judge import group_ctr

    out = {}
    for group in sorted(members):
        values = []
        for index, product in enumerate(world.products["mugs"]):
            for generation in model.generate(features[group], products[product.id], n=n, seed=100 + index,
                                             temperature=1.0):
                if generation.prompt is not None:
                    values.append(group_ctr(world, members[group], product, generation.prompt))
        out[group] = (float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values))))
    return out


def _two_rounds(setup, preserve: str, lineage: str = "category",  # noqa: ANN001
                **dpo) -> tuple[dict, dict, list[dict]]:  # noqa: ANN003
    """Two on-policy rounds in which only mugs/pinkish has traffic. ``lineage`` ``category`` (the protection
    tests): one fit covers both groups, so mugs/calm must be held by ``preserve``; ``group`` (the default):
    each group is fitted on its own pairs. CTR after: each group's live model."""
    from bench.onpolicy import Arm, onpolicy_round
    from learner.pretrain import torch_threads

    world, settings, base, features, members, products = setup
    settings = settings.model_copy(update={"dpo": settings.dpo.model_copy(update={"preserve": preserve, **dpo}),
                                           "loop": settings.loop.model_copy(update={"lineage": lineage})})
    # Only mugs/pinkish is shown to users: mugs/calm gets no traffic, hence no pair, in either round.
    arm = Arm("Group-DPO", base, dict(features), {"mugs/pinkish": members["mugs/pinkish"]}, one_size=False)
    with torch_threads(1):
        before = _policy_ctr(world, base, features, members, products)
        rounds = [onpolicy_round(arm, world, products, settings, seed=0, round_number=n, gate_judge=None)
                  for n in (1, 2)]
        after = {g: _policy_ctr(world, arm.live_model(g), features, {g: members[g]}, products)[g] for g in members}
    if lineage == "group":
        assert arm.live_model("mugs/calm") is base, "no fit covered the group without pairs: it keeps the base"
    return before, after, rounds


@pytest.fixture(scope="module")
def anchored(tiny_setup):  # noqa: ANN001, ANN201
    return _two_rounds(tiny_setup, "mirror")


def _noise(before: tuple[float, float], after: tuple[float, float]) -> float:
    return float(np.hypot(before[1], after[1]))


def test_two_onpolicy_rounds_raise_the_ctr_of_a_group_with_consistent_pairs(anchored) -> None:  # noqa: ANN001
    before, after, rounds = anchored
    assert all(r["pairs"] > 0 and set(r["pairs_per_group"]) == {"mugs/pinkish"} for r in rounds)
    (b, _), (a, _) = before["mugs/pinkish"], after["mugs/pinkish"]
    assert a > 1.1 * b and a - b > 2 * _noise(before["mugs/pinkish"], after["mugs/pinkish"]), (before, after)


def test_two_rounds_with_one_fit_per_group_raise_the_group_with_pairs_and_keep_the_other_on_its_model(
        tiny_setup) -> None:  # noqa: ANN001
    before, after, rounds = _two_rounds(tiny_setup, "mirror", lineage="group")
    assert all(r["pairs"] > 0 and r["mirrored"] == 0 for r in rounds), "a fit covers mugs/pinkish alone"
    (b, _), (a, _) = before["mugs/pinkish"], after["mugs/pinkish"]
    assert a > 1.1 * b and a - b > 2 * _noise(before["mugs/pinkish"], after["mugs/pinkish"]), (before, after)
    assert after["mugs/calm"] == before["mugs/calm"]


def test_a_group_without_pairs_is_anchored_and_stays_within_noise(anchored, tiny_setup) -> None:  # noqa: ANN001
    before, after, rounds = anchored
    # Every pair of the pinkish group is mirrored under the calm group's prefix (both ways).
    assert all(r["groups_without_pairs"] == ["mugs/calm"] and r["mirrored"] == 2 * r["pairs"] for r in rounds)
    change = after["mugs/calm"][0] - before["mugs/calm"][0]
    assert abs(change) <= 2 * _noise(before["mugs/calm"], after["mugs/calm"]), (before, after)
    # Without protection the same rounds drag it down (the tastes are opposite): the mirrors are what hold it.
    _, loose, _ = _two_rounds(tiny_setup, "off")
    assert before["mugs/calm"][0] - loose["mugs/calm"][0] > 2 * abs(change), (before, after, loose)


def test_a_kl_to_the_incumbent_on_its_own_samples_holds_a_group_without_pairs(tiny_setup) -> None:  # noqa: ANN001, E501
    before, after, rounds = _two_rounds(tiny_setup, "kl", preserve_kl_weight=50.0)
    assert all(r["anchors"] > 0 and r["mirrored"] == 0 for r in rounds), rounds
    change = after["mugs/calm"][0] - before["mugs/calm"][0]
    assert abs(change) <= 2 * _noise(before["mugs/calm"], after["mugs/calm"]), (before, after)
    (b, _), (a, _) = before["mugs/pinkish"], after["mugs/pinkish"]
    assert a > 1.1 * b, "the group with pairs still gains: the KL acts on the quiet group's creatives only"


def test_anchor_kl_is_zero_at_the_reference_and_grows_with_drift(tiny_setup) -> None:  # noqa: ANN001
    from learner.dpo.anchor import anchor_batch, anchor_kl
    from learner.dpo.onpolicy import quiet_group_anchors

    _, _, base, features, _, products = tiny_setup
    batch = anchor_batch(base, quiet_group_anchors(base, features, products, set(), 1, 4), features, products)
    assert batch is not None and len(batch) == 2 * 4
    assert float(anchor_kl(base.model, base.model, batch).detach()) == pytest.approx(0.0, abs=1e-6)
    drifted = base.copy()
    with torch.no_grad():
        for parameter in drifted.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert float(anchor_kl(drifted.model, base.model, batch).detach()) > 1e-3
    assert anchor_batch(base, [], features, products) is None


def test_slate_pairs_are_mined_with_the_stream_miner_and_a_margin() -> None:
    from learner.dpo.onpolicy import best_winner_pairs, mine_slate_pairs, with_margin

    stats = {("mugs/g0", "p1"): {"A": CreativeStats(3000, 240), "B": CreativeStats(3000, 150),
                                 "C": CreativeStats(3000, 60)},
             ("mugs/g1", "p1"): {"A": CreativeStats(50, 5), "B": CreativeStats(50, 0)}}  # too few impressions
    pairs = mine_slate_pairs(stats, {"p1": "mugs"}, PairMinerConfig(min_impressions=100))
    assert {(p.winner_prompt, p.loser_prompt) for p in pairs} == {("A", "B"), ("A", "C"), ("B", "C")}
    assert {(p.winner_prompt, p.loser_prompt) for p in with_margin(pairs, 1.0)} == {("A", "C"), ("B", "C")}
    assert {p.winner_prompt for p in best_winner_pairs(pairs)} == {"A"}


def test_protection_mirrors_other_groups_pairs_for_quiet_groups_or_for_all() -> None:
    from learner.dpo.onpolicy import mine_slate_pairs, protection_pairs

    stats = {("mugs/g0", "p1"): {"A": CreativeStats(3000, 240), "B": CreativeStats(3000, 60)},
             ("mugs/g1", "p1"): {"C": CreativeStats(3000, 200), "D": CreativeStats(3000, 50)}}
    pairs = mine_slate_pairs(stats, {"p1": "mugs"}, PairMinerConfig(min_impressions=100))
    targets = ["mugs/g0", "mugs/g1", "mugs/g2", "pens/g0"]
    quiet = protection_pairs(pairs, targets, "mirror", "quiet")
    assert {p.group_id for p in quiet} == {"mugs/g2"}  # pens/g0: no pair of its category to mirror
    assert len(quiet) == 2 * len(pairs) and {p.prob_winner_better for p in quiet} == {0.5}
    every = protection_pairs(pairs, targets, "mirror", "all")
    held_g0 = {(p.winner_prompt, p.loser_prompt) for p in every if p.group_id == "mugs/g0"}
    assert held_g0 == {("C", "D"), ("D", "C")}, "g0 is held against g1's pair only, never its own"
    assert protection_pairs(pairs, targets, "mirror", "all", one_size=True) == []
    assert protection_pairs(pairs, targets, "sft", "all") == []


def test_anchor_rows_carry_no_dpo_signal(tiny_setup) -> None:  # noqa: ANN001
    from learner.dpo.data import preference_dataset
    from learner.dpo.onpolicy import Anchor
    from infra.contracts.messages import PreferencePair

    _, _, base, features, _, products = tiny_setup
    product = sorted(products)[0]
    pair = PreferencePair(pair_id="x", ts=0, group_id="mugs/pinkish", category="mugs", product_id=product,
                          winner_creative_id="w", loser_creative_id="l", winner_prompt="A", loser_prompt="B",
                          winner_impressions=100, winner_clicks=9, loser_impressions=100, loser_clicks=1,
                          winner_ctr=0.09, loser_ctr=0.01, prob_winner_better=0.99, evidence_level=0)
    rows = preference_dataset([pair], features, products, "<e>", anchors=[Anchor("mugs/calm", product, "C")])
    assert rows["group_id"] == ["mugs/pinkish", "mugs/calm"]
    assert rows[1]["chosen"] == rows[1]["rejected"] == "C<e>"
    assert rows[1]["prompt"].startswith("group mugs/calm")


def test_quiet_group_anchors_are_the_incumbents_own_samples_for_every_group_without_pairs(tiny_setup) -> None:  # noqa: ANN001, E501
    from learner.dpo.onpolicy import quiet_group_anchors

    _, _, base, features, _, products = tiny_setup
    targets = {**features, "pens/g0": features["mugs/calm"]}  # a category without products gets no anchor
    anchors = quiet_group_anchors(base, targets, products, {"mugs/pinkish"}, 2, 6, seed=3)
    assert {a.group_id for a in anchors} == {"mugs/calm"}, "groups with pairs are not anchored"
    assert sorted({a.product_id for a in anchors}) == sorted(products)[:2]
    assert len(anchors) == 2 * 6, "every sample, duplicates kept: the SFT term then distils the incumbent"
    again = quiet_group_anchors(base, targets, products, {"mugs/pinkish"}, 2, 6, seed=3)
    assert anchors == again, "seeded: the same incumbent and round give the same anchors"
    assert quiet_group_anchors(base, features, products, set(features), 2, 6) == []
    from learner.dpo.onpolicy import anchored_groups_with_pairs

    pairs = [type("P", (), {"group_id": "mugs/pinkish"})()]
    assert anchored_groups_with_pairs(pairs, "quiet") == {"mugs/pinkish"}
    assert anchored_groups_with_pairs(pairs, "all") == set(), "scope all: groups with pairs are anchored too"


def test_simulated_slate_traffic_follows_the_world(tiny_setup) -> None:  # noqa: ANN001
    from infra.contracts.prompt import parse_prompt
    from sim.judge import group_ctr, simulate_slate_traffic

    world, _, _, _, members, _ = tiny_setup
    product = world.products["mugs"][0]
    pink = 'background=solid; palette=pink,white; position=center; scale=0.5; copy=""; style='
    navy = 'background=stripes; palette=navy,black; position=center; scale=0.5; copy=""; style=dark'
    stats = simulate_slate_traffic(world, members, {("mugs/pinkish", product.id): [pink, navy]}, 20_000, seed=1)
    counts = stats[("mugs/pinkish", product.id)]
    for text in (pink, navy):
        expected = group_ctr(world, members["mugs/pinkish"], product, parse_prompt(text))
        assert abs(counts[text].ctr - expected) < 4 * np.sqrt(expected * (1 - expected) / 20_000) + 1e-4
    assert counts[pink].ctr > counts[navy].ctr


def test_world_ctr_draws_are_paired_and_slate_serving_is_the_policy_mean(tiny_setup) -> None:  # noqa: ANN001
    from learner.round import judged
    from sim.judge import WorldCTR

    world, settings, base, features, members, products = tiny_setup
    judge = WorldCTR(world, members, features, products, settings.generation, products_per_group=2, draws=3)
    figures = judged(judge, base)
    for group, group_figures in figures.items():
        assert len(group_figures.ctr_values) == 2 * 3  # per (product, draw)
        assert group_figures.ctr == pytest.approx(float(np.mean(group_figures.ctr_values)))
    again = judged(judge, base)
    assert {g: f.ctr_values for g, f in again.items()} == {g: f.ctr_values for g, f in figures.items()}, \
        "the same seeds for every call: two versions are compared draw by draw"
    slate = WorldCTR(world, members, features, products, settings.generation, products_per_group=2, draws=3,
                     serve="slate")
    means = slate(base)
    assert means == pytest.approx(judge.last_sampled), "slate serving judges the mean of the sampled candidates"


def test_reweighted_judge_pairs_the_candidate_with_the_incumbents_own_samples(tiny_setup) -> None:  # noqa: ANN001
    from learner.round import judged_pair
    from sim.judge import WorldCTR

    world, settings, base, features, members, products = tiny_setup
    judge = WorldCTR(world, members, features, products, settings.generation, products_per_group=2, draws=2,
                     serve="slate")
    same_new, same_old = judged_pair(judge, base, base, estimate="reweight")
    for group in same_old:
        assert same_new[group].ctr_values == pytest.approx(same_old[group].ctr_values), "p/p = 1: no change"
        assert len(same_old[group].ctr_values) == 2 * 2
    tilted = base.copy()
    with torch.no_grad():  # a different model: the estimate moves, on the very same samples
        for parameter in tilted.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    new, old = judged_pair(judge, tilted, base, estimate="reweight")
    assert {g: f.ctr_values for g, f in old.items()} == {g: f.ctr_values for g, f in same_old.items()}
    assert any(new[g].ctr_values != pytest.approx(old[g].ctr_values) for g in old)


class _ScriptedGateJudge:
    """A gate's judge for which every model newer than the base raises mugs/pinkish and lowers mugs/calm
    (by 0.01 per model seen, in the order seen): one candidate is good for one group and bad for the other."""

    def __init__(self, base, order: list | None = None, only: frozenset | None = None) -> None:  # noqa: ANN001
        self.base, self.order, self.only = base, order if order is not None else [base], only
        self.last_se: dict[str, float] = {}
        self.last_per_product: dict[str, list[float]] = {}

    def groups(self) -> list[str]:
        return sorted(g for g in ("mugs/calm", "mugs/pinkish") if self.only is None or g in self.only)

    def restricted(self, groups) -> "_ScriptedGateJudge":  # noqa: ANN001
        return _ScriptedGateJudge(self.base, self.order, frozenset(groups))

    def __call__(self, gmllm, one_size: bool = False) -> dict[str, float]:  # noqa: ANN001
        if not any(gmllm is seen for seen in self.order):
            self.order.append(gmllm)
        k = next(i for i, seen in enumerate(self.order) if seen is gmllm)
        ctr = {"mugs/pinkish": 0.03 + 0.01 * k, "mugs/calm": 0.03 - 0.01 * k}
        self.last_se = {g: 0.0005 for g in self.groups()}
        return {g: ctr[g] for g in self.groups()}


def test_group_promotion_puts_a_candidate_live_only_for_the_groups_it_raises(tiny_setup) -> None:  # noqa: ANN001
    from bench.onpolicy import Arm, onpolicy_round
    from learner.pretrain import torch_threads

    world, settings, base, features, members, products = tiny_setup
    settings = settings.model_copy(update={"loop": settings.loop.model_copy(update={"promotion": "group",
                                                                                "lineage": "category"})})
    arm = Arm("Group-DPO", base, dict(features), dict(members), one_size=False)
    judge = _ScriptedGateJudge(base)
    with torch_threads(1):
        first = onpolicy_round(arm, world, products, settings, seed=0, round_number=1, gate_judge=judge)
        assert first["promoted_targets"] == ["mugs/pinkish"], first["reason"]
        assert arm.live_model("mugs/calm") is base and arm.live_model("mugs/pinkish") is not base
        moved = arm.live_model("mugs/pinkish")
        # Round 2: each live model is fitted on its own group's pairs and gated for it alone.
        second = onpolicy_round(arm, world, products, settings, seed=0, round_number=2, gate_judge=judge)
    assert [lineage["targets"] for lineage in second["lineages"]] == [["mugs/calm"], ["mugs/pinkish"]]
    for lineage in second["lineages"]:
        assert set(lineage["pairs_per_group"]) <= set(lineage["targets"]), lineage
    assert second["promoted_targets"] == ["mugs/pinkish"]
    assert arm.live_model("mugs/calm") is base
    assert arm.live_model("mugs/pinkish") is not moved and arm.live_model("mugs/pinkish") is not base
    fitted = [entry for entry in second["candidates"]]
    assert [targets for _, targets, _ in fitted] == [["mugs/calm"], ["mugs/pinkish"]]
    assert [went for _, _, went in fitted] == [[], ["mugs/pinkish"]]


@pytest.mark.parametrize("replay", [False, True])
def test_replay_keeps_earlier_rounds_pairs_after_promotion(tiny_setup, replay: bool) -> None:  # noqa: ANN001
    from bench.onpolicy import Arm, onpolicy_round
    from learner.pretrain import torch_threads

    world, settings, base, features, members, products = tiny_setup
    settings = settings.model_copy(update={
        "loop": settings.loop.model_copy(update={"onpolicy_replay": replay}),
        "dpo": settings.dpo.model_copy(update={"min_steps": 1, "max_steps": 2}),
    })
    arm = Arm("Group-DPO", base, dict(features), dict(members), one_size=False)
    with torch_threads(1):
        first = onpolicy_round(arm, world, products, settings, seed=0, round_number=1, gate_judge=None)
        second = onpolicy_round(arm, world, products, settings, seed=0, round_number=2, gate_judge=None)
    assert first["promoted_targets"] and first["pairs_fresh"] > 0
    kept = second["pairs"] - second["pairs_fresh"]
    if replay:  # the first round's pairs stay, as in the learner's buffer (ids differ by round)
        assert kept == first["pairs"], (first, second)
    else:  # the promoted model's own pairs only
        assert kept == 0, (first, second)


def test_lineages_split_a_versions_targets_by_category_or_group() -> None:
    from learner.dpo.onpolicy import lineages

    old, new = object(), object()
    targets = ["mugs/g0", "mugs/g1", "socks/g0", "socks/g1"]
    live = {"socks/g1": new}
    serving = lambda t: live.get(t, old)  # noqa: E731
    assert lineages(targets, serving) == [(old, ["mugs/g0", "mugs/g1", "socks/g0"]), (new, ["socks/g1"])]
    assert lineages(targets, serving, "category") == [(old, ["mugs/g0", "mugs/g1"]), (old, ["socks/g0"]),
                                                       (new, ["socks/g1"])]
    assert [t for _, t in lineages(targets, serving, "group")] == [[t] for t in targets]
    with pytest.raises(ValueError, match="learner.loop.lineage"):
        lineages(targets, serving, "product")
