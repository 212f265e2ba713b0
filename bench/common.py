"""What every benchmark shares: the result line and a summary table."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from infra.settings import QUICK_MODEL  # noqa: F401 - the quick benchmarks' model, re-exported


@dataclass(frozen=True)
class BenchOptions:
    """Options of ``osmf bench NAME``: ``quick`` finishes in under a minute; ``world`` is a world YAML."""

    quick: bool = False
    world: Path | None = None
    output_dir: Path = Path("data/bench")


class Benchmark(Protocol):
    """A benchmark module exposes ``run(options) -> dict`` returning its figures."""

    def run(self, options: BenchOptions) -> dict[str, Any]: ...


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A summary table on stderr, so stdout's last line stays the JSON result."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and CI: don't squeeze group names
    console.print(table)


def emit_result(name: str, figures: Mapping[str, Any]) -> None:
    """Print the one JSON line that ends every benchmark."""
    sys.stdout.write(json.dumps({"bench": name, **figures}, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pretrained_base(world: Any, world_file: Path, settings: Any, output_dir: Path) -> tuple[Any, Any, Any, Any]:
    """The G-MLLM pre-trained on ``world``'s simulated log: ``(base, group features, traffic log, grouper)``.

    The base is cached under ``output_dir`` as ``alignment-base-<key>`` (:func:`base_key`) and reused by
    every benchmark that simulates the same world with the same model and pre-training settings.
    """
    from rich.progress import Progress

    from features.group import read_group_features
    from learner.model.gmllm import GMLLM
    from learner.pretrain import pretrain
    from sim.logs import traffic_from_world

    p = settings.pretrain
    cache = output_dir / f"alignment-base-{base_key(world_file, settings)}"
    with Progress(transient=True) as progress:
        task = progress.add_task(f"simulating {p.impressions:,} impressions ({world.name})", total=None)
        log, grouper = traffic_from_world(world, n_impressions=p.impressions, seed=p.traffic_seed,
                                          creatives_per_product=p.creatives_per_product)
        if (cache / "manifest.json").is_file():
            progress.console.print(f"reusing the pre-trained base of this world and configuration: {cache}")
            return GMLLM.load(cache), read_group_features(log), log, grouper
        progress.update(task, description="pre-training the base", total=p.steps, completed=0)
        base, data, _ = pretrain(log, settings, lambda step, *_: progress.update(task, completed=step))
        base.save(cache)
    return base, data.features, log, grouper


def base_key(world_file: Path, settings: Any) -> str:
    """Cache key of a pre-trained base: the world file's bytes and the model and pre-training settings."""
    import hashlib

    blob = json.dumps([settings.model.model_dump(mode="json"), settings.pretrain.model_dump(mode="json")],
                      sort_keys=True).encode()
    return hashlib.sha256(world_file.read_bytes() + blob).hexdigest()[:12]
