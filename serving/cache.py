"""Content-addressed creative cache with an index: PNGs by sha256, slates by (version, group, product).

``<cache_dir>/png/<sha[:2]>/<sha>.png`` holds each rendered image once, whatever
slates share it; ``<cache_dir>/index.jsonl`` appends one line per generated
slate. A restarted client reloads the slates of the live version from the
index, so ad requests are served from the first call.

Why not (only) Triton's response cache: the hot path must not wait for a
server round trip at all (p99 goal 10 ms with generation taking far longer),
the slate must survive a version switch until the new one is generated, and
``creative``'s responses depend on the group's version, which a cache keyed on
``creative``'s inputs would not see change (docs/serving.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CachedCreative:
    """One creative of a slate."""

    creative_id: str
    prompt: str
    sha256: str
    png: bytes


@dataclass(frozen=True)
class CachedSlate:
    """K creatives for one (group, product) from one model version."""

    version: int
    group_id: str
    product_id: str
    creatives: tuple[CachedCreative, ...]


def creative_id(png_sha: str) -> str:
    """The creative id: content-addressed, so the same image is the same creative everywhere."""
    return f"cr-{png_sha[:20]}"


class SlateCache:
    """Slates in memory (the hot path) backed by content-addressed files and an append-only index."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._slates: dict[tuple[str, str], CachedSlate] = {}
        self._lock = threading.Lock()
        if root is not None:
            (root / "png").mkdir(parents=True, exist_ok=True)

    def get(self, group_id: str, product_id: str) -> CachedSlate | None:
        return self._slates.get((group_id, product_id))

    def pairs(self) -> list[tuple[str, str]]:
        return list(self._slates)

    def put(self, version: int, group_id: str, product_id: str, items: list[tuple[str, bytes]]) -> CachedSlate:
        """Store a slate of (prompt, png) items; returns it."""
        creatives = []
        for prompt, png in items:
            sha = hashlib.sha256(png).hexdigest()
            if self.root is not None:
                path = self.root / "png" / sha[:2] / f"{sha}.png"
                if not path.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{sha}.{threading.get_ident()}.tmp")
                    tmp.write_bytes(png)
                    os.replace(tmp, path)
            creatives.append(CachedCreative(creative_id(sha), prompt, sha, png))
        slate = CachedSlate(version, group_id, product_id, tuple(creatives))
        with self._lock:
            self._slates[(group_id, product_id)] = slate
            if self.root is not None:
                line = {"version": version, "group": group_id, "product": product_id,
                        "creatives": [{"prompt": c.prompt, "sha256": c.sha256} for c in creatives]}
                with open(self.root / "index.jsonl", "a") as handle:
                    handle.write(json.dumps(line) + "\n")
        return slate

    def load(self, version: int, group_versions: Mapping[str, int] | None = None) -> int:
        """Reload the indexed slates of ``version``, or of ``group_versions[group]`` for the groups it names (the
        newest line per pair wins); returns how many."""
        if self.root is None or not (self.root / "index.jsonl").is_file():
            return 0
        found: dict[tuple[str, str], dict] = {}
        for raw in (self.root / "index.jsonl").read_text().splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if line.get("version") == (group_versions or {}).get(line.get("group"), version):
                found[(line["group"], line["product"])] = line
        loaded = 0
        for (group, product), line in found.items():
            creatives = []
            for item in line["creatives"]:
                path = self.root / "png" / item["sha256"][:2] / f"{item['sha256']}.png"
                if not path.is_file():
                    break
                creatives.append(CachedCreative(creative_id(item["sha256"]), item["prompt"], item["sha256"],
                                                path.read_bytes()))
            else:
                with self._lock:
                    self._slates[(group, product)] = CachedSlate(int(line["version"]), group, product, tuple(creatives))
                loaded += 1
        return loaded
