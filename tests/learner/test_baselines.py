"""Baselines beside Group-DPO: KTO rows from slate traffic, and a real TRL KTO fit on a tiny model."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from infra.contracts.prompt import random_prompt
from infra.settings import DPOSettings
from learner.baselines.config import KTOBaselineConfig
from learner.baselines.kto import class_weights, kto_rows
from learner.data import ProductRecord
from streams.ctr import CreativeStats

PRODUCTS = {f"mug-{i}": ProductRecord(f"mug-{i}", "mugs", f"Enamel mug {i}", 9.5 + i,
                                      Image.new("RGBA", (32, 32), (200, 60 * i, 40, 255))) for i in range(2)}
PREFIX = {"mugs/g0": "group mugs/g0 | 50% of mugs | likes primary=pink",
          "mugs/g1": "group mugs/g1 | 50% of mugs | likes primary=navy"}


def _creatives(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_prompt(rng).to_text() for _ in range(n)]


def test_kto_rows_labels_prefix_and_bounds() -> None:
    a, b, c = _creatives(3)
    stats = {
        ("mugs/g0", "mug-0"): {a: CreativeStats(2000, 200), b: CreativeStats(2000, 20), c: CreativeStats(2000, 0)},
        ("mugs/g1", "mug-1"): {a: CreativeStats(2000, 3), b: CreativeStats(2000, 2)},  # 5 clicks: fewer than the cap
        ("mugs/g9", "mug-0"): {a: CreativeStats(2000, 50)},  # unknown group: no row
        ("mugs/g0", "nope"): {a: CreativeStats(2000, 50)},  # unknown product: no row
    }
    rows = kto_rows(stats, PREFIX, PRODUCTS, "<eos>", KTOBaselineConfig(rows_per_slate=64), seed=1)
    assert set(rows["group_id"]) == {"mugs/g0", "mugs/g1"}
    for group, product, bound in (("mugs/g0", "mug-0", 64), ("mugs/g1", "mug-1", 5)):
        index = [i for i, (g, p) in enumerate(zip(rows["group_id"], rows["product_id"])) if (g, p) == (group, product)]
        labels = [rows["label"][i] for i in index]
        assert sum(labels) == bound and len(labels) - sum(labels) == bound  # balanced, capped by clicks
        for i in index:
            assert rows["prompt"][i].splitlines()[0] == PREFIX[group]
            assert rows["prompt"][i].splitlines()[1] == "<image>"
            assert rows["completion"][i].endswith("<eos>")
            assert rows["images"][i][0].size == (32, 32)
    g0 = [i for i, g in enumerate(rows["group_id"]) if g == "mugs/g0"]
    clicked = [rows["completion"][i] for i in g0 if rows["label"][i]]
    assert clicked.count(c + "<eos>") == 0  # never clicked: never desirable
    assert clicked.count(a + "<eos>") > 3 * clicked.count(b + "<eos>")  # 200 vs 20 clicks: drawn in proportion
    assert class_weights(rows["label"], KTOBaselineConfig()) == (1.0, 1.0)
    assert class_weights([True, False, False, False], KTOBaselineConfig()) == (3.0, 1.0)
    again = kto_rows(stats, PREFIX, PRODUCTS, "<eos>", KTOBaselineConfig(rows_per_slate=64), seed=1)
    assert again["completion"] == rows["completion"]  # seeded
    assert not kto_rows({("mugs/g0", "mug-0"): {a: CreativeStats(500, 0)}}, PREFIX, PRODUCTS, "<eos>")["label"]


def test_kto_config_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="rows_per_slate"):
        KTOBaselineConfig(rows_per_slate=0)
    with pytest.raises(ValueError, match="loss_type"):
        KTOBaselineConfig(loss_type="sigmoid")


def test_a_kto_fit_raises_the_clicked_creative_against_the_reference(tiny_gmllm, one_thread) -> None:  # noqa: ANN001
    from learner.baselines.kto import fit_kto

    good, bad = _creatives(2, seed=3)
    stats = {("mugs/g0", "mug-0"): {good: CreativeStats(2000, 240), bad: CreativeStats(2000, 10)}}
    policy, reference = tiny_gmllm.copy(), tiny_gmllm.copy()
    items = [(PREFIX["mugs/g0"], PRODUCTS["mug-0"], text) for text in (good, bad)]
    before = reference.completion_logprobs(items)
    fit = fit_kto(policy, reference, stats, PREFIX, PRODUCTS,
                  DPOSettings(max_steps=12, min_steps=12, batch_size=8, learning_rate=3e-3, beta=0.3),
                  KTOBaselineConfig(rows_per_slate=32))
    after = policy.completion_logprobs(items)
    assert fit.steps == 12 and fit.pairs == 64 and fit.losses
    assert after[0] - before[0] > 0.5, (before, after)  # the clicked creative rises against the reference
    assert after[0] - before[0] > after[1] - before[1]  # and more than the one rarely clicked
    assert (reference.completion_logprobs(items) == before).all()  # the reference is not trained


def test_the_alignment_bench_runs_kto_as_one_more_arm(tmp_path, one_thread) -> None:  # noqa: ANN001
    from bench.alignment import AlignmentOptions, run
    from tests.learner.test_onpolicy_bench import _small_world

    figures = run(AlignmentOptions(
        quick=True, world=_small_world(tmp_path), output_dir=tmp_path, seeds=1, rounds=1, baselines=("kto",),
        learner={"pretrain": {"impressions": 8_000, "steps": 10}, "generation": {"candidates": 2},
                 "dpo": {"max_steps": 4, "min_steps": 4},
                 "loop": {"ctr_products_per_group": 1, "onpolicy_products": 1, "onpolicy_candidates": 4}}))
    assert {"base", "one-size DPO", "Group-DPO", "KTO"} <= set(figures["summary"])
    assert set(figures["ctr_per_group"]) == {"base", "one-size DPO", "Group-DPO", "KTO"}
    assert {"mean", "mean_sd", "worst", "worst_sd"} <= set(figures["summary"]["KTO"])
    assert all("KTO" in row for row in figures["per_round"])
    assert all("KTO" in entry for entry in figures["per_group"].values())
    kto = [e for e in figures["rounds_log"] if e["model"] == "KTO"]
    assert len(kto) == 1 and kto[0]["method"] == "kto" and kto[0]["impressions"] > 0
    assert kto[0]["rows"] > 0 and kto[0]["steps"] == 4  # the Group-DPO arm's step budget
    assert figures["per_round"][0]["KTO"] == figures["per_round"][0]["Group-DPO"]  # both start from the base
    assert figures["baselines"]["KTO"]["option"] == "kto" and "verdict" in figures["baselines"]["KTO"]


def test_alignment_baselines_are_checked() -> None:
    from typer.testing import CliRunner

    from bench.alignment import check_baselines
    from cli.main import app

    assert check_baselines("kto, KTO") == ("kto",) and check_baselines(()) == ()
    with pytest.raises(ValueError, match="baselines: unknown baseline 'ppo'; choose from kto"):
        check_baselines(["ppo"])
    result = CliRunner().invoke(app, ["bench", "alignment", "--baselines", "kto,ppo"])
    assert result.exit_code == 2 and "--baselines: unknown baseline 'ppo'" in result.output
    result = CliRunner().invoke(app, ["bench", "streams", "--baselines", "kto"])
    assert result.exit_code == 2 and "are options of `osmf bench alignment`" in result.output


def test_rloo_prompt_renders_as_our_generation_input_and_the_reward_is_the_calibrated_click_head(
        tiny_gmllm) -> None:  # noqa: ANN001
    import copy

    from learner.baselines.rloo import CHAT_TEMPLATE, ClickReward, conversation
    from learner.model.inputs import generation_input

    processor = copy.copy(tiny_gmllm.processor)
    processor.chat_template = CHAT_TEMPLATE
    turn = conversation(PREFIX["mugs/g0"], PRODUCTS["mug-0"])
    assert processor.apply_chat_template(turn, tokenize=False) == generation_input(PREFIX["mugs/g0"], PRODUCTS["mug-0"])
    assert tiny_gmllm.processor.chat_template is None  # the model's own processor is untouched
    (good,) = _creatives(1)
    reward = ClickReward(tiny_gmllm, PREFIX, PRODUCTS, {"mugs/g0": 0.5})
    values = reward([turn, turn], [[{"role": "assistant", "content": good}], [{"role": "assistant", "content": "bg"}]],
                    group_id=["mugs/g0", "mugs/g0"], product_id=["mug-0", "mug-0"])
    head = tiny_gmllm.click_probability([(PREFIX["mugs/g0"], PRODUCTS["mug-0"], good)])[0]
    assert values[0] == pytest.approx(0.5 * head) and values[1] == 0.0  # an invalid creative earns nothing
    assert (reward.seen, reward.valid) == (2, 1)


def test_an_rloo_fit_runs_on_the_llava_model(tiny_gmllm, one_thread) -> None:  # noqa: ANN001
    from learner.baselines.config import RLOOBaselineConfig
    from learner.baselines.rloo import fit_rloo

    a, b = _creatives(2, seed=5)
    stats = {("mugs/g0", p): {a: CreativeStats(2000, 100), b: CreativeStats(2000, 20)} for p in PRODUCTS}
    policy, reference = tiny_gmllm.copy(), tiny_gmllm.copy()
    fit, extra = fit_rloo(policy, reference, stats, PREFIX, PRODUCTS, DPOSettings(max_steps=2, min_steps=2),
                          RLOOBaselineConfig(num_generations=2, max_completion_length=24))
    assert fit.steps == 2 and fit.pairs == 2 and extra["completions"] >= 4
    assert 0.0 <= extra["valid_share"] <= 1.0
    # calibration: the head's mean over the logged slate times the factor is the slate's observed CTR (0.03)
    items = [(PREFIX["mugs/g0"], PRODUCTS[p], t) for p in sorted(PRODUCTS) for t in sorted((a, b))]
    assert extra["calibration"]["mugs/g0"] * reference.click_probability(items).mean() == pytest.approx(0.03, rel=1e-3)
    # with the serving grammar in TRL's generate call the untrained model's completions parse (all but those
    # cut at the length limit); unconstrained, none did
    assert extra["valid_share"] == 0.0
    policy = tiny_gmllm.copy()
    fit, extra = fit_rloo(policy, reference, stats, PREFIX, PRODUCTS, DPOSettings(max_steps=2, min_steps=2),
                          RLOOBaselineConfig(num_generations=2, max_completion_length=96, constrained=True))
    assert fit.steps == 2 and extra["valid_share"] >= 0.75
    assert "generate" not in policy.model.__dict__  # the adapter is removed after the fit


def test_baseline_settings_are_checked_before_any_work(tmp_path) -> None:  # noqa: ANN001
    from bench.alignment import AlignmentOptions, run

    with pytest.raises(ValueError, match="baseline_settings: rloo not among the baselines run"):
        run(AlignmentOptions(quick=True, output_dir=tmp_path, baselines=("kto",),
                             baseline_settings={"rloo": {"constrained": True}}))
    with pytest.raises(TypeError, match="rows"):
        run(AlignmentOptions(quick=True, output_dir=tmp_path, baselines=("kto",),
                             baseline_settings={"kto": {"rows": 3}}))
    assert not list(tmp_path.iterdir())
