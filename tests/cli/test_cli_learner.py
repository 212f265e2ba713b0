"""`osmf learner`: help texts, a tiny pre-training run end to end, sampling from it, and its error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()

TINY_ENV = {
    "OSMF_LEARNER__MODEL__VOCAB_SIZE": "500",
    "OSMF_LEARNER__MODEL__HIDDEN_SIZE": "32",
    "OSMF_LEARNER__MODEL__LAYERS": "1",
    "OSMF_LEARNER__MODEL__HEADS": "2",
    "OSMF_LEARNER__MODEL__INTERMEDIATE_SIZE": "64",
    "OSMF_LEARNER__MODEL__VISION_HIDDEN_SIZE": "16",
    "OSMF_LEARNER__MODEL__VISION_LAYERS": "1",
    "OSMF_LEARNER__MODEL__IMAGE_SIZE": "16",
    "OSMF_LEARNER__PRETRAIN__BATCH_SIZE": "4",
    "OSMF_LEARNER__PRETRAIN__FEATURE_SNAPSHOTS": "1",
    "OSMF_LEARNER__GENERATION__MAX_NEW_TOKENS": "96",
}


@pytest.fixture
def tiny_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("OSMF_CONFIG",):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("OSMF_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in TINY_ENV.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def test_help_explains_every_option() -> None:
    result = runner.invoke(app, ["learner", "pretrain", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--world", "--traffic", "--events", "--impressions", "--creatives-per-product", "--steps",
                   "--batch-size", "--learning-rate", "--tasks", "--seed", "--holdout", "--out", "--save-traffic"):
        assert option in result.output
    assert "group analysis" in result.output
    assert runner.invoke(app, ["learner", "--help"]).exit_code == 0
    assert "pretrain" in runner.invoke(app, ["bench", "list"]).output


def test_tiny_pretraining_run_writes_model_plot_summary_and_samples(tiny_env: Path) -> None:
    result = runner.invoke(
        app, ["learner", "pretrain", "--impressions", "3000", "--creatives-per-product", "2", "--steps", "6",
              "--tasks", "click=1,generate=1,group=0.5,product=0.5"],
    )
    assert result.exit_code == 0, result.output
    run = tiny_env / "learner" / "pretrain"
    assert (run / "model" / "manifest.json").is_file() and (run / "loss.png").is_file()
    assert (run / "traffic" / "log.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["constrained_parse_rate"] == 1.0
    assert 0 <= summary["raw_parse_rate"] <= 1 and summary["tasks"]["click"] == 1.0
    assert "pre-training summary" in result.output and "held-out click AUC" in result.output
    assert result.output.strip().splitlines()[-1] == str(run / "model")

    sampled = runner.invoke(app, ["learner", "generate", "--count", "2", "--seed", "3"])
    assert sampled.exit_code == 0, sampled.output
    lines = sampled.output.strip().splitlines()
    assert lines and all(len(line.split("\t")) == 3 and "background=" in line for line in lines)
    assert runner.invoke(app, ["learner", "generate", "--count", "2", "--seed", "3"]).output == sampled.output

    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    tampered = runner.invoke(app, ["learner", "generate"])
    assert tampered.exit_code == 2 and "sha256 does not match" in tampered.output


def test_user_errors_are_one_line_with_exit_2(tiny_env: Path) -> None:
    missing = runner.invoke(app, ["learner", "pretrain", "--traffic", str(tiny_env / "nope")])
    assert missing.exit_code == 2 and "not a traffic log" in missing.output
    bad_tasks = runner.invoke(app, ["learner", "pretrain", "--tasks", "click=0,generate=0"])
    assert bad_tasks.exit_code == 2 and "task weights" in bad_tasks.output
    unknown = runner.invoke(app, ["learner", "pretrain", "--tasks", "dance=1"])
    assert unknown.exit_code == 2 and "tasks" in unknown.output
    no_run = runner.invoke(app, ["learner", "generate"])
    assert no_run.exit_code == 2 and "run `osmf learner pretrain` first" in no_run.output
