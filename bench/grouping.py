"""Grouping: learned groups vs. the world's hidden tastes (NMI, ARI), speed, and River KMeans / DBSTREAM baselines.

For each world, one simulated stream (``generate_events``, seed 0 or ``OSMF_BENCH_SEED``) is fed to
:class:`streams.grouping.ProductAwareGrouper` — every impression through
``learn_and_assign`` with its creative and the creative's visual attributes
(``CreativePrompt.attribute_tokens()``), every click through ``learn_click``
— and, as baselines, to River ``KMeans`` (``n_clusters`` = the number of
tastes) and ``DBSTREAM`` per category (River's defaults otherwise) on one-hot
attribute dicts (``learn_one`` then ``predict_one``). At each checkpoint
(impressions so far) every user of the world is assigned in every category
and compared with their hidden *taste*: segments whose preferences (and
shifts) are identical in the world file count as one. The *ceiling* is the
best any attribute-only grouping can reach by the brief's definition: each
exact attribute tuple mapped to the majority taste of its users.

Keys per category: ``nmi@N``, ``ari@N``, ``groups@N``, ``nmi_over_ceiling@N``,
``ceiling_nmi``, ``tastes``; per world and over all worlds,
``min_nmi_over_ceiling@N`` and ``mean_nmi_over_ceiling@N`` over categories
with more than one taste (goals: at 50k every one ≥ 0.8, mean ≥ 0.9; at 200k
every one ≥ 0.9). ``separable_over_ceiling@N`` (per category, with its
``min_`` and ``mean_``) scores the separable ceiling of the same stream
(:func:`separable_ceiling`, what its clicks let the grouper's tests keep
apart): where it is under a goal, the clicks so far do not allow the goal.
Speed is events (impressions + clicks) per second of the
calls themselves, reclustering included, evaluation excluded
(``min_events_per_s``, goal ≥ 50k); the speed ratio compares impressions per
second with KMeans (ours also spends time on the clicks, which the baselines
ignore).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common import BenchOptions, print_table

if TYPE_CHECKING:
    from streams.grouping import GroupingConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_WORLDS = (ROOT / "sim/examples/world_a.yaml", ROOT / "sim/examples/world_b.yaml")
CHECKPOINTS = (10_000, 50_000, 200_000)
"""Impressions after which groups are scored (full run)."""
QUICK_CHECKPOINTS = (5_000, 20_000)
"""The same, for ``--quick``."""
SEED = int(os.environ.get("OSMF_BENCH_SEED", "0"))
"""The stream's seed (``generate_events``) and KMeans'; ``OSMF_BENCH_SEED=3 osmf bench grouping`` scores another stream."""
SWEEP_CHECKPOINTS = (10_000, 20_000, 50_000, 100_000, 200_000)
"""Checkpoints of :func:`sweep` (``python -m bench.grouping``), the grouper alone over several seeds."""

__all__ = ["contingency", "nmi", "ari", "taste_labels", "attribute_ceiling", "run"]


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


def taste_labels(world: Any, category: str) -> list[str]:
    """Each user's hidden taste in ``category``: segments with identical preferences and shifts are one taste."""
    names: dict[Any, str] = {}
    for segment in world.segments[category]:
        key = (_key(segment.preferences), tuple(_key(shift.preferences) for shift in segment.shifts))
        names.setdefault(key, segment.name)
    by_segment = {
        segment.name: names[(_key(segment.preferences), tuple(_key(shift.preferences) for shift in segment.shifts))]
        for segment in world.segments[category]
    }
    return [by_segment[world.segment_of(user, category).name] for user in world.users]


def _key(preferences: Any) -> tuple[Any, ...]:
    return tuple(sorted((name, p.weight, p.target) for name, p in preferences.items()))


def attribute_ceiling(world: Any, category: str) -> tuple[float, float]:
    """NMI and ARI of the best attribute-only assignment: each attribute tuple → its users' majority taste."""
    truth = taste_labels(world, category)
    predicted = _majority_assignment(world, _majority_tastes(world, truth))
    return nmi(truth, predicted), ari(truth, predicted)


