"""Grouping: learned groups vs. the world's hidden segments (NMI, ARI), speed, and a River KMeans baseline.

For each world, one simulated stream (``generate_events``, seed 0) is fed to
:class:`streams.grouping.ProductAwareGrouper` — every impression through
``learn_and_assign`` with its creative, every click through ``learn_click`` —
and, as the baseline, to River ``KMeans`` per category (``n_clusters`` = the
true number of segments, other parameters River's defaults) on one-hot
attribute dicts (``learn_predict_one``). At each checkpoint (impressions so
far) every user of the world is assigned in every category and compared with
their hidden segment. The *ceiling* is the best any attribute-only grouping can
reach by the brief's definition: each exact attribute tuple mapped to the
majority segment of its users. Speed is events (impressions + clicks) per
second of the calls themselves, reclustering included, evaluation excluded;
the speed ratio compares impressions per second (ours also spends time on the
clicks, which the baseline ignores).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchOptions, print_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_WORLDS = (ROOT / "sim/examples/world_a.yaml", ROOT / "sim/examples/world_b.yaml")
CHECKPOINTS = (10_000, 50_000, 200_000)
"""Impressions after which groups are scored (full run)."""
QUICK_CHECKPOINTS = (5_000, 20_000)
"""The same, for ``--quick``."""
SEED = 0

__all__ = ["contingency", "nmi", "ari", "attribute_ceiling", "run"]


def contingency(truth: Sequence[Hashable], predicted: Sequence[Hashable]) -> np.ndarray:
    """Counts of items per (true class, predicted cluster); rows and columns in first-seen order.

    >>> contingency(["a", "a", "b"], [0, 1, 1]).tolist()
    [[1, 1], [0, 1]]
    """
    if len(truth) != len(predicted):
        raise ValueError(f"label lists differ in length: {len(truth)} and {len(predicted)}")
    rows: dict[Hashable, int] = {}
    cols: dict[Hashable, int] = {}
    pairs = [(rows.setdefault(t, len(rows)), cols.setdefault(p, len(cols))) for t, p in zip(truth, predicted)]
    table = np.zeros((len(rows), len(cols)), dtype=np.int64)
    if pairs:
        np.add.at(table, tuple(np.array(pairs).T), 1)
    return table


def nmi(truth: Sequence[Hashable], predicted: Sequence[Hashable]) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default).

    1 for identical partitions (up to renaming), 0 for independent ones; two
    single-cluster labelings score 1, one single cluster against more scores 0.

    >>> nmi([0, 0, 1, 1], [5, 5, 7, 7]), nmi([0, 0, 1, 1], [0, 0, 1, 2])
    (1.0, 0.8)
    """
    table = contingency(truth, predicted).astype(float)
    n = table.sum()
    if n == 0:
        return 1.0
    p = table / n
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    ha, hb = _entropy(pa), _entropy(pb)
    if ha == 0.0 or hb == 0.0:
        return 1.0 if ha == hb else 0.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    return round(max(0.0, min(1.0, mi / ((ha + hb) / 2))), 12)


def ari(truth: Sequence[Hashable], predicted: Sequence[Hashable]) -> float:
    """Adjusted Rand index: 1 for identical partitions, about 0 for random ones (can be negative).

    >>> round(ari([0, 0, 1, 2], [0, 0, 1, 1]), 4)
    0.5714
    """
    table = contingency(truth, predicted).astype(float)
    n = table.sum()
    if n < 2:
        return 1.0
    pairs = float((table * (table - 1) / 2).sum())
    rows = float((table.sum(axis=1) * (table.sum(axis=1) - 1) / 2).sum())
    cols = float((table.sum(axis=0) * (table.sum(axis=0) - 1) / 2).sum())
    total = n * (n - 1) / 2
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return float((pairs - expected) / (maximum - expected))


def _r(value: float) -> float:
    return round(value, 3) + 0.0  # no "-0.0"


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def attribute_ceiling(world: Any, category: str) -> tuple[float, float]:
    """NMI and ARI of the best attribute-only assignment: each attribute tuple → its users' majority segment."""
    truth = [world.segment_of(user, category).name for user in world.users]
    keys = [tuple(sorted(user.attributes.items())) for user in world.users]
    votes: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    for key, segment in zip(keys, truth):
        votes[key][segment] += 1
    majority = {key: counter.most_common(1)[0][0] for key, counter in votes.items()}
    predicted = [majority[key] for key in keys]
    return nmi(truth, predicted), ari(truth, predicted)


