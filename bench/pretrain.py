"""Pre-training: speed and memory, held-out parse rate, click AUC vs logistic regression, CTR of generated prompts.

One run, on a world (default: example world A):

1. *Logs.* A training log (``learner.pretrain.impressions`` random creatives,
   seed ``traffic_seed``) grouped like the stream worker groups; a held-out log
   of other random creatives (seed + 1) labelled with the same groups, the
   grouper frozen.
2. *Pre-training* with the default configuration (``LearnerSettings()``;
   ``--quick``: a tiny model and a few steps): steps/s, wall time of
   simulation + training (goal for the default: ≤ 10 min on 2 cores), peak RSS.
3. *Click prediction* on the held-out log: impression-level ROC AUC of the
   model's yes/(yes+no) answer, beside a logistic regression on the same
   inputs — one-hot group, product and creative attributes plus every group ×
   attribute cross (the group-dependent taste the model gets from the group
   prefix) — fitted in the same run on the training log (L2 chosen on a time
   split of it).
4. *Prompts.* Raw parse rate (unconstrained sampling, at temperature 1 and at
   the configured sampling temperature) and constrained parse rate; then, for every learned group and its category's
   products, the simulated CTR (exact expectation over the group's members'
   hidden segments, from the world's pixel click model) of random prompts,
   of the model's samples, and of the sample its click head ranks first; and
   the best of 200 random prompts as a reference ceiling (full run only).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import QUICK_MODEL, BenchOptions, print_table

ROOT = Path(__file__).resolve().parents[1]
WORLD_A = ROOT / "sim" / "examples" / "world_a.yaml"
HELD_OUT_IMPRESSIONS = 100_000
QUICK_HELD_OUT_IMPRESSIONS = 20_000
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)

QUICK_LEARNER: dict[str, Any] = {
    "model": QUICK_MODEL,
    "pretrain": {"impressions": 30_000, "creatives_per_product": 8, "steps": 60, "batch_size": 8,
                 "warmup_steps": 10, "feature_snapshots": 2},
    "generation": {"candidates": 4},
}


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
    from sim.judge import group_members
    from sim.world import World
    from learner.evaluate import click_auc, parse_rate
    from learner.pretrain import plot_losses, pretrain

    world = World.load(options.world or WORLD_A)
    held_n = QUICK_HELD_OUT_IMPRESSIONS if options.quick else HELD_OUT_IMPRESSIONS
    p = settings.pretrain
    started = time.perf_counter()
    train_log, grouper = traffic_from_world(
        world, n_impressions=p.impressions, seed=p.traffic_seed, creatives_per_product=p.creatives_per_product
    )
    simulate_s = time.perf_counter() - started
    with Progress(transient=True) as progress:
        bar = progress.add_task("pre-training", total=p.steps)
        gmllm, data, result = pretrain(train_log, settings, lambda step, task, loss: progress.update(bar, completed=step))
    pretrain_wall = time.perf_counter() - started
    held_log, _ = traffic_from_world(
        world, n_impressions=held_n, seed=p.traffic_seed + 1, creatives_per_product=p.creatives_per_product,
        grouper=grouper, learn=False,
    )
    features = data.features
    held_cells = {k: c for k, c in held_log.cells().items() if k[0] in features}

    auc_model, _ = click_auc(gmllm, features, train_log.products, held_cells)
    auc_lr, l2 = _logistic_auc(train_log, held_cells)

    products_per_group = 2 if options.quick else None
    members = group_members(world, grouper)
    ctr_rows, ctr_figures, raw, constrained, fallbacks = _creative_ctr(
        world, gmllm, features, train_log, members, settings.generation, products_per_group,
        reference=not options.quick,
    )
    t_sample = settings.generation.temperature
    raw_rate, raw_rate_t1, constrained_rate = parse_rate(raw[t_sample]), parse_rate(raw[1.0]), parse_rate(constrained)

    options.output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = gmllm.save(options.output_dir / ("pretrain-model-quick" if options.quick else "pretrain-model"))
    plot = plot_losses(result, options.output_dir / ("pretrain-loss-quick.png" if options.quick else "pretrain-loss.png"))
    print_table(
        "pre-training (default configuration)" if not options.quick else "pre-training (--quick, tiny)",
        ["figure", "value"],
        [
            ["world / log", f"{world.name}: {len(train_log.records):,} train, {len(held_log.records):,} held-out impressions"],
            ["parameters", sum(x.numel() for x in gmllm.model.parameters())],
            ["steps, steps/s", f"{result.steps}, {result.steps_per_s:.2f}"],
            ["wall time simulate + train (s)", round(pretrain_wall, 1)],
            ["peak RSS (MB)", round(result.peak_rss_mb)],
            ["parse rate raw T=1 / raw T=" + f"{t_sample:g} / constrained",
             f"{raw_rate_t1:.1%} / {raw_rate:.1%} of {len(raw[1.0])} / {constrained_rate:.1%} of {len(constrained)}"],
            ["click AUC G-MLLM / logistic regression", f"{auc_model:.4f} / {auc_lr:.4f} (L2 {l2:g})"],
            ["loss plot / model", f"{plot} / {model_dir}"],
        ],
    )
    columns = ["group", "majority segment", "random", "sampled", "generated (reranked)", "lift vs random"]
    if not options.quick:
        columns.append("best of 200 random")
    print_table("simulated CTR per group (mean over the category's products)", columns, ctr_rows)
    generated = [f["generated"] for f in ctr_figures.values()]
    randoms = [f["random"] for f in ctr_figures.values()]
    return {
        "world": world.name,
        "quick": options.quick,
        "model_dir": str(model_dir),
        "train_impressions": len(train_log.records),
        "held_out_impressions": len(held_log.records),
        "parameters": int(sum(x.numel() for x in gmllm.model.parameters())),
        "steps": result.steps,
        "steps_per_s": round(result.steps_per_s, 3),
        "simulate_s": round(simulate_s, 1),
        "train_s": round(result.seconds, 1),
        "pretrain_wall_s": round(pretrain_wall, 1),
        "goal_pretrain_wall_s": 600,
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "final_losses": {k: round(v, 4) for k, v in result.final_losses().items()},
        "parse_rate_raw": round(raw_rate, 4),
        "parse_rate_raw_temperature": t_sample,
        "parse_rate_raw_t1": round(raw_rate_t1, 4),
        "parse_rate_constrained": round(constrained_rate, 4),
        "goal_parse_rate": 0.95,
        "fallbacks": fallbacks,
        "click_auc_model": round(auc_model, 4),
        "click_auc_logistic": round(auc_lr, 4),
        "logistic_l2": l2,
        "ctr_per_group": ctr_figures,
        "ctr_generated_mean": round(float(np.mean(generated)), 5),
        "ctr_random_mean": round(float(np.mean(randoms)), 5),
        "groups_generated_above_random": int(sum(g > r for g, r in zip(generated, randoms))),
        "groups": len(generated),
    }


# ------------------------------------------------------------------ CTR of prompts


def _creative_ctr(
    world: Any,
    gmllm: Any,
    features: dict[str, Any],
    log: Any,
    members: dict[str, Counter],
    generation: Any,
    products_per_group: int | None,
    reference: bool,
) -> tuple[list[list[Any]], dict[str, dict[str, float]], dict[float, list[Any]], list[Any], int]:
    from sim.judge import group_ctr
    from learner.evaluate import choose_creative
    from infra.contracts.prompt import random_prompt

    rows, figures, constrained = [], {}, []
    raw: dict[float, list[Any]] = {}
    fallbacks = 0
    reference_prompts = [random_prompt(random.Random(f"reference:{i}")) for i in range(200)] if reference else []
    for group, feats in sorted(features.items()):
        counts = members.get(group)
        if not counts:
            continue
        products = world.products[feats.category][:products_per_group]
        rng = random.Random(f"random-prompts:{group}")
        rand, sampled, chosen, best = [], [], [], []
        for index, product in enumerate(products):
            record = log.products[product.id]
            choice = choose_creative(gmllm, feats, record, generation, seed=index)
            fallbacks += choice.fallback
            constrained.extend(choice.candidates)
            for temperature in (1.0, generation.temperature):
                raw.setdefault(temperature, []).extend(gmllm.generate(
                    feats, record, n=4, seed=index, temperature=temperature, constrained=False,
                    max_new_tokens=generation.max_new_tokens,
                ))
            chosen.append(group_ctr(world, counts, product, choice.prompt))
            valid = [c.prompt for c in choice.candidates if c.prompt is not None]
            sampled.append(float(np.mean([group_ctr(world, counts, product, p) for p in valid])) if valid else chosen[-1])
            rand.append(float(np.mean([group_ctr(world, counts, product, random_prompt(rng))
                                       for _ in range(generation.candidates)])))
            if reference_prompts:
                best.append(max(group_ctr(world, counts, product, p) for p in reference_prompts))
        majority, share = counts.most_common(1)[0]
        figure = {"random": float(np.mean(rand)), "sampled": float(np.mean(sampled)),
                  "generated": float(np.mean(chosen))}
        if best:
            figure["best_of_200_random"] = float(np.mean(best))
        figures[group] = {k: round(v, 5) for k, v in figure.items()}
        row = [group, f"{majority} ({share / sum(counts.values()):.0%})", figure["random"], figure["sampled"],
               figure["generated"], f"{figure['generated'] / figure['random']:.2f}x"]
        if best:
            row.append(figure["best_of_200_random"])
        rows.append(row)
    return rows, figures, raw, constrained, fallbacks


# ------------------------------------------------------------------ logistic-regression baseline


def _lr_tokens(key: tuple[str, str, str]) -> list[str]:
    from features.group import creative_attributes

    group, product, prompt = key
    attributes = creative_attributes(prompt)
    return [f"g={group}", f"p={product}", f"gp={group}|{product}", *(f"a={a}" for a in attributes),
            *(f"x={group}|{a}" for a in attributes)]


def _design(cells: dict[tuple[str, str, str], Any], vocabulary: dict[str, int], grow: bool) -> tuple[Any, Any, Any]:
    import torch

    rows = []
    for key in cells:
        index = []
        for token in _lr_tokens(key):
            if token not in vocabulary:
                if not grow:
                    continue
                vocabulary[token] = len(vocabulary)
            index.append(vocabulary[token])
        rows.append(index)
    x = torch.zeros(len(rows), max(1, len(vocabulary)))
    for r, index in enumerate(rows):
        x[r, index] = 1.0
    pos = torch.tensor([c.clicks for c in cells.values()], dtype=torch.float64)
    neg = torch.tensor([c.impressions - c.clicks for c in cells.values()], dtype=torch.float64)
    return x.double(), pos, neg


def _fit_logistic(x: Any, pos: Any, neg: Any, l2: float) -> tuple[Any, Any]:
    """Weighted logistic regression (clicks positive, non-clicks negative) by L-BFGS; numpy-free torch."""
    import torch

    weights = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=300, line_search_fn="strong_wolfe")
    total = float((pos + neg).sum())

    def closure() -> Any:
        optimizer.zero_grad()
        z = x @ weights + bias
        loss = (pos * torch.nn.functional.softplus(-z) + neg * torch.nn.functional.softplus(z)).sum() / total
        loss = loss + l2 * (weights * weights).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach(), bias.detach()


def _logistic_auc(train_log: Any, held_cells: dict[tuple[str, str, str], Any]) -> tuple[float, float]:
    """Held-out AUC of the logistic-regression baseline; L2 chosen on the last 20 % (by time) of the training log."""
    from learner.evaluate import weighted_auc
    from learner.pretrain import split_holdout

    fit_part, valid_part = split_holdout(train_log, 0.2)
    best_l2, best_auc = L2_GRID[0], -1.0
    vocabulary: dict[str, int] = {}
    x, pos, neg = _design(fit_part.cells(), vocabulary, grow=True)
    valid_cells = valid_part.cells()
    xv, pv, nv = _design(valid_cells, vocabulary, grow=False)
    for l2 in L2_GRID:
        weights, bias = _fit_logistic(x, pos, neg, l2)
        auc = weighted_auc((xv @ weights + bias).numpy(), pv.numpy(), nv.numpy())
        if auc > best_auc:
            best_l2, best_auc = l2, auc
    vocabulary = {}
    x, pos, neg = _design(train_log.cells(), vocabulary, grow=True)
    weights, bias = _fit_logistic(x, pos, neg, best_l2)
    xh, ph, nh = _design(held_cells, vocabulary, grow=False)
    return weighted_auc((xh @ weights + bias).numpy(), ph.numpy(), nh.numpy()), best_l2