def _tuple(attributes: Any) -> tuple[Any, ...]:
    return tuple(sorted(attributes.items()))


def _majority_tastes(world: Any, truth: Sequence[str]) -> dict[tuple[Any, ...], str]:
    """Each attribute tuple of the world's users → the taste most of its users have (``truth``: each user's)."""
    votes: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    for user, taste in zip(world.users, truth):
        votes[_tuple(user.attributes)][taste] += 1
    return {key: counter.most_common(1)[0][0] for key, counter in votes.items()}


def _majority_assignment(world: Any, majority: dict[tuple[Any, ...], str]) -> list[str]:
    """Each user → the majority taste of their attribute tuple (:func:`_majority_tastes`): the attribute
    ceiling's grouping."""
    return [majority[_tuple(user.attributes)] for user in world.users]


def separable_ceiling(
    world: Any, seed: int, checkpoints: Sequence[int], config: GroupingConfig | None = None,
    ops: list[Op] | None = None,
) -> dict[str, dict[int, float | None]]:
    """Per category and checkpoint, ``nmi / ceiling`` of the *separable ceiling*: the ceiling's grouping
    (each attribute tuple → its users' majority taste) with the tastes the clicks so far cannot tell apart
    merged by the grouper's own tests (:func:`streams.grouping.tree.keep_apart`: its final merge at
    ``merge_alpha`` and its taste gate at ``taste_alpha``, with its visual-attribute evidence, and no
    correction for searching the attributes).

    An optimistic reference, not an estimate: it is given the partition the grouper must search for, and
    tests it once where the grouper tests at every macro step. A category the grouper misses where this
    misses too is limited by what its clicks show, not by how the grouper searches. ``ops``: the stream
    (:func:`_ops`), when the caller has it already.
    """
    from streams.grouping import GroupingConfig

    config = config or GroupingConfig()
    ops = ops if ops is not None else _ops(world, seed, max(checkpoints))
    truth = {c: taste_labels(world, c) for c in world.categories}
    majority = {c: _majority_tastes(world, truth[c]) for c in world.categories}
    ceiling = {c: nmi(truth[c], _majority_assignment(world, majority[c])) for c in world.categories}
    counts: dict[str, dict[tuple[str, str], list[int]]] = {c: defaultdict(lambda: [0, 0]) for c in world.categories}
    tokens: dict[str, dict[str, tuple[str, ...] | None]] = {c: {} for c in world.categories}
    result: dict[str, dict[int, float | None]] = {c: {} for c in world.categories}
    start = seen = 0
    for checkpoint in checkpoints:
        while start < len(ops) and (seen < checkpoint or ops[start][0]):
            is_click, category, user, creative, attributes = ops[start]
            counts[category][(majority[category][_tuple(user)], creative)][is_click] += 1
            if not is_click:
                seen += 1
                tokens[category].setdefault(creative, attributes)
            start += 1
        for category in world.categories:
            merged = _merge_inseparable(counts[category], tokens[category], config)
            predicted = [merged.get(majority[category][_tuple(user.attributes)], "") for user in world.users]
            score = nmi(truth[category], predicted)
            result[category][checkpoint] = _r(score / ceiling[category]) if ceiling[category] > 0 else None
    return result


def _merge_inseparable(
    counts: dict[tuple[str, str], list[int]], tokens: dict[str, Any], config: GroupingConfig
) -> dict[str, str]:
    """Taste → the first taste of the group it is merged into (see :func:`separable_ceiling`); ``counts``:
    (taste, creative) → [impressions, clicks]."""
    from streams.grouping.evidence import build_evidence
    from streams.grouping.tree import keep_apart

    creatives = sorted({creative for _, creative in counts})
    column = {creative: k for k, creative in enumerate(creatives)}
    tastes = sorted({taste for taste, _ in counts})
    row = {taste: k for k, taste in enumerate(tastes)}
    shown, clicked = np.zeros((len(tastes), len(creatives))), np.zeros((len(tastes), len(creatives)))
    for (taste, creative), (impressions, clicks) in counts.items():
        shown[row[taste], column[creative]] += impressions
        clicked[row[taste], column[creative]] += clicks
    evidence = build_evidence([tokens.get(c) for c in creatives], config.evidence)
    groups = keep_apart(clicked, shown, config, evidence) if len(tastes) > 1 else [[k] for k in range(len(tastes))]
    return {tastes[k]: tastes[group[0]] for group in groups for k in group}


