"""Gate estimate: how well offline estimates of a candidate's CTR per group rank candidates against the truth.

A production gate has no simulated world; it has the incumbent's logged
slates (:mod:`learner.estimate`). This benchmark measures, on a world, how
well the estimates a production gate can compute rank a set of candidates
per group, against the world's truth:

1. *Base* (the incumbent): the alignment benchmark's pre-trained base of the
   world and configuration (cached under the bench output directory).
2. *Candidates*: fits from the base on one on-policy round of pairs with
   different strengths (learning rate, steps, β, SFT term, pairs of only half
   the groups, no protection), so that some groups rise and some fall.
3. *Logged slates*: the base samples ``learner.loop.onpolicy_candidates``
   creatives per (group, product) on the gate's products (those after the
   first ``ctr_products_per_group``), duplicates kept, and each is shown
   ``onpolicy_impressions`` times to the group's members (drawn clicks).
4. *Estimates* per (model, group), each over those products:
   ``ips`` (importance-weighted observed CTR of the logged slates),
   ``click_head`` (the base's click head, calibrated per group on the logged
   clicks, over the model's own samples), ``attributes`` (a per-group logistic
   regression of clicks on creative attributes, fitted on the pre-training
   traffic log and the logged slates, over the model's own samples; the
   direct method), and, as the reference a production
   gate does not have, ``resample`` (the simulated CTR of the model's own
   samples, ``ctr_draws_per_product`` draws: the benchmark's gate).
5. *Truth*: the expected CTR of the model's served slate on the same products,
   ``TRUTH_DRAWS`` draws independent of the estimates', by the world's click
   model. It is itself a sample: ``truth_half`` ranks the models by one half
   of its draws against the other half, the ceiling any estimate can reach.

Figures per estimate: the Spearman rank correlation between estimate and
truth across the models, per group (and its mean over groups), the share of
(candidate, group) where the estimate's sign of change against the base is
the truth's, and the mean relative error. ``ips_vs_resample`` and
``click_head_vs_resample`` are the ratios of mean rank correlations to the
simulator's (the baseline of the same run); ``attributes_vs_resample`` likewise. A scatter plot (estimate vs
truth) is saved as ``gate-estimate.png``. Model samples for ``click_head`` and
``attributes`` are drawn as served (``generation.temperature``); the logged
slates, as on-policy rounds draw them (``loop.onpolicy_temperature``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchOptions, pretrained_base, print_table

ROOT = Path(__file__).resolve().parents[1]
WORLD_A = ROOT / "sim" / "examples" / "world_a.yaml"
TRUTH_DRAWS = 16
QUICK_TRUTH_DRAWS = 6
TRUTH_SEED_OFFSET = 500_000
ESTIMATES = ("truth_half", "resample", "ips", "click_head", "attributes")
"""``truth_half``: one half of the truth's draws against the other half: the ceiling of any estimate's rank
correlation, set by the truth's own sampling noise."""

CANDIDATES: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("small step: lr 2e-4, 20 steps", {"learning_rate": 2e-4, "max_steps": 20, "min_steps": 20}, "all"),
    ("default fit", {}, "all"),
    ("RPO: SFT term on winners, weight 1", {"sft_weight": 1.0}, "all"),
    ("strong: lr 2e-3, β 0.1, 120 steps", {"learning_rate": 2e-3, "beta": 0.1, "max_steps": 120, "min_steps": 120},
     "all"),
    ("half the groups' pairs, no protection", {"preserve": "off"}, "half"),
    ("overfit: lr 5e-3, 200 steps, no protection",
     {"learning_rate": 5e-3, "max_steps": 200, "min_steps": 200, "preserve": "off"}, "all"),
)
"""(label, DPO setting overrides, whose pairs) of each candidate."""
QUICK_CANDIDATES = CANDIDATES[1:2] + CANDIDATES[3:5]


