"""The learner's round log: one JSON object per training round, appended to a file the dashboard reads."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    """What one training round saw, did and decided."""

    round: int
    started_at: float
    data_window: tuple[int, int]
    pairs_per_group: dict[str, int]
    heldout_pairs: int
    losses: list[float]
    gate: dict[str, Any]
    decision: str
    version: int | None
    reference_version: int | None
    training: dict[str, Any] = field(default_factory=dict)
    pairs_left_out: dict[str, int] = field(default_factory=dict)
    finished_at: float = field(default_factory=time.time)


def append_round(path: Path, record: RoundRecord) -> None:
    """Append ``record`` as one JSON line (flushed and fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(asdict(record), default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """Every round logged so far (a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rounds