def run(options: BenchOptions) -> dict[str, Any]:
    """Score grouping on each world (both examples unless ``options.world``); return the figures."""
    from sim.world import World

    paths = [options.world] if options.world is not None else list(EXAMPLE_WORLDS)
    checkpoints = QUICK_CHECKPOINTS if options.quick else CHECKPOINTS
    baseline_until = checkpoints[1] if len(checkpoints) > 1 else checkpoints[0]
    figures: dict[str, Any] = {"checkpoints": list(checkpoints), "seed": SEED, "worlds": {}}
    quality_rows: list[list[Any]] = []
    speed_rows: list[list[Any]] = []
    for path in paths:
        world = World.load(path)
        ops = _ops(world, SEED, max(checkpoints))
        result = _bench_world(world, checkpoints, baseline_until, ops=ops)
        for category, bound in separable_ceiling(world, SEED, checkpoints, ops=ops).items():
            result["categories"][category].update({f"separable_over_ceiling@{n}": r for n, r in bound.items()})
        result.update(_ratios(list(result["categories"].values()), checkpoints, "separable_over_ceiling"))
        figures["worlds"][world.name] = result
        for category, stats in result["categories"].items():
            for metric in ("nmi", "ari", "groups"):
                row: list[Any] = [world.name, category, metric.upper() if metric != "groups" else "groups"]
                row.append(stats["tastes"] if metric == "groups" else stats[f"ceiling_{metric}"])
                row += [stats[f"{metric}@{n}"] for n in checkpoints]
                for baseline in ("kmeans", "dbstream"):
                    row.append(stats.get(f"{baseline}_{metric}@{baseline_until}", ""))
                quality_rows.append(row)
            quality_rows.append([world.name, category, "separable / ceiling", ""]
                                + [stats[f"separable_over_ceiling@{n}"] for n in checkpoints] + ["", ""])
        speed_rows.append(
            [
                world.name,
                result["events"],
                result["events_per_s"],
                result["impressions_per_s"],
                result["baseline_impressions_per_s"],
                result["dbstream_impressions_per_s"],
                result["speed_ratio"],
            ]
        )
    columns = ["world", "category", "", "ceiling"] + [f"@{n // 1000}k" for n in checkpoints]
    columns += [f"KMeans@{baseline_until // 1000}k", f"DBSTREAM@{baseline_until // 1000}k"]
    print_table("Groups vs hidden tastes, all users (ceiling: tuple → majority taste)", columns, quality_rows)
    print_table(
        "Grouping speed (learn+assign, reclustering included)",
        ["world", "events", "events/s", "impr./s", "KMeans impr./s", "DBSTREAM impr./s", "ratio"],
        speed_rows,
    )
    worlds = list(figures["worlds"].values())
    figures["min_events_per_s"] = min(w["events_per_s"] for w in worlds)
    figures["min_speed_ratio"] = min(w["speed_ratio"] for w in worlds)
    categories = [c for w in worlds for c in w["categories"].values()]
    figures.update(_ratios(categories, checkpoints))
    figures.update(_ratios(categories, checkpoints, "separable_over_ceiling"))
    return figures


def _ratios(
    categories: Sequence[dict[str, Any]], checkpoints: Sequence[int], key: str = "nmi_over_ceiling"
) -> dict[str, float | None]:
    """``min_`` and ``mean_{key}@N`` over categories with more than one taste (``None``: none)."""
    out: dict[str, float | None] = {}
    scored = [c for c in categories if c["tastes"] > 1 and c["ceiling_nmi"] > 0]
    for n in checkpoints:
        values = [c[f"{key}@{n}"] for c in scored]
        out[f"min_{key}@{n}"] = _r(min(values)) if values else None
        out[f"mean_{key}@{n}"] = _r(sum(values) / len(values)) if values else None
    return out


Op = tuple[bool, str, dict[str, Any], str, "tuple[str, ...] | None"]
"""One call to the grouper: is it a click, category, user, creative, the creative's visual attributes."""


