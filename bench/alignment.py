"""Alignment: per-group and worst-group simulated CTR of base, one-size DPO and Group-DPO, beside the oracle.

One run, on any valid world file (default: example world B):

1. *Base.* Simulate the pre-training log (``learner.pretrain.impressions``
   random creatives, grouped as the stream worker groups) and pre-train the
   G-MLLM on it (default configuration; ``--quick``: a tiny model).
2. *Fresh pairs.* Simulate a second log of new random creatives (another
   seed, the grouper frozen) and mine preference pairs from it with the
   stream worker's :class:`streams.pairs.PairMiner`. Both methods get exactly
   the same pairs (the *pair budget*: at most ``PAIR_BUDGET``, newest evidence
   first) and the same :class:`infra.settings.DPOSettings`; 20 % of them (by
   hash) are held out for the preference accuracy.
3. *Fit.* From copies of the base: Group-DPO (group prefix, inverse-share
   group weights) and one-size DPO (the same trainer, neutral prefix,
   uniform weights, pairs pooled).
4. *Judge.* For each learned group and the first products of its category,
   the creative each model serves (sampled, reranked by its click head, as in
   production) is scored by the world's click model, averaged over the group's
   members' hidden segments (:class:`sim.judge.WorldCTR`). Random
   prompts give the floor and the best of 200 random prompts per product the
   oracle ceiling. Reported per group, averaged, and for the worst group
   (the lowest CTR of each model).

A bar chart per group is saved as ``alignment.png`` under the bench output directory.
The pre-trained base is kept there too (``alignment-base-<key>``, keyed by the
world file and the model and pre-training settings) and reused by the next run
of the same world and configuration: the base is deterministic, and its
pre-training is most of a full run's time.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import QUICK_MODEL, BenchOptions, print_table

ROOT = Path(__file__).resolve().parents[1]
WORLD_B = ROOT / "sim" / "examples" / "world_b.yaml"
PAIR_BUDGET = 2_000
QUICK_PAIR_BUDGET = 300
FRESH_IMPRESSIONS = 300_000
QUICK_FRESH_IMPRESSIONS = 60_000
ORACLE_PROMPTS = 200

QUICK_LEARNER: dict[str, Any] = {
    "model": QUICK_MODEL,
    "pretrain": {"impressions": 60_000, "creatives_per_product": 8, "steps": 80, "batch_size": 8,
                 "warmup_steps": 10, "feature_snapshots": 2},
    "generation": {"candidates": 4},
    "dpo": {"max_steps": 40, "batch_size": 8},
    "loop": {"ctr_products_per_group": 2},
}
MODELS = ("base", "one-size DPO", "Group-DPO")


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the figures listed in the module docstring."""
    from infra.settings import LearnerSettings
    from learner.pretrain import torch_threads

    settings = LearnerSettings(**QUICK_LEARNER) if options.quick else LearnerSettings()
    with torch_threads(settings.threads):
        return _run(options, settings)


