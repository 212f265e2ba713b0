"""The ``group-dpo`` benchmark: both trainers run the same steps and every figure is there and sane."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from bench.common import BenchOptions
from bench.group_dpo import PeakRSS, _order, _steady_rate, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_compares_both_trainers_on_the_same_steps(tmp_path: Path) -> None:
    figures = run(BenchOptions(quick=True, output_dir=tmp_path))
    assert figures["steps_group"] == figures["steps_trl"] == figures["steps"] > 0
    assert figures["pairs"] > 0 and figures["groups"] >= 2 and figures["parameters"] > 0
    for key in ("samples_per_s_group", "samples_per_s_trl", "samples_per_s_group_fit", "samples_per_s_trl_fit",
                "samples_per_s_group_median", "samples_per_s_trl_median"):
        assert figures[key] > 0 and math.isfinite(figures[key]), key
    for key in ("ratio", "ratio_median", "ratio_fit", "peak_mb_ratio"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["goal_ratio"] == 0.9
    assert figures["peak_mb_group"] > 0 and figures["peak_mb_trl"] > 0
    assert figures["peak_rss_mb_group"] >= figures["peak_mb_group"]
    runs = figures["runs"]
    assert [r["trainer"] for r in runs] == figures["order"] == _order(figures["repeats"])
    assert all(r["steps"] == figures["steps"] and r["loss_last"] is not None for r in runs)
    # every fit starts from the same weights: repeats of one trainer train alike
    for name in ("group", "trl"):
        assert len({(r["loss_first"], r["loss_last"]) for r in runs if r["trainer"] == name}) == 1
    saved = json.loads(Path(figures["result_file"]).read_text())
    assert saved["ratio"] == figures["ratio"] and len(saved["runs"]) == len(runs)


def test_order_alternates_who_goes_first() -> None:
    assert _order(3) == ["trl", "group", "group", "trl", "trl", "group"]


def test_steady_rate_skips_the_warm_up_steps() -> None:
    stamps = [(1, 0.0), (2, 5.0), (3, 6.0), (4, 7.0), (5, 8.0)]
    assert _steady_rate(stamps, batch_size=8) == pytest.approx(2 * 8 / 2.0)
    assert _steady_rate(stamps[:3], batch_size=8) is None


def test_peak_rss_sees_a_short_lived_allocation() -> None:
    with PeakRSS() as memory:
        block = bytearray(64 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
        del block
    assert memory.growth_mb > 50


def test_peak_rss_falls_back_to_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    import bench.group_dpo as module

    def no_clear_refs(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path).endswith("clear_refs"):
            raise PermissionError(path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(module, "open", no_clear_refs, raising=False)
    with PeakRSS() as memory:
        block = bytearray(64 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])
        time.sleep(0.1)
        del block
    assert memory.method == "sampled" and memory.growth_mb > 50