@dataclass(frozen=True)
class GateEstimateOptions(BenchOptions):
    """:class:`BenchOptions` plus ``learner`` (overrides of the learner settings, nested dict, for experiments)."""

    learner: dict[str, Any] = field(default_factory=dict)


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the figures listed in the module docstring."""
    from bench.alignment import QUICK_LEARNER, _merge
    from infra.settings import LearnerSettings
    from learner.pretrain import torch_threads

    base = QUICK_LEARNER if options.quick else {}
    settings = LearnerSettings(**_merge(base, getattr(options, "learner", {}) or {}))
    with torch_threads(settings.threads):
        return _run(options, settings)


def _run(options: BenchOptions, settings: Any) -> dict[str, Any]:
    from rich.progress import Progress

    from sim.judge import WorldCTR, group_members
    from sim.world import World

    started = time.perf_counter()
    world_file = Path(options.world or WORLD_A)
    world = World.load(world_file)
    loop = settings.loop
    base, features, train_log, grouper = pretrained_base(world, world_file, settings, options.output_dir)
    products = train_log.products
    members = group_members(world, grouper)
    P = loop.ctr_products_per_group

    def judge(draws: int, offset: int = 0) -> WorldCTR:
        return WorldCTR(world, members, features, products, settings.generation, P, first_product=P, draws=draws,
                        serve="slate", seed_offset=offset)

    half = (QUICK_TRUTH_DRAWS if options.quick else TRUTH_DRAWS) // 2
    truth_judge = judge(half, TRUTH_SEED_OFFSET)
    truth_judges = (truth_judge, judge(half, TRUTH_SEED_OFFSET + 1_000 * half))
    resample_judge = judge(loop.ctr_draws_per_product)
    groups = truth_judge.groups()
    targets = {g: features[g] for g in groups}
    variants = QUICK_CANDIDATES if options.quick else CANDIDATES
    with Progress(transient=True) as progress:
        task = progress.add_task("fitting candidates", total=len(variants) + 1)
        models = {"base (incumbent)": base}
        pairs = _onpolicy_pairs(base, world, members, targets, products, settings)
        for label, overrides, whose in variants:
            models[label] = _candidate(base, pairs, whose, overrides, targets, products, settings)
            progress.advance(task)
        progress.update(task, description="logging the base's slates on the gate's products")
        slates = _logged_slates(base, world, members, targets, products, truth_judge, settings)
        progress.advance(task)
        attribute_model = _attribute_model(train_log, slates)
        figures = _estimates(models, base, slates, targets, truth_judges, resample_judge, attribute_model, settings,
                             progress)
    return _report(world, world_file, options, settings, groups, models, figures, slates, pairs,
                   time.perf_counter() - started)


def _onpolicy_pairs(base: Any, world: Any, members: Mapping[str, Counter], targets: Mapping[str, Any],
                    products: Mapping[str, Any], settings: Any) -> list[Any]:
    """One on-policy round's pairs from the base, on the benchmark's training products."""
    from bench.onpolicy import slate_products
    from learner.dpo.onpolicy import mine_slate_pairs, sample_slates
    from sim.judge import simulate_slate_traffic
    from streams.pairs import PairMinerConfig

    loop = settings.loop
    shown = slate_products(world, products, sorted(targets), loop.onpolicy_products)
    slates = sample_slates(base, targets, shown, loop.onpolicy_candidates, temperature=loop.onpolicy_temperature,
                           seed=1, max_new_tokens=settings.generation.max_new_tokens)
    stats = simulate_slate_traffic(world, members, slates, loop.onpolicy_impressions, seed=1)
    categories = {pid: record.category for pid, record in products.items()}
    return mine_slate_pairs(stats, categories, PairMinerConfig(), ts=1)


def _candidate(base: Any, pairs: list[Any], whose: str, overrides: dict[str, Any], targets: Mapping[str, Any],
               products: Mapping[str, Any], settings: Any) -> Any:
    """A fit from ``base`` on ``pairs`` (``whose="half"``: only every other group's) with ``overrides``."""
    from learner.dpo.train import fit_with_protection

    if whose == "half":
        kept = set(sorted({p.group_id for p in pairs})[::2])
        pairs = [p for p in pairs if p.group_id in kept]
    learner = settings.model_copy(update={"dpo": settings.dpo.model_copy(update=overrides)})
    if not pairs:
        return base.copy()
    candidate, _, _ = fit_with_protection(base, pairs, targets, products, learner, seed=1)
    return candidate


def _logged_slates(base: Any, world: Any, members: Mapping[str, Counter], targets: Mapping[str, Any],
                   products: Mapping[str, Any], truth_judge: Any, settings: Any) -> list[Any]:
    """The base's slates on the gate's products, duplicates kept, with drawn impressions and clicks."""
    from learner.dpo.onpolicy import sample_slates
    from learner.estimate import LoggedSlate
    from sim.judge import simulate_slate_traffic

    loop = settings.loop
    shown = {g: [products[p.id] for p in truth_judge.judged_products(g)] for g in targets}
    sampled = sample_slates(base, targets, shown, loop.onpolicy_candidates, temperature=loop.onpolicy_temperature,
                            seed=2, max_new_tokens=settings.generation.max_new_tokens, distinct=False)
    stats = simulate_slate_traffic(world, members, sampled, loop.onpolicy_impressions, seed=2)
    return [LoggedSlate(group, products[product_id], tuple(texts),
                        {t: (s.impressions, s.clicks) for t, s in stats[(group, product_id)].items()})
            for (group, product_id), texts in sorted(sampled.items()) if (group, product_id) in stats]


def _attribute_model(train_log: Any, slates: list[Any]) -> Any:
    """:class:`learner.estimate.AttributeCTR` on every logged impression: the traffic log and the slates."""
    from learner.estimate import AttributeCTR

    logged = [(r.group_id, r.prompt, 1, int(r.clicked)) for r in train_log.records if r.prompt]
    logged += [(s.group, text, impressions, clicks) for s in slates for text, (impressions, clicks) in s.counts.items()]
    return AttributeCTR.fit(logged)


def _estimates(models: Mapping[str, Any], base: Any, slates: list[Any], targets: Mapping[str, Any],
               truth_judges: tuple[Any, Any], resample_judge: Any, attribute_model: Any, settings: Any,
               progress: Any) -> dict[str, dict[str, dict]]:
    """Per model: the truth (the mean of two halves; ``truth_half`` is the second, ranked against the first)
    and each estimate, per group."""
    from learner.estimate import attribute_estimate, click_head_calibration, click_head_estimate, ips_estimate

    calibration = click_head_calibration(base, slates, targets)
    task = progress.add_task("estimating", total=len(models))
    out: dict[str, dict[str, dict]] = {}
    for label, model in models.items():
        ips = ips_estimate(model, base, slates, targets)
        served = {"temperature": settings.generation.temperature, "max_new_tokens": settings.generation.max_new_tokens}
        head = click_head_estimate(model, base, slates, targets, settings.generation.candidates,
                                   calibration=calibration, **served)
        attributes = attribute_estimate(model, attribute_model, slates, targets, settings.generation.candidates,
                                        **served)
        first, second = truth_judges[0](model), truth_judges[1](model)
        out[label] = {
            "truth": {g: (first[g] + second[g]) / 2 for g in first},
            "truth_first": first,
            "truth_half": second,
            "resample": resample_judge(model),
            "ips": {g: float(np.mean(v)) for g, v in ips.items()},
            "click_head": {g: float(np.mean(v)) for g, v in head.items()},
            "attributes": {g: float(np.mean(v)) for g, v in attributes.items()},
        }
        progress.advance(task)
    return out


def _truth_for(estimate: str) -> str:
    """What an estimate is ranked against: the truth, or for ``truth_half`` the truth's other half."""
    return "truth_first" if estimate == "truth_half" else "truth"


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _report(world: Any, world_file: Path, options: BenchOptions, settings: Any, groups: list[str],
            models: Mapping[str, Any], figures: dict[str, dict[str, dict]], slates: list[Any], pairs: list[Any],
            seconds: float) -> dict[str, Any]:
    labels = list(models)
    base_label = labels[0]
    per_group: dict[str, dict[str, float]] = {}
    summary: dict[str, dict[str, float]] = {}
    for estimate in ESTIMATES:
        correlations, agree, errors = [], [], []
        against = _truth_for(estimate)
        for group in groups:
            truth = [figures[m][against][group] for m in labels]
            guess = [figures[m][estimate].get(group, float("nan")) for m in labels]
            rho = _spearman(truth, guess)
            per_group.setdefault(group, {})[estimate] = round(rho, 3)
            if not np.isnan(rho):
                correlations.append(rho)
            for i in range(1, len(labels)):
                agree.append(np.sign(guess[i] - guess[0]) == np.sign(truth[i] - truth[0]))
            errors.extend(abs(g - t) / t for g, t in zip(guess, truth, strict=True) if t > 0 and not np.isnan(g))
        summary[estimate] = {"spearman_mean": float(np.mean(correlations)) if correlations else float("nan"),
                             "sign_agreement": float(np.mean(agree)) if agree else float("nan"),
                             "relative_error": float(np.mean(errors)) if errors else float("nan")}
    print_table(f"gate estimate on {world.name}: CTR per group of each model (truth | resample | ips | click head)",
                ["model", *groups],
                [[m, *(" | ".join(f"{figures[m][k].get(g, float('nan')):.4f}" for k in ("truth", *ESTIMATES))
                       for g in groups)] for m in labels])
    print_table("rank correlation with the truth across models (Spearman), per group",
                ["estimate", *groups, "mean", "sign of change vs base agrees", "mean relative error"],
                [[e, *(per_group[g][e] for g in groups), summary[e]["spearman_mean"], summary[e]["sign_agreement"],
                  summary[e]["relative_error"]] for e in ESTIMATES])
    plot = _plot(options.output_dir / ("gate-estimate-quick.png" if options.quick else "gate-estimate.png"),
                 world.name, labels, groups, figures)
    reference = summary["resample"]["spearman_mean"]

    def ratio(name: str) -> float | None:
        value = summary[name]["spearman_mean"]
        return round(value / reference, 3) if reference and not np.isnan(reference) and not np.isnan(value) else None

    return {
        "world": world.name, "world_file": str(world_file), "quick": options.quick, "groups": len(groups),
        "models": labels, "base": base_label, "pairs": len(pairs),
        "pairs_per_group": dict(sorted(Counter(p.group_id for p in pairs).items())),
        "logged_slates": len(slates), "impressions_per_creative": settings.loop.onpolicy_impressions,
        "truth_draws": QUICK_TRUTH_DRAWS if options.quick else TRUTH_DRAWS,
        "summary": {e: {k: round(v, 4) for k, v in s.items()} for e, s in summary.items()},
        "spearman_per_group": per_group,
        "ips_vs_resample": ratio("ips"), "click_head_vs_resample": ratio("click_head"),
        "attributes_vs_resample": ratio("attributes"),
        "ctr": {m: {k: {g: round(v, 5) for g, v in figures[m][k].items()} for k in ("truth", *ESTIMATES)}
                for m in labels},
        "seconds": round(seconds, 1), "plot": str(plot),
    }


def _plot(path: Path, world: str, labels: list[str], groups: list[str], figures: dict[str, dict[str, dict]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(ESTIMATES), figsize=(4.2 * len(ESTIMATES), 4), dpi=110, sharex=True)
    for axis, estimate in zip(axes, ESTIMATES, strict=True):
        for group in groups:
            xs = [figures[m][_truth_for(estimate)][group] for m in labels]
            ys = [figures[m][estimate].get(group, np.nan) for m in labels]
            axis.plot(xs, ys, "o", label=group, alpha=0.8)
        low, high = axis.get_xlim()
        axis.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
        axis.set_title(estimate)
        axis.set_xlabel("true CTR of the served slate")
    axes[0].set_ylabel("estimated CTR")
    axes[-1].legend(fontsize=7)
    figure.suptitle(f"gate estimates on {world}: one point per (model, group)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