def _ops(world: Any, seed: int, n_impressions: int, shuffle_users: bool = False) -> list[Op]:
    """The simulated stream as grouper calls: every impression, and each click right after its impression.

    ``shuffle_users``: the null stream. Each impression (and its click) is given a user drawn at random
    from the world, so the clicks, generated for the real user, no longer depend on the attributes seen:
    every category should stay one group.
    """
    import random

    from infra.contracts.events import Impression
    from infra.contracts.prompt import PromptError, parse_prompt
    from sim.simulate import generate_events

    ops: list[Op] = []
    tokens: dict[str | None, tuple[str, ...] | None] = {None: None}
    last: Impression | None = None
    users = [dict(user.attributes) for user in world.users]
    draw = random.Random(f"null-{seed}")
    user: dict[str, Any] = {}
    for event in generate_events(world, seed=seed, n_impressions=n_impressions):
        if isinstance(event, Impression):
            last = event
            user = draw.choice(users) if shuffle_users else event.user
            if event.prompt not in tokens:
                try:
                    tokens[event.prompt] = parse_prompt(event.prompt).attribute_tokens()  # type: ignore[arg-type]
                except PromptError:
                    tokens[event.prompt] = None
            ops.append((False, event.category, user, event.creative_id, tokens[event.prompt]))
        elif last is not None:  # a click follows its impression in the simulated stream
            ops.append((True, last.category, user, last.creative_id, None))
    return ops


def _bench_world(
    world: Any,
    checkpoints: Sequence[int],
    baseline_until: int | None,
    seed: int = SEED,
    config: GroupingConfig | None = None,
    null: bool = False,
    ops: list[Op] | None = None,
) -> dict[str, Any]:
    """Feed one stream to the grouper, score it at ``checkpoints``; the baselines up to ``baseline_until``.

    ``config``: the grouper's (default: ``GroupingConfig()``); ``null``: the null stream (see :func:`_ops`);
    ``ops``: the stream, when the caller has it already.
    """
    from streams.grouping import ProductAwareGrouper

    ops = ops if ops is not None else _ops(world, seed, max(checkpoints), shuffle_users=null)
    population = [dict(user.attributes) for user in world.users]
    truth = {c: taste_labels(world, c) for c in world.categories}
    categories: dict[str, dict[str, Any]] = {}
    for category in world.categories:
        ceiling_nmi, ceiling_ari = attribute_ceiling(world, category)
        categories[category] = {
            "segments": len(world.segments[category]),
            "tastes": len(set(truth[category])),
            "ceiling_nmi": _r(ceiling_nmi),
            "ceiling_ari": _r(ceiling_ari),
        }

    grouper = ProductAwareGrouper(config)
    elapsed, impressions, start = 0.0, 0, 0
    for checkpoint in checkpoints:
        end = start
        seen = impressions
        while end < len(ops) and (seen < checkpoint or ops[end][0]):
            seen += not ops[end][0]
            end += 1
        began = time.perf_counter()
        for is_click, category, user, creative, attributes in ops[start:end]:
            if is_click:
                grouper.learn_click(category, user, creative)
            else:
                grouper.learn_and_assign(category, user, creative, attributes)
        elapsed += time.perf_counter() - began
        start, impressions = end, seen
        for category in world.categories:
            predicted = [grouper.assign(category, user) for user in population]
            stats = categories[category]
            score = nmi(truth[category], predicted)
            stats[f"nmi@{checkpoint}"] = _r(score)
            stats[f"ari@{checkpoint}"] = _r(ari(truth[category], predicted))
            stats[f"groups@{checkpoint}"] = len(set(predicted))
            ceiling = stats["ceiling_nmi"]
            stats[f"nmi_over_ceiling@{checkpoint}"] = _r(score / ceiling) if ceiling > 0 else None
    for category in world.categories:
        infos = grouper.groups(category)
        categories[category]["rules"] = {info.id: info.rule for info in infos}
        categories[category]["ids_minted"] = grouper.ids_minted(category)
    events = start

    impressions_per_s = impressions / elapsed
    if baseline_until is None:
        return {"events": events, "events_per_s": round(events / elapsed), "categories": categories}
    kmeans = _baseline("kmeans", world, ops, population, truth, categories, baseline_until)
    dbstream = _baseline("dbstream", world, ops, population, truth, categories, baseline_until)
    result = {
        "events": events,
        "impressions": impressions,
        "events_per_s": round(events / elapsed),
        "impressions_per_s": round(impressions_per_s),
        "baseline_impressions_per_s": round(kmeans),
        "dbstream_impressions_per_s": round(dbstream),
        "speed_ratio": round(impressions_per_s / kmeans, 2),
        "categories": categories,
    }
    result.update(_ratios(list(categories.values()), checkpoints))
    return result


