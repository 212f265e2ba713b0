"""The online experiment (issue 13, part 3): arms split by user hash, per-group CTR with intervals, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import sim.experiment
from cli.main import app
from learner.gate import GroupFigures
from sim.experiment import ExperimentOptions, arm_of, run_experiment, write_report

WORLD = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_shared_taste.yaml"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pre-trained base cache for the module's runs (same world and quick settings)."""
    return tmp_path_factory.mktemp("bases")


def test_quick_experiment_splits_traffic_and_reports(tmp_path: Path, bases: Path) -> None:
    options = ExperimentOptions(world_file=WORLD, minutes=1.5, seed=3, rate=200, round_every_min=0.5,
                                min_impressions=30, quick=True, cache_dir=bases,
                                learner={"loop": {"promotion": "model"}})
    report = run_experiment(options)
    paths = write_report(report, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert data["arms"] == ["base", "one-size", "group-dpo"]
    for arm in data["arms"]:
        result = data["results"][arm]
        assert result["impressions"] > 0
        for group in data["groups"]:
            row = result["per_group"][group]
            assert row["impressions"] > 0 and 0 <= row["ctr"] <= 1
            low, high = row["ci95"]
            assert low <= row["ctr"] <= high
        assert result["worst_group"] in data["groups"] and result["worst_ci95"][0] <= result["worst_ctr"]
    assert set(data["oracle_ctr"]) == set(data["groups"])
    # each user sits in exactly one arm, the one its hash names
    assert data["users_in_several_arms"] == 0
    total_users = sum(data["results"][a]["users"] for a in data["arms"])
    assert total_users > 0
    assert {arm_of("u-1", ("base", "one-size", "group-dpo"), 3) for _ in range(3)} == \
        {arm_of("u-1", ("base", "one-size", "group-dpo"), 3)}
    # the base arm is never retrained
    base = data["results"]["base"]
    assert [v["version"] for v in base["versions"]] == ["base-v0"] and base["rounds"] == []
    assert len(data["results"]["group-dpo"]["rounds"]) >= 2
    # model-level promotion: one version serves every target of an arm
    for arm in data["arms"]:
        result = data["results"][arm]
        assert set(result["version_impressions"]) <= {v["version"] for v in result["versions"]}
        assert set(result["live_versions"].values()) == {result["versions"][-1]["version"]}
    for path in paths[1:]:
        assert path.suffix == ".png" and path.stat().st_size > 1000


def test_group_promotion_puts_a_candidate_live_for_the_targets_it_raises(
        tmp_path: Path, bases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a scripted gate judge: the base scores 0.02 everywhere; any fitted model raises the first group it is
    # judged on (0.03) and lowers the others (0.01), so the first fit passes exactly the first group's target
    base_ids: set[int] = set()

    def scripted(judge: Any, model: Any, one_size: bool = False) -> dict[str, GroupFigures]:
        base_ids.add(id(model)) if not base_ids else None  # the first model judged: every arm's base
        groups = judge.groups()
        ctr = {g: 0.02 if id(model) in base_ids else (0.03 if g == groups[0] else 0.01) for g in groups}
        return {g: GroupFigures(g, 0, 0.5, 0.0, ctr=c) for g, c in ctr.items()}

    monkeypatch.setattr(sim.experiment, "judged", scripted)
    options = ExperimentOptions(world_file=WORLD, arms=("one-size", "group-dpo"), minutes=2.0, seed=3, rate=200,
                                round_every_min=0.5, min_impressions=30, quick=True, cache_dir=bases,
                                learner={"loop": {"promotion": "group", "lineage": "version"}})
    report = run_experiment(options)
    write_report(report, tmp_path / "out")
    groups = report["groups"]  # one version's groups fitted together (lineage=version), across categories
    assert report["settings"]["promotion"] == "group" and len(groups) >= 2
    arm = report["results"]["group-dpo"]
    first = next(r for r in arm["rounds"] if r["pairs"])  # round 2 (deterministic until a version goes live)
    assert first["from_versions"] == dict.fromkeys(groups, "group-dpo-v0")
    assert [x["targets"] for x in first["lineages"]] == [groups]
    # live for the first group only; the others keep the base
    assert first["promoted_targets"] == [groups[0]] and "only" in first["lineages"][0]["reason"]
    assert arm["versions"][:2] == [
        {"version": "group-dpo-v0", "live_ts_s": 0.0, "round": 0, "targets": groups},
        {"version": "group-dpo-v1", "live_ts_s": first["live_ts_s"], "round": first["round"],
         "targets": [groups[0]]}]
    # the next round fits two lineages, each from its own version
    second = arm["rounds"][first["round"]]
    assert second["from_versions"] == {groups[0]: "group-dpo-v1"} | dict.fromkeys(groups[1:], "group-dpo-v0")
    assert [(x["targets"], x["from_version"]) for x in second["lineages"]] == [
        ([groups[0]], "group-dpo-v1"), (groups[1:], "group-dpo-v0")]
    # v1's own lineage never beats it (scripted: equal figures), so the first group keeps v1; impressions carry
    # the version of their target
    assert arm["live_versions"][groups[0]] == "group-dpo-v1"
    assert arm["version_impressions"]["group-dpo-v1"] > 0 and arm["version_impressions"]["group-dpo-v0"] > 0
    assert set(arm["version_impressions"]) <= {v["version"] for v in arm["versions"]}
    # one-size: targets are categories, judged on every group of theirs
    for round_ in report["results"]["one-size"]["rounds"]:
        assert all(t.endswith("/all") for x in round_["lineages"] for t in x["targets"])


def test_bad_arms_and_bad_world_are_one_line_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["experiment", "--world", str(WORLD), "--arms", "base,bogus"])
    assert result.exit_code == 2 and "bogus" in result.output and len(result.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\ncategories: 3\n")
    result = runner.invoke(app, ["experiment", "--world", str(bad)])
    assert result.exit_code == 2 and result.output.startswith("error:")
    result = runner.invoke(app, ["experiment", "--world", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "no such file" in result.output
