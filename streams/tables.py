"""Read a worker table from outside the worker: replay its changelog topic, last value per key."""

from __future__ import annotations

import json
from typing import Any

from infra.kafka import consume_all


def changelog_topic(app_id: str, table: str) -> str:
    """Name of the changelog topic Faust keeps for ``table`` of app ``app_id``."""
    return f"{app_id}-{table}-changelog"


def read_table(bootstrap: str, app_id: str, table: str) -> dict[Any, Any]:
    """Current content of a worker table (JSON keys and values; deletions applied)."""
    rows: dict[Any, Any] = {}
    for record in consume_all(bootstrap, [changelog_topic(app_id, table)]):
        key = json.loads(record.key) if record.key else None
        if not record.value:
            rows.pop(key, None)
        else:
            rows[key] = json.loads(record.value)
    return rows
