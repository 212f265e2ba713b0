"""``osmf bench alignment --seeds N --rounds R``: on-policy rounds, error bars and the issue's JSON keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

WORLD = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_shared_taste.yaml"


def _small_world(tmp_path: Path) -> Path:
    """The shared-taste world cut to one category and 1,500 users (a quick run in well under a minute)."""
    spec = yaml.safe_load(WORLD.read_text())
    spec["users"]["count"] = 1500
    spec["categories"] = spec["categories"][:1]
    spec["categories"][0]["products"] = 4
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_alignment_reports_mean_and_sd_over_seeds_per_round(tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    from bench.alignment import AlignmentOptions, run

    figures = run(AlignmentOptions(quick=True, world=_small_world(tmp_path), output_dir=tmp_path, seeds=2, rounds=1,
                                   learner={"pretrain": {"impressions": 20_000, "steps": 40},
                                            "dpo": {"max_steps": 10}}))
    assert figures["seeds"] == 2 and figures["rounds"] == 1
    for model in ("base", "one-size DPO", "Group-DPO", "random", "oracle"):
        summary = figures["summary"][model]
        assert {"mean", "mean_sd", "worst", "worst_sd"} <= set(summary)
        assert summary["worst"] <= summary["mean"] + 1e-9 and summary["mean_sd"] >= 0
    assert figures["summary"]["base"]["mean_sd"] == 0  # one deterministic base for every seed
    assert set(figures["lift_over_base"]) == {"mean", "worst"}
    base, group, oracle = (figures["summary"][m]["mean"] for m in ("base", "Group-DPO", "oracle"))
    assert figures["oracle_lift_fraction"] == pytest.approx((group - base) / (oracle - base), abs=1e-3)
    assert [r["round"] for r in figures["per_round"]] == [0, 1]
    assert figures["per_round"][0]["Group-DPO"]["mean"] == pytest.approx(base, abs=1e-5)
    # Two seeds x one round x two arms, each with on-policy pairs mined from the live model's own samples.
    log = figures["rounds_log"]
    assert len(log) == 4 and {e["model"] for e in log} == {"one-size DPO", "Group-DPO"}
    assert all(e["creatives"] >= e["slates"] > 0 for e in log)
    one_size = [e for e in log if e["model"] == "one-size DPO"]
    assert all(set(e["pairs_per_group"]) <= {"backpacks/all"} for e in one_size)  # pooled per category
    for group, entry in figures["per_group"].items():
        assert {"above_base_1sd", "above_one_size_1sd"} <= set(entry) and entry["Group-DPO"]["sd"] >= 0
    assert set(figures["goals"]) == {"lift_mean_ge_10pct", "lift_worst_ge_0", "worst_ge_1.1x_one_size",
                                     "oracle_lift_fraction_ge_0.5"}


def test_one_size_reads_category_features_in_the_group_format(tmp_path: Path) -> None:
    from bench.alignment import category_features
    from sim.logs import traffic_from_world
    from sim.world import World

    log, _ = traffic_from_world(World.load(_small_world(tmp_path)), n_impressions=3000, seed=0)
    features = category_features(log)
    assert list(features) == ["backpacks/all"]
    text = features["backpacks/all"].to_text()
    assert text.startswith("group backpacks/all | 100% of backpacks | ctr ") and "| likes " in text


def test_seeds_and_rounds_are_alignment_options_only() -> None:
    from cli.main import app

    result = CliRunner().invoke(app, ["bench", "pretrain", "--rounds", "2"])
    assert result.exit_code == 2 and "osmf bench alignment" in result.output


def test_a_frozen_scorer_reranks_the_candidates(tiny_gmllm, tiny_log) -> None:  # noqa: ANN001
    import torch

    from infra.settings import GenerationSettings
    from learner.evaluate import choose_creative

    other = tiny_gmllm.copy()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in other.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    product = tiny_log.products["mug-0"]
    settings = GenerationSettings(candidates=6)
    own = choose_creative(tiny_gmllm, "group mugs/g0", product, settings, seed=3)
    frozen = choose_creative(tiny_gmllm, "group mugs/g0", product, settings, seed=3, scorer=other)
    texts = [c.text for c in own.candidates if c.prompt is not None]
    assert [c.text for c in frozen.candidates] == [c.text for c in own.candidates]  # same samples ...
    expected = other.click_probability([("group mugs/g0", product, t) for t in texts]).tolist()
    assert frozen.scores == expected  # ... scored by the other model's click head
    assert frozen.prompt.to_text() == texts[int(max(range(len(expected)), key=expected.__getitem__))]