def _baseline(
    kind: str,
    world: Any,
    ops: Sequence[tuple[bool, str, dict[str, Any], str, Any]],
    population: Sequence[dict[str, Any]],
    truth: dict[str, list[str]],
    categories: dict[str, dict[str, Any]],
    until: int,
) -> float:
    """River ``KMeans`` (k = number of tastes) or ``DBSTREAM`` per category on one-hot attributes; clicks are ignored.

    Returns impressions per second of ``learn_one`` + ``predict_one``.
    """
    from river.cluster import DBSTREAM, KMeans

    models = {
        c: KMeans(n_clusters=categories[c]["tastes"], seed=SEED) if kind == "kmeans" else DBSTREAM()
        for c in world.categories
    }
    impressions = 0
    began = time.perf_counter()
    for is_click, category, user, _creative, _attributes in ops:
        if is_click:
            continue
        x = {f"{k}={v}": 1.0 for k, v in user.items()}
        models[category].learn_one(x)
        models[category].predict_one(x)
        impressions += 1
        if impressions >= until:
            break
    elapsed = time.perf_counter() - began
    for category, model in models.items():
        predicted = [model.predict_one({f"{k}={v}": 1.0 for k, v in user.items()}) for user in population]
        categories[category][f"{kind}_nmi@{until}"] = _r(nmi(truth[category], predicted))
        categories[category][f"{kind}_groups@{until}"] = len(set(predicted))
        categories[category][f"{kind}_ari@{until}"] = _r(ari(truth[category], predicted))
    return impressions / elapsed


def sweep(
    paths: Sequence[Path],
    seeds: Sequence[int],
    checkpoints: Sequence[int] = SWEEP_CHECKPOINTS,
    config: GroupingConfig | None = None,
    null: bool = False,
    separable: bool = False,
) -> list[str]:
    """Across streams: per category, how many seeds reach 0.8 of the ceiling (0.9 from 200k) and each seed's
    ``nmi / ceiling``, at each checkpoint; the grouper alone (no baselines). Returns the table's lines.

    With ``null`` (users shuffled, :func:`_ops`) a cell counts the seeds that kept one group and lists each
    seed's number of groups instead; the last lines count the runs that ever split. With ``separable`` the
    cells score the separable ceiling (:func:`separable_ceiling`) instead of the grouper.
    """
    from sim.world import World

    lines = ["| world / category | " + " | ".join(f"@{n // 1000}k" for n in checkpoints) + " |"]
    lines.append("| --- " * (len(checkpoints) + 1) + "|")
    speeds: list[int] = []
    reached_total, scored, split_runs, null_runs = Counter[int](), 0, 0, 0
    for path in paths:
        world = World.load(path)
        runs = []
        for seed in seeds:
            ops = _ops(world, seed, max(checkpoints), shuffle_users=null)
            run = _bench_world(world, checkpoints, None, seed, config, null, ops)
            if separable:
                for category, bound in separable_ceiling(world, seed, checkpoints, config, ops).items():
                    run["categories"][category].update({f"nmi_over_ceiling@{n}": r for n, r in bound.items()})
            runs.append(run)
        speeds += [run["events_per_s"] for run in runs]
        for category in world.categories:
            stats = [run["categories"][category] for run in runs]
            if null:
                cells = [_null_cell([s[f"groups@{n}"] for s in stats]) for n in checkpoints]
                null_runs += len(stats)
                split_runs += sum(s["ids_minted"] > 1 for s in stats)
            else:
                cells = []
                for n in checkpoints:
                    ratios = [s[f"nmi_over_ceiling@{n}"] for s in stats]
                    reached = sum(r is not None and r >= (0.9 if n >= 200_000 else 0.8) for r in ratios)
                    cells.append(f"{reached}/{len(ratios)} ({' '.join(f'{r:.2f}' if r is not None else '-' for r in ratios)})")
                    reached_total[n] += reached if stats[0]["tastes"] > 1 else 0
                scored += len(stats) if stats[0]["tastes"] > 1 else 0
            lines.append(f"| {world.name} {category} | " + " | ".join(cells) + " |")
    if null:
        lines.append(f"users shuffled: {split_runs} of {null_runs} category x seed runs ever split (minted a second group id)")
    else:
        subject = "the separable ceiling" if separable else "the grouper"
        lines.append(f"{subject} reached the goal, of {scored} category x seed runs with more than one taste: "
                     + ", ".join(f"@{n // 1000}k {reached_total[n]}" for n in checkpoints))
    lines.append(f"events/s: {min(speeds)}-{max(speeds)}")
    return lines


