"""The alignment benchmark runs end to end on a world it has never seen."""

from __future__ import annotations

from pathlib import Path

import yaml

from bench.common import BenchOptions

WORLD_B = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_b.yaml"


def _unseen_world(tmp_path: Path) -> Path:
    """World B cut down to one renamed category with two segments and another seed."""
    spec = yaml.safe_load(WORLD_B.read_text())
    category = spec["categories"][0]
    category["name"] = "kettles"
    category["products"] = 6
    category["segments"] = category["segments"][:2]
    total = sum(s["share"] for s in category["segments"])
    for segment in category["segments"]:
        segment["share"] = segment["share"] / total
    spec.update(name="world_unseen", seed=97, categories=[category])
    path = tmp_path / "unseen.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_alignment_quick_on_an_unseen_world(tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    from bench.alignment import run

    figures = run(BenchOptions(quick=True, world=_unseen_world(tmp_path), output_dir=tmp_path))
    assert figures["world"] == "world_unseen" and figures["groups"] >= 1
    assert set(figures["ctr_per_group"]["base"]) == set(figures["oracle_ctr_per_group"])
    for group, oracle in figures["oracle_ctr_per_group"].items():
        assert 0 < figures["random_ctr_per_group"][group] <= oracle
    if figures["pairs_train"]:
        assert set(figures["ctr_per_group"]) == {"base", "one-size DPO", "Group-DPO"}
        assert figures["summary"]["Group-DPO"]["worst"] <= figures["summary"]["Group-DPO"]["mean"]
    else:
        assert "note" in figures
    assert (tmp_path / "alignment-quick.png").stat().st_size > 0
