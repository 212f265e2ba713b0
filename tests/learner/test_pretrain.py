"""Pre-training: the task pools, losses per task, the loss plot, and that generation learns a group's taste."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from infra.settings import LearnerSettings, PretrainSettings
from features.group import creative_attributes
from learner.model.gmllm import GMLLM
from learner.pretrain import (
    Pretrainer,
    plot_losses,
    prepare_data,
    pretrain,
    pretraining_corpus,
    split_holdout,
    write_run,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _primary_share(pool, group: str, colour: str) -> float:  # noqa: ANN001
    mass = Counter()
    for (g, _, prompt), weight in zip(pool.items, pool.weights):
        if g == group:
            mass[creative_attributes(prompt)[1] == f"primary={colour}"] += weight
    return mass[True] / (mass[True] + mass[False])


def test_pools_weight_what_each_group_clicked(tiny_log) -> None:  # noqa: ANN001
    data = prepare_data(tiny_log, PretrainSettings(feature_snapshots=3))
    assert set(data.pools) == {"group", "click", "product", "generate"}
    assert len(data.snapshots) == 3 and data.snapshot_weights.sum() == pytest.approx(1.0)
    generate = data.pools["generate"]
    assert _primary_share(generate, "mugs/g0", "pink") > 0.8  # shown a third of the time
    assert _primary_share(generate, "mugs/g1", "navy") > 0.8
    flat = prepare_data(tiny_log, PretrainSettings(feature_snapshots=1, generate_sharpness=0)).pools["generate"]
    assert 0.25 < _primary_share(flat, "mugs/g0", "pink") < 0.42  # sharpness 0 keeps the logged mix
    targets = np.array([item[3] for item in data.pools["click"].items])
    assert ((targets >= 0) & (targets <= 1)).all()
    assert data.pools["click"].weights.sum() == pytest.approx(1.0)


def test_split_holdout_keeps_the_last_records_by_time(tiny_log) -> None:  # noqa: ANN001
    train, held = split_holdout(tiny_log, 0.25)
    assert len(held.records) == len(tiny_log.records) // 4
    assert max(r.ts for r in train.records) < min(r.ts for r in held.records)


def test_pretraining_lowers_every_loss_and_writes_the_run(tiny_log, tiny_model, tmp_path: Path) -> None:  # noqa: ANN001
    settings = LearnerSettings(
        model=tiny_model,
        pretrain={"steps": 80, "batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 5, "log_every": 10,
                  "feature_snapshots": 2},
    )
    seen = []
    gmllm, data, result = pretrain(tiny_log, settings, on_step=lambda step, task, loss: seen.append((step, task)))
    assert [s for s, _ in seen] == list(range(1, 81)) and {t for _, t in seen} == {"group", "click", "product", "generate"}
    first, last = result.first_losses(), result.final_losses()
    assert set(first) == set(last) == {"group", "click", "product", "generate"}
    for task in ("group", "product", "generate"):
        assert last[task] < 0.9 * first[task], (task, first[task], last[task])
    assert last["click"] < first["click"]
    assert result.steps_per_s > 0 and result.peak_rss_mb > 0
    files = write_run(tmp_path / "run", gmllm, result, {"note": "tiny"})
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert GMLLM.load(files["model"]).info["pretrain"]["note"] == "tiny"
    assert (tmp_path / "run" / "history.json").is_file() and (tmp_path / "run" / "summary.json").is_file()


def test_prompt_generation_learns_each_groups_taste(tiny_log, tiny_model) -> None:  # noqa: ANN001
    settings = PretrainSettings(steps=120, batch_size=16, learning_rate=5e-3, warmup_steps=10,
                                tasks={"generate": 1.0}, generate_sharpness=3.0, feature_snapshots=1)
    data = prepare_data(tiny_log, settings)
    gmllm = GMLLM.build(tiny_model, corpus=pretraining_corpus(tiny_log, data.snapshots), seed=0)
    Pretrainer(gmllm, data, settings).train()
    product = tiny_log.products["mug-0"]
    share = {}
    for group, colour in (("mugs/g0", "pink"), ("mugs/g1", "navy")):
        made = gmllm.generate(data.features[group], product, n=24, seed=0, temperature=1.0)
        assert all(g.valid for g in made)
        share[group] = sum(g.prompt.palette[0] == colour for g in made) / len(made)
    assert share["mugs/g0"] > 0.6 and share["mugs/g1"] > 0.6, share  # logged: a third each


def test_loss_plot_is_a_png(tmp_path: Path) -> None:
    from learner.pretrain import PretrainResult

    result = PretrainResult(steps=2, seconds=1.0, history=[{"step": 1, "loss": {"click": 0.7, "group": 3.0}},
                                                          {"step": 2, "loss": {"click": 0.6}}])
    path = plot_losses(result, tmp_path / "p" / "loss.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