def run(options: BenchOptions) -> dict[str, Any]:
    """Score grouping on each world (both examples unless ``options.world``); return the figures."""
    from sim.world import World

    paths = [options.world] if options.world is not None else list(EXAMPLE_WORLDS)
    checkpoints = QUICK_CHECKPOINTS if options.quick else CHECKPOINTS
    baseline_until = checkpoints[1] if len(checkpoints) > 1 else checkpoints[0]
    figures: dict[str, Any] = {"checkpoints": list(checkpoints), "worlds": {}}
    quality_rows: list[list[Any]] = []
    speed_rows: list[list[Any]] = []
    for path in paths:
        world = World.load(path)
        result = _bench_world(world, checkpoints, baseline_until)
        figures["worlds"][world.name] = result
        for category, stats in result["categories"].items():
            for metric in ("nmi", "ari", "groups"):
                row: list[Any] = [world.name, category, metric.upper() if metric != "groups" else "groups"]
                row.append(stats["segments"] if metric == "groups" else stats[f"ceiling_{metric}"])
                row += [stats[f"{metric}@{n}"] for n in checkpoints]
                row.append("" if metric == "groups" else stats[f"baseline_{metric}@{baseline_until}"])
                quality_rows.append(row)
        speed_rows.append(
            [
                world.name,
                result["events"],
                result["events_per_s"],
                result["impressions_per_s"],
                result["baseline_impressions_per_s"],
                result["speed_ratio"],
            ]
        )
    columns = ["world", "category", "", "ceiling"] + [f"@{n // 1000}k" for n in checkpoints]
    columns.append(f"KMeans@{baseline_until // 1000}k")
    print_table("Groups vs hidden segments, all users (ceiling: tuple → majority segment)", columns, quality_rows)
    print_table(
        "Grouping speed (learn+assign, reclustering included)",
        ["world", "events", "events/s", "impr./s", "KMeans impr./s", "ratio"],
        speed_rows,
    )
    worlds = figures["worlds"].values()
    figures["min_events_per_s"] = min(w["events_per_s"] for w in worlds)
    figures["min_speed_ratio"] = min(w["speed_ratio"] for w in worlds)
    return figures


def _bench_world(world: Any, checkpoints: Sequence[int], baseline_until: int) -> dict[str, Any]:
    from sim.simulate import generate_events
    from infra.contracts.events import Impression
    from streams.grouping import ProductAwareGrouper

    ops: list[tuple[bool, str, dict[str, Any], str]] = []
    last: Impression | None = None
    for event in generate_events(world, seed=SEED, n_impressions=max(checkpoints)):
        if isinstance(event, Impression):
            last = event
            ops.append((False, event.category, event.user, event.creative_id))
        elif last is not None:  # a click follows its impression in the simulated stream
            ops.append((True, last.category, last.user, last.creative_id))

    population = [dict(user.attributes) for user in world.users]
    truth = {c: [world.segment_of(user, c).name for user in world.users] for c in world.categories}
    categories: dict[str, dict[str, Any]] = {}
    for category in world.categories:
        ceiling_nmi, ceiling_ari = attribute_ceiling(world, category)
        categories[category] = {
            "segments": len(world.segments[category]),
            "ceiling_nmi": _r(ceiling_nmi),
            "ceiling_ari": _r(ceiling_ari),
        }

    grouper = ProductAwareGrouper()
    elapsed, impressions, start = 0.0, 0, 0
    for checkpoint in checkpoints:
        end = start
        seen = impressions
        while end < len(ops) and (seen < checkpoint or ops[end][0]):
            seen += not ops[end][0]
            end += 1
        began = time.perf_counter()
        for is_click, category, user, creative in ops[start:end]:
            if is_click:
                grouper.learn_click(category, user, creative)
            else:
                grouper.learn_and_assign(category, user, creative)
        elapsed += time.perf_counter() - began
        start, impressions = end, seen
        for category in world.categories:
            predicted = [grouper.assign(category, user) for user in population]
            stats = categories[category]
            stats[f"nmi@{checkpoint}"] = _r(nmi(truth[category], predicted))
            stats[f"ari@{checkpoint}"] = _r(ari(truth[category], predicted))
            stats[f"groups@{checkpoint}"] = len(set(predicted))
    for category in world.categories:
        infos = grouper.groups(category)
        categories[category]["rules"] = {info.id: info.rule for info in infos}
        categories[category]["ids_minted"] = grouper.ids_minted(category)
    events = start

    baseline_impressions, baseline_elapsed = _baseline(world, ops, population, truth, categories, baseline_until)
    impressions_per_s = impressions / elapsed
    baseline_per_s = baseline_impressions / baseline_elapsed
    return {
        "events": events,
        "impressions": impressions,
        "events_per_s": round(events / elapsed),
        "impressions_per_s": round(impressions_per_s),
        "baseline_impressions_per_s": round(baseline_per_s),
        "speed_ratio": round(impressions_per_s / baseline_per_s, 2),
        "categories": categories,
    }


def _baseline(
    world: Any,
    ops: Sequence[tuple[bool, str, dict[str, Any], str]],
    population: Sequence[dict[str, Any]],
    truth: dict[str, list[str]],
    categories: dict[str, dict[str, Any]],
    until: int,
) -> tuple[int, float]:
    """River KMeans per category on one-hot attributes (k = true segment count); clicks are ignored."""
    from river.cluster import KMeans

    models = {c: KMeans(n_clusters=len(world.segments[c]), seed=SEED) for c in world.categories}
    impressions = 0
    began = time.perf_counter()
    for is_click, category, user, _creative in ops:
        if is_click:
            continue
        models[category].learn_predict_one({f"{k}={v}": 1.0 for k, v in user.items()})
        impressions += 1
        if impressions >= until:
            break
    elapsed = time.perf_counter() - began
    for category, model in models.items():
        predicted = [model.predict_one({f"{k}={v}": 1.0 for k, v in user.items()}) for user in population]
        categories[category][f"baseline_nmi@{until}"] = _r(nmi(truth[category], predicted))
        categories[category][f"baseline_ari@{until}"] = _r(ari(truth[category], predicted))
    return impressions, elapsed
