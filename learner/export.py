"""Export the grouped preference data behind each model version as a parquet dataset.

``osmf export pairs --out DIR`` (``cli/export.py``) calls :func:`export_pairs`:

1. read the preference-pairs topic whole (``infra.kafka.consume_all``); a
   message that does not parse is counted and skipped;
2. keep one pair per (group, product, winner, loser), the one with the most
   evidence, as the learner's replay buffer does (:class:`learner.buffer.PairBuffer`),
   and mark each ``train`` or ``heldout`` with the buffer's own hash split;
3. join the group's features (the learner's source: the Feast online store
   when it is applied, else the traffic log of the base run) and the product
   (title, price, image file of the catalogue);
4. link each pair to the first logged round whose data window reached it
   (``rounds.jsonl``) and the version that round published;
5. write ``DIR/pairs.parquet`` (schema :data:`SCHEMA`, docs/dashboard.md)
   and ``DIR/export.json`` (what was read, counts, feature source).

The file loads with ``datasets.load_dataset("parquet", data_files="DIR/pairs.parquet")``;
the columns ``prompt``, ``chosen``, ``rejected`` are a TRL DPO row (``images``: open ``image_ref``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.group import GroupFeatures
from infra.contracts.events import EventError
from infra.contracts.messages import PreferencePair, parse_pair
from infra.kafka import consume_all
from infra.settings import Settings
from learner.buffer import PairBuffer
from learner.data import ProductRecord

PAIRS_FILE = "pairs.parquet"
META_FILE = "export.json"

SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("ts", pa.int64()),
    ("group_id", pa.string()),
    ("category", pa.string()),
    ("product_id", pa.string()),
    ("product_title", pa.string()),
    ("product_price", pa.float64()),
    ("image_ref", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("chosen_creative_id", pa.string()),
    ("rejected_creative_id", pa.string()),
    ("chosen_impressions", pa.int64()),
    ("chosen_clicks", pa.int64()),
    ("chosen_ctr", pa.float64()),
    ("rejected_impressions", pa.int64()),
    ("rejected_clicks", pa.int64()),
    ("rejected_ctr", pa.float64()),
    ("prob_chosen_better", pa.float64()),
    ("evidence_level", pa.int64()),
    ("split", pa.string()),
    ("first_round", pa.int64()),
    ("first_version", pa.int64()),
    ("group_text", pa.string()),
    ("group_share", pa.float64()),
    ("group_ctr", pa.float64()),
    ("group_impressions", pa.int64()),
    ("group_clicks", pa.int64()),
    ("group_who", pa.list_(pa.string())),
    ("group_likes", pa.list_(pa.string())),
    ("group_avoids", pa.list_(pa.string())),
    ("group_lift_keys", pa.list_(pa.string())),
    ("group_lift_values", pa.list_(pa.float64())),
])
"""Column layout of ``pairs.parquet`` (documented column by column in docs/dashboard.md)."""

FeaturesFor = Callable[[Sequence[str]], Mapping[str, Any]]


class ExportError(RuntimeError):
    """The export cannot be written; the message names the option and the fix."""


@dataclass
class ExportReport:
    """What one export read and wrote."""

    out: Path
    messages: int = 0
    malformed: int = 0
    rows: int = 0
    groups: int = 0
    without_features: int = 0
    without_product: int = 0
    feature_source: str = ""
    malformed_examples: list[str] = field(default_factory=list)


def read_pairs(bootstrap: str, topic: str, timeout_s: float = 60.0) -> tuple[list[PreferencePair], int, list[str]]:
    """Every pair on ``topic``, the count of messages that did not parse, and up to 5 of their reasons."""
    pairs, bad, reasons = [], 0, []
    for record in consume_all(bootstrap, [topic], timeout_s=timeout_s):
        try:
            pairs.append(parse_pair(record.value))
        except EventError as exc:
            bad += 1
            if len(reasons) < 5:
                reasons.append(f"{record.topic}[{record.partition}]@{record.offset}: {exc}")
    return pairs, bad, reasons


def buffered_pairs(pairs: Sequence[PreferencePair], heldout_fraction: float) -> list[tuple[PreferencePair, str]]:
    """One pair per (group, product, winner, loser) at its highest evidence, oldest first, with its split."""
    buffer = PairBuffer(capacity=max(1, len(pairs)))
    for pair in pairs:
        buffer.add(pair)
    train, heldout = buffer.split(heldout_fraction)
    held = {p.pair_id for p in heldout}
    return [(p, "heldout" if p.pair_id in held else "train") for p in sorted([*train, *heldout], key=lambda p: p.ts)]


def first_rounds(rounds: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, int | None]]:
    """``(data window end ms, round, version or None)`` of each logged round, in round order."""
    out = []
    for entry in sorted(rounds, key=lambda r: int(r.get("round", 0))):
        window = entry.get("data_window") or (0, 0)
        version = entry.get("version") if entry.get("decision") == "promoted" else None
        out.append((int(window[1]), int(entry.get("round", 0)), None if version is None else int(version)))
    return out


def pair_row(
    pair: PreferencePair,
    split: str,
    group: GroupFeatures | None,
    product: ProductRecord | None,
    image_ref: str | None,
    rounds: Sequence[tuple[int, int, int | None]],
) -> dict[str, Any]:
    """One row of :data:`SCHEMA`."""
    from learner.model.inputs import generation_input

    first = next(((r, v) for end, r, v in rounds if pair.ts <= end), (None, None))
    lifts = sorted(group.lifts.items()) if group else []
    return {
        "pair_id": pair.pair_id, "ts": pair.ts, "group_id": pair.group_id, "category": pair.category,
        "product_id": pair.product_id,
        "product_title": product.title if product else None,
        "product_price": product.price if product else None,
        "image_ref": image_ref,
        "prompt": generation_input(group, product) if group and product else None,
        "chosen": pair.winner_prompt, "rejected": pair.loser_prompt,
        "chosen_creative_id": pair.winner_creative_id, "rejected_creative_id": pair.loser_creative_id,
        "chosen_impressions": pair.winner_impressions, "chosen_clicks": pair.winner_clicks,
        "chosen_ctr": pair.winner_ctr,
        "rejected_impressions": pair.loser_impressions, "rejected_clicks": pair.loser_clicks,
        "rejected_ctr": pair.loser_ctr,
        "prob_chosen_better": pair.prob_winner_better, "evidence_level": pair.evidence_level,
        "split": split, "first_round": first[0], "first_version": first[1],
        "group_text": group.to_text() if group else None,
        "group_share": group.share if group else None,
        "group_ctr": group.ctr if group else None,
        "group_impressions": group.impressions if group else None,
        "group_clicks": group.clicks if group else None,
        "group_who": list(group.who) if group else None,
        "group_likes": list(group.likes) if group else None,
        "group_avoids": list(group.avoids) if group else None,
        "group_lift_keys": [k for k, _ in lifts] if group else None,
        "group_lift_values": [float(v) for _, v in lifts] if group else None,
    }


def catalogue_images(traffic: Path | None) -> dict[str, str]:
    """Product id -> absolute path of its image in a traffic log directory (``products.jsonl``)."""
    if traffic is None or not (traffic / "products.jsonl").is_file():
        return {}
    images = {}
    for line in (traffic / "products.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("image"):
            images[row["id"]] = str((traffic / row["image"]).resolve())
    return images


def write_rows(rows: list[dict[str, Any]], out: Path) -> Path:
    """Write ``rows`` as ``out/pairs.parquet`` (atomically: a temporary file renamed into place)."""
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    target = out / PAIRS_FILE
    tmp = out / f".{PAIRS_FILE}.tmp"
    pq.write_table(table, tmp)
    tmp.replace(target)
    return target


def export_pairs(
    settings: Settings,
    out: Path,
    *,
    traffic: Path | None = None,
    history: Path | None = None,
    overwrite: bool = False,
    features_for: FeaturesFor | None = None,
    timeout_s: float = 60.0,
) -> ExportReport:
    """Read the pairs topic and write the grouped preference dataset to ``out`` (see the module docstring).

    ``traffic``: a traffic log directory (the catalogue and the fallback group
    features; default: the base run's, as ``osmf learner run`` finds it);
    ``history``: the round log (default ``<repo>/<model>/rounds.jsonl``);
    ``features_for``: override the group-feature source (tests).
    """
    from learner.history import read_rounds
    from learner.loop import group_feature_source, history_path
    from learner.service import base_paths, model_repository

    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; give a directory (it is created when missing)")
    if (out / PAIRS_FILE).exists() and not overwrite:
        raise ExportError(f"--out {out}: already holds {PAIRS_FILE}; pass --overwrite or choose another directory")
    if traffic is not None and not (traffic / "log.json").is_file():
        raise ExportError(f"--traffic {traffic}: not a traffic log (no log.json); give the traffic/ of a "
                          "pre-training run")
    _, traffic = base_paths(settings, None, traffic)
    products, fallback = _catalogue(traffic)
    source = "given"
    if features_for is None:
        features_for, source = group_feature_source(settings, fallback)
    repo, model = model_repository(settings), settings.learner.loop.model_name
    rounds = first_rounds(read_rounds(history or history_path(repo, model)))

    topic = settings.topics.preference_pairs
    pairs, malformed, reasons = read_pairs(settings.bootstrap_servers, topic, timeout_s)
    kept = buffered_pairs(pairs, settings.learner.loop.heldout_fraction)
    groups = features_for(sorted({p.group_id for p, _ in kept})) if kept else {}
    images = catalogue_images(traffic)
    rows = []
    report = ExportReport(out=out, messages=len(pairs) + malformed, malformed=malformed,
                          feature_source=source, malformed_examples=reasons)
    for pair, split in kept:
        group = groups.get(pair.group_id)
        group = group if isinstance(group, GroupFeatures) else None
        product = products.get(pair.product_id)
        report.without_features += group is None
        report.without_product += product is None
        rows.append(pair_row(pair, split, group, product, images.get(pair.product_id), rounds))
    write_rows(rows, out)
    report.rows, report.groups = len(rows), len({p.group_id for p, _ in kept})
    meta = {
        "written_at": time.time(), "topic": topic, "bootstrap": settings.bootstrap_servers,
        "messages": report.messages, "malformed": malformed, "rows": report.rows, "groups": report.groups,
        "without_features": report.without_features, "without_product": report.without_product,
        "feature_source": source, "traffic": None if traffic is None else str(traffic),
        "rounds": len(rounds), "heldout_fraction": settings.learner.loop.heldout_fraction,
        "columns": SCHEMA.names,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return report


def _catalogue(traffic: Path | None) -> tuple[dict[str, ProductRecord], dict[str, GroupFeatures]]:
    """Products and log-derived group features of a traffic log (empty without one)."""
    if traffic is None:
        return {}, {}
    from features.group import read_group_features
    from learner.data import TrafficError, TrafficLog

    try:
        log = TrafficLog.load(traffic)
    except TrafficError as exc:
        raise ExportError(f"--traffic: {exc}") from None
    return dict(log.products), dict(read_group_features(log))