def _run(options: BenchOptions, settings: Any) -> dict[str, Any]:
    from rich.progress import Progress

    from sim.logs import traffic_from_world
    from sim.judge import WorldCTR, group_members
    from sim.world import World
    from learner.buffer import PairBuffer
    from learner.dpo.heldout import heldout_figures
    from learner.dpo.data import pairs_from_traffic
    from learner.dpo.train import fit_group_dpo
    from features.group import read_group_features
    from learner.model.gmllm import GMLLM
    from learner.pretrain import pretrain

    world_file = Path(options.world or WORLD_B)
    world = World.load(world_file)
    p = settings.pretrain
    started = time.perf_counter()
    cache = options.output_dir / f"alignment-base-{_base_key(world_file, settings)}"
    with Progress(transient=True) as progress:
        task = progress.add_task(f"simulating {p.impressions:,} impressions ({world.name})", total=None)
        train_log, grouper = traffic_from_world(world, n_impressions=p.impressions, seed=p.traffic_seed,
                                                creatives_per_product=p.creatives_per_product)
        if (cache / "manifest.json").is_file():
            base, features = GMLLM.load(cache), read_group_features(train_log)
            progress.console.print(f"reusing the pre-trained base of this world and configuration: {cache}")
        else:
            progress.update(task, description="pre-training the base", total=p.steps, completed=0)
            base, data, _ = pretrain(train_log, settings, lambda step, *_: progress.update(task, completed=step))
            features = data.features
            base.save(cache)
        products = train_log.products
        fresh_n = QUICK_FRESH_IMPRESSIONS if options.quick else FRESH_IMPRESSIONS
        progress.update(task, description=f"simulating {fresh_n:,} fresh impressions", total=None)
        fresh_log, _ = traffic_from_world(world, n_impressions=fresh_n, seed=p.traffic_seed + 1,
                                          creatives_per_product=p.creatives_per_product, grouper=grouper, learn=False)
    base_s = time.perf_counter() - started
    mined = pairs_from_traffic(fresh_log, groups=set(features))
    budget = QUICK_PAIR_BUDGET if options.quick else PAIR_BUDGET
    mined.sort(key=lambda pair: (-pair.evidence_level, -pair.prob_winner_better, pair.pair_id))
    buffer = PairBuffer(capacity=max(1, budget))
    for pair in mined[:budget]:
        buffer.add(pair)
    train_pairs, heldout_pairs = buffer.split(settings.loop.heldout_fraction)

    members = group_members(world, grouper)
    judge = WorldCTR(world, members, features, products, settings.generation, settings.loop.ctr_products_per_group)
    ctr: dict[str, dict[str, float]] = {"base": judge(base)}
    sampled: dict[str, dict[str, float]] = {"base": dict(judge.last_sampled)}
    fits: dict[str, Any] = {}
    accuracy: dict[str, dict[str, float]] = {}
    for name, one_size in (("one-size DPO", True), ("Group-DPO", False)):
        if not train_pairs:
            break
        policy = base.copy()
        with Progress(transient=True) as progress:
            task = progress.add_task(f"fitting {name}", total=None)
            fits[name] = fit_group_dpo(policy, base, train_pairs, features, products, settings.dpo,
                                       one_size=one_size, on_log=lambda step, _: progress.update(task, completed=step))
        ctr[name] = judge(policy, one_size=one_size)
        sampled[name] = dict(judge.last_sampled)
        new, _ = heldout_figures(policy, base, heldout_pairs, features, products, settings.dpo.beta, one_size)
        accuracy[name] = {g: f.accuracy for g, f in new.items()}
    random_ctr = judge.random_ctr()
    oracle = judge.oracle_ctr(ORACLE_PROMPTS if not options.quick else 40)

    groups = judge.groups()
    pair_counts = Counter(pair.group_id for pair in train_pairs)
    models = [m for m in MODELS if m in ctr]
    rows = []
    for group in groups:
        majority, count = members[group].most_common(1)[0]
        rows.append([group, f"{majority} ({count / sum(members[group].values()):.0%})", pair_counts.get(group, 0),
                     random_ctr[group], *(ctr[m][group] for m in models), oracle[group]])
    summary = {m: {"mean": float(np.mean([ctr[m][g] for g in groups])), "worst": min(ctr[m][g] for g in groups)}
               for m in models}
    summary["random"] = {"mean": float(np.mean([random_ctr[g] for g in groups])),
                         "worst": min(random_ctr[g] for g in groups)}
    summary["oracle"] = {"mean": float(np.mean([oracle[g] for g in groups])), "worst": min(oracle[g] for g in groups)}
    for label in ("mean", "worst"):
        rows.append([f"[{label} group]", "", len(train_pairs), summary["random"][label],
                     *(summary[m][label] for m in models), summary["oracle"][label]])
    print_table(f"alignment on {world.name}: simulated CTR of the served creative per group",
                ["group", "majority segment", "train pairs", "random", *models, "oracle"], rows)
    if fits:
        print_table("fits (same pairs, same settings)", ["model", "steps", "s", "pairs/s", "held-out accuracy"],
                    [[m, f.steps, round(f.seconds, 1), round(f.samples_per_s, 1),
                      round(float(np.mean(list(accuracy[m].values()))), 3) if accuracy[m] else "n/a"]
                     for m, f in fits.items()])
    plot = _plot(options.output_dir / ("alignment-quick.png" if options.quick else "alignment.png"), world.name,
                 groups, {"random": random_ctr, **ctr, "oracle": oracle})
    figures: dict[str, Any] = {
        "world": world.name,
        "quick": options.quick,
        "groups": len(groups),
        "pairs_mined": len(mined),
        "pairs_train": len(train_pairs),
        "pairs_heldout": len(heldout_pairs),
        "pairs_per_group": dict(sorted(pair_counts.items())),
        "base_seconds": round(base_s, 1),
        "ctr_per_group": {m: {g: round(v, 5) for g, v in ctr[m].items()} for m in models},
        "sampled_ctr_per_group": {m: {g: round(v, 5) for g, v in sampled[m].items()} for m in models},
        "random_ctr_per_group": {g: round(v, 5) for g, v in random_ctr.items()},
        "oracle_ctr_per_group": {g: round(v, 5) for g, v in oracle.items()},
        "summary": {m: {k: round(v, 5) for k, v in s.items()} for m, s in summary.items()},
        "heldout_accuracy": {m: {g: round(v, 4) for g, v in a.items()} for m, a in accuracy.items()},
        "fit_seconds": {m: round(f.seconds, 1) for m, f in fits.items()},
        "plot": str(plot),
    }
    if "Group-DPO" in summary and "one-size DPO" in summary:
        figures["group_vs_one_size_mean"] = round(summary["Group-DPO"]["mean"] / summary["one-size DPO"]["mean"], 4)
        figures["group_vs_one_size_worst"] = round(summary["Group-DPO"]["worst"] / summary["one-size DPO"]["worst"], 4)
        figures["group_vs_base_mean"] = round(summary["Group-DPO"]["mean"] / summary["base"]["mean"], 4)
    else:
        figures["note"] = "no preference pair was mined from the fresh log; only the base is reported"
    return figures


def _base_key(world_file: Path, settings: Any) -> str:
    """Cache key of a pre-trained base: the world file's bytes and the model and pre-training settings."""
    import hashlib
    import json

    blob = json.dumps([settings.model.model_dump(mode="json"), settings.pretrain.model_dump(mode="json")],
                      sort_keys=True).encode()
    return hashlib.sha256(world_file.read_bytes() + blob).hexdigest()[:12]


def _plot(path: Path, world: str, groups: list[str], series: dict[str, dict[str, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4), dpi=110)
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        axis.bar(x + i * width - 0.4 + width / 2, [values.get(g, np.nan) for g in groups], width, label=name)
    axis.set_xticks(x, groups, rotation=30, ha="right")
    axis.set_ylabel("simulated CTR of the served creative")
    axis.set_title(f"alignment on {world}")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
