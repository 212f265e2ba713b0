"""Logged traffic as the learner reads it: products, users, and one record per impression.

The learner never sees the simulator or the stream worker. Whoever produces
training data (``sim/logs.py`` from a simulated world or an event log)
writes a :class:`TrafficLog`, a plain directory::

    log.json             format version and counts
    products.jsonl       one product a line: id, category, title, price, image file or null
    images/<id>.png      product images (RGBA cut-outs), when known
    users.jsonl.gz       one user a line: id and attributes
    traffic.jsonl.gz     one impression a line: ts, user, group, category, product, prompt, clicked

Group ids are those the stream worker's grouping assigned (e.g.
``lipstick/g2``); a prompt is the canonical creative-prompt text of
``infra/contracts/prompt.py`` or null when unknown (replayed logs).

>>> log = TrafficLog(
...     products={"p1": ProductRecord("p1", "mugs", "Enamel mug", 9.5)},
...     users={"u1": {"age": "18-24"}},
...     records=[TrafficRecord(0, "u1", "mugs/g0", "mugs", "p1", 'background=solid; palette=red,white; '
...              'position=center; scale=0.5; copy=""; style=', True)])
>>> cell = log.cells()[("mugs/g0", "p1", log.records[0].prompt)]
>>> (cell.impressions, cell.clicks)
(1, 1)
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

FORMAT_VERSION = 1
"""Version of the directory layout written by :meth:`TrafficLog.save`."""

AttributeValue = str | int | float | bool | None


class TrafficError(ValueError):
    """A traffic log directory is missing, incomplete or of another format; the message says which file."""


@dataclass(frozen=True)
class ProductRecord:
    """A product as the learner sees it: text, price and (when known) its image cut-out."""

    id: str
    category: str
    title: str
    price: float | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    def rgb_image(self, size: int | None = None) -> Image.Image:
        """The product image on a white background (grey placeholder when unknown), RGB."""
        if self.image is None:
            base = Image.new("RGB", (size or 64, size or 64), (128, 128, 128))
        else:
            rgba = self.image.convert("RGBA")
            base = Image.new("RGB", rgba.size, (255, 255, 255))
            base.paste(rgba, (0, 0), rgba)
        return base if size is None else base.resize((size, size), Image.Resampling.BICUBIC)


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    """One logged impression: who (user and group) saw which creative of which product, and the click."""

    ts: int
    user_id: str
    group_id: str
    category: str
    product_id: str
    prompt: str | None
    clicked: bool


@dataclass
class Cell:
    """Impressions and clicks of one (group, product, prompt)."""

    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        """Clicks per impression (0 when never shown)."""
        return self.clicks / self.impressions if self.impressions else 0.0


@dataclass
class TrafficLog:
    """Products, users and impression records: what pre-training reads."""

    products: dict[str, ProductRecord]
    users: dict[str, dict[str, AttributeValue]]
    records: list[TrafficRecord]
    meta: dict[str, Any] = field(default_factory=dict)

    def cells(self, records: Iterable[TrafficRecord] | None = None) -> dict[tuple[str, str, str], Cell]:
        """Impressions and clicks per (group, product, prompt); records without a prompt are left out."""
        cells: dict[tuple[str, str, str], Cell] = {}
        for record in self.records if records is None else records:
            if record.prompt is None:
                continue
            key = (record.group_id, record.product_id, record.prompt)
            cell = cells.get(key)
            if cell is None:
                cell = cells[key] = Cell()
            cell.impressions += 1
            cell.clicks += record.clicked
        return cells

    def groups(self) -> list[str]:
        """Group ids seen in the records, sorted."""
        return sorted({record.group_id for record in self.records})

    def subset(self, records: list[TrafficRecord]) -> TrafficLog:
        """The same products and users with other records (e.g. a held-out window)."""
        return TrafficLog(self.products, self.users, records, dict(self.meta))

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> Path:
        """Write the log as a directory (see the module docstring), atomically: all of it or nothing."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            (tmp / "images").mkdir()
            with open(tmp / "products.jsonl", "w", encoding="utf-8") as out:
                for product in self.products.values():
                    image_file = None
                    if product.image is not None:
                        image_file = f"images/{_safe_name(product.id)}.png"
                        product.image.save(tmp / image_file)
                    row = {"id": product.id, "category": product.category, "title": product.title,
                           "price": product.price, "image": image_file}
                    out.write(json.dumps(row) + "\n")
            _write_gz(tmp / "users.jsonl.gz", ({"id": uid, "attributes": a} for uid, a in self.users.items()))
            _write_gz(
                tmp / "traffic.jsonl.gz",
                ([r.ts, r.user_id, r.group_id, r.category, r.product_id, r.prompt, int(r.clicked)]
                 for r in self.records),
            )
            info = {"format": FORMAT_VERSION, "products": len(self.products), "users": len(self.users),
                    "records": len(self.records), "meta": self.meta,
                    "columns": ["ts", "user_id", "group_id", "category", "product_id", "prompt", "clicked"]}
            (tmp / "log.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path) -> TrafficLog:
        """Read a directory written by :meth:`save`; raise :class:`TrafficError` naming what is wrong."""
        root = Path(directory)
        info_file = root / "log.json"
        if not info_file.is_file():
            raise TrafficError(f"{root}: not a traffic log (no log.json); write one with TrafficLog.save")
        info = json.loads(info_file.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT_VERSION:
            raise TrafficError(f"{info_file}: format {info.get('format')!r}, this build reads {FORMAT_VERSION}")
        products: dict[str, ProductRecord] = {}
        for row in _read_lines(root / "products.jsonl", gz=False):
            image = None
            if row.get("image"):
                with Image.open(root / row["image"]) as opened:
                    image = opened.convert("RGBA")
            products[row["id"]] = ProductRecord(row["id"], row["category"], row["title"], row.get("price"), image)
        users = {row["id"]: row["attributes"] for row in _read_lines(root / "users.jsonl.gz", gz=True)}
        records = [
            TrafficRecord(int(ts), user, group, category, product, prompt, bool(clicked))
            for ts, user, group, category, product, prompt, clicked in _read_lines(root / "traffic.jsonl.gz", gz=True)
        ]
        return cls(products, users, records, dict(info.get("meta") or {}))


def _safe_name(product_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in product_id)


def _write_gz(path: Path, rows: Iterable[Any]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as out:
        for row in rows:
            out.write(json.dumps(row, separators=(",", ":")) + "\n")


def _read_lines(path: Path, gz: bool) -> Iterator[Any]:
    if not path.is_file():
        raise TrafficError(f"{path}: missing; the traffic log directory is incomplete")
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8") as lines:  # type: ignore[operator]
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrafficError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
