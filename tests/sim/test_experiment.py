"""The online experiment (issue 13, part 3): arms split by user hash, per-group CTR with intervals, plots."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from sim.experiment import ExperimentOptions, arm_of, run_experiment, write_report

WORLD = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_shared_taste.yaml"


def test_quick_experiment_splits_traffic_and_reports(tmp_path: Path) -> None:
    options = ExperimentOptions(world_file=WORLD, minutes=1.5, seed=3, rate=200, round_every_min=0.5,
                                min_impressions=30, quick=True, cache_dir=tmp_path / "bases")
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
    for path in paths[1:]:
        assert path.suffix == ".png" and path.stat().st_size > 1000


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