def _null_cell(groups: Sequence[int]) -> str:
    """Seeds that kept one group, and each seed's groups: ``3/3 (1 1 1)``."""
    return f"{sum(g == 1 for g in groups)}/{len(groups)} ({' '.join(str(g) for g in groups)})"


def parse_config(assignments: Sequence[str]) -> GroupingConfig:
    """``GroupingConfig`` from ``name=value`` strings (Python literals; ``None`` allowed), checked by the config.

    >>> parse_config(["taste_alpha=1e-2", "interactions=False"]).taste_alpha
    0.01
    >>> parse_config(["taste_alpha=1e-2x"])
    Traceback (most recent call last):
    ...
    ValueError: --set 'taste_alpha=1e-2x': taste_alpha takes a number (default 0.001)
    """
    import ast
    import dataclasses

    from streams.grouping import GroupingConfig

    fields = {f.name: f for f in dataclasses.fields(GroupingConfig)}
    values: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {assignment!r}: expected name=value with name one of {', '.join(sorted(fields))}")
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[name] = text  # a plain string, e.g. evidence=attributes
        default, value = fields[name].default, values[name]
        if value is None and "None" in str(fields[name].type):
            continue
        kind = bool if isinstance(default, bool) else (int, float) if isinstance(default, (int, float)) else None
        if kind is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            wanted = "True or False" if kind is bool else "a number"
            raise ValueError(f"--set {assignment!r}: {name} takes {wanted} (default {default!r})")
    return GroupingConfig(**values)


if __name__ == "__main__":  # python -m bench.grouping --seeds 0,1,2,3,4 sim/examples/world_a.yaml ...
    import argparse

    parser = argparse.ArgumentParser(description="Grouping across random streams (seeds), per category.")
    parser.add_argument("worlds", nargs="+", type=Path)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated stream seeds")
    parser.add_argument("--until", type=int, default=max(SWEEP_CHECKPOINTS), help="last checkpoint (impressions)")
    parser.add_argument(
        "--null", action="store_true",
        help="shuffle users: each impression gets a random user of the world, so no attribute predicts the "
        "clicks; reports the seeds that kept one group per category (a false-split check)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="a GroupingConfig field for this sweep, e.g. --set taste_alpha=1e-2 (repeatable)",
    )
    parser.add_argument(
        "--separable", action="store_true",
        help="score the separable ceiling instead of the grouper: the world's true grouping with the tastes "
        "that the grouper's own tests cannot tell apart on the clicks so far merged (an optimistic reference)",
    )
    arguments = parser.parse_args()
    if arguments.null and arguments.separable:
        parser.error("--null and --separable do not go together: the null stream has one taste per category")
    try:
        chosen_config = parse_config(arguments.set)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    chosen = [n for n in SWEEP_CHECKPOINTS if n <= arguments.until]
    seeds = [int(s) for s in arguments.seeds.split(",")]
    print("\n".join(sweep(arguments.worlds, seeds, chosen, chosen_config, arguments.null, arguments.separable)))
