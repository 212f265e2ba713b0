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
