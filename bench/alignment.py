"""Alignment: per-group and worst-group simulated CTR of base, one-size DPO and Group-DPO over on-policy rounds.

One run, on any valid world file (default: example world B), ``--seeds N``
repeats and ``--rounds R`` on-policy rounds:

1. *Base.* Simulate the pre-training log (``learner.pretrain.impressions``
   random creatives, grouped as the stream worker groups) and pre-train the
   G-MLLM on it (default configuration; ``--quick``: a tiny model). The base
   is deterministic and shared by every seed; seeds vary the on-policy
   sampling, the simulated clicks and the fits.
2. *Arms.* From the base: **Group-DPO** (one target per learned group, the
   group's features as prefix, inverse-share group weights, groups without
   pairs anchored) and **one-size DPO** (one target per category: the same
   features computed over the whole category, in the group format the base
   was pre-trained on, so the comparison measures the method and not the
   prompt; uniform weights, pairs pooled).
3. *Rounds* (:mod:`bench.onpolicy`): each arm's live model samples K
   creatives per (target, product); each is shown to the target's members in
   the world; the stream worker's ``PairMiner`` mines pairs among them; the
   arm fits from its live model; the gate keeps the candidate only if no
   group's simulated CTR drops beyond its interval on products the benchmark
   does not judge. Repeat.
4. *Judge.* After every round, for each learned group and the first
   ``learner.loop.ctr_products_per_group`` products of its category, the
   creative each live model serves (sampled, reranked by its click head, as in
   production) is scored by the world's click model, averaged over the
   group's members' hidden segments (:class:`sim.judge.WorldCTR`). Random
   prompts give the floor and the best of 200 random prompts per product the
   oracle ceiling.

*Baselines* (``baselines``, ``--baselines kto``): more arms from the base, each
with the group prefixes, the same slates, rounds, gate and judge as Group-DPO,
learning from the slates' impressions with what TRL ships for clicks
(:mod:`learner.baselines`: ``kto`` = TRL's KTO on single clicked / not-clicked
impressions; ``rloo`` = TRL's RLOO rewarded by the live model's click head,
calibrated per group). They appear beside the others as ``KTO`` and ``RLOO``.

Figures are means ± sd over seeds of the per-seed mean over groups and
worst group; ``lift_over_base`` = (Group-DPO − base) / base,
``oracle_lift_fraction`` = (Group-DPO − base) / (oracle − base).

A bar chart per group is saved as ``alignment.png`` under the bench output directory.
The pre-trained base is kept there too (``alignment-base-<key>``, keyed by the
world file and the model and pre-training settings) and reused by the next run
of the same world and configuration.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import QUICK_MODEL, BenchOptions, pretrained_base, print_table
from learner.baselines.config import KTOBaselineConfig, RLOOBaselineConfig
from learner.dpo.data import category_features  # noqa: F401 - re-exported for the tests and the bench

ROOT = Path(__file__).resolve().parents[1]
WORLD_B = ROOT / "sim" / "examples" / "world_b.yaml"
ORACLE_PROMPTS = 200
QUICK_ORACLE_PROMPTS = 40

QUICK_LEARNER: dict[str, Any] = {
    "model": QUICK_MODEL,
    "pretrain": {"impressions": 60_000, "creatives_per_product": 8, "steps": 80, "batch_size": 8,
                 "warmup_steps": 10, "feature_snapshots": 2},
    "generation": {"candidates": 4},
    "dpo": {"max_steps": 40, "batch_size": 8},
    "loop": {"ctr_products_per_group": 2, "onpolicy_products": 2, "onpolicy_candidates": 6},
}
MODELS = ("base", "one-size DPO", "Group-DPO")
BASELINE_ARMS: dict[str, str] = {"kto": "KTO", "rloo": "RLOO"}
"""``--baselines`` name -> the arm's name in tables and JSON (``summary.KTO`` …)."""


@dataclass(frozen=True)
class AlignmentOptions(BenchOptions):
    """:class:`BenchOptions` plus ``seeds`` (repeats), ``rounds`` (on-policy rounds), ``gate``, ``rerank``
    (``live``: each model's own click head picks the served creative; ``base``: the frozen base's), ``serve``
    (``rerank``: that pick is served; ``slate``: the sampled slate, judged by its mean, see
    :class:`sim.judge.WorldCTR`; default ``learner.loop.ctr_served``), ``baselines`` (names of
    :data:`BASELINE_ARMS`: arms beside Group-DPO, default none), ``baseline_settings`` (per baseline name,
    fields of its :mod:`learner.baselines.config` dataclass, for experiments) and ``learner`` (overrides of the learner settings, nested dict, for experiments)."""

    seeds: int = 1
    rounds: int = 1
    gate: bool = True
    rerank: str = "live"
    serve: str | None = None
    baselines: tuple[str, ...] = ()
    baseline_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    learner: dict[str, Any] = field(default_factory=dict)


def baseline_configs(names: tuple[str, ...], overrides: dict[str, dict[str, Any]], settings: Any) -> dict[str, Any]:
    """The configuration of each baseline in ``names``: its defaults (RLOO's completions as long as served
    ones) with ``overrides[name]``. Raises ``ValueError`` for settings of a baseline not asked for."""
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"baseline_settings: {', '.join(unknown)} not among the baselines run ({', '.join(names)})")
    defaults = {"kto": (KTOBaselineConfig, {}),
                "rloo": (RLOOBaselineConfig, {"max_completion_length": settings.generation.max_new_tokens})}
    return {n: defaults[n][0](**{**defaults[n][1], **overrides.get(n, {})}) for n in names}


def check_baselines(names: Any) -> tuple[str, ...]:
    """``names`` (a sequence, or one comma-separated string) as a tuple of known baselines, in order, once each.

    Raises ``ValueError`` naming the option and the allowed values.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    out: list[str] = []
    for name in (str(n).strip().lower() for n in names or ()):
        if name not in BASELINE_ARMS:
            raise ValueError(f"baselines: unknown baseline {name!r}; choose from {', '.join(BASELINE_ARMS)} "
                             f"(comma-separated, e.g. --baselines {','.join(BASELINE_ARMS)})")
        if name not in out:
            out.append(name)
    return tuple(out)


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the figures listed in the module docstring."""
    from infra.settings import LearnerSettings
    from learner.pretrain import torch_threads

    base = QUICK_LEARNER if options.quick else {}
    overrides = getattr(options, "learner", {}) or {}
    settings = LearnerSettings(**_merge(base, overrides))
    # checked before any pre-training: unknown names or fields fail at once
    baseline_configs(check_baselines(getattr(options, "baselines", ())), getattr(options, "baseline_settings", {})
                     or {}, settings)
    with torch_threads(settings.threads):
        return _run(options, settings)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _run(options: BenchOptions, settings: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    from bench.onpolicy import Arm, default_gate, onpolicy_round
    from learner.dpo.onpolicy import target_groups
    from sim.judge import WorldCTR, group_members
    from sim.world import World

    seeds = max(1, int(getattr(options, "seeds", 1)))
    rounds = max(0, int(getattr(options, "rounds", 1)))
    gated = bool(getattr(options, "gate", True))
    baselines = {BASELINE_ARMS[b]: b for b in check_baselines(getattr(options, "baselines", ()))}
    configs = baseline_configs(tuple(baselines.values()), getattr(options, "baseline_settings", {}) or {}, settings)
    models = MODELS + tuple(baselines)
    world_file = Path(options.world or WORLD_B)
    world = World.load(world_file)
    started = time.perf_counter()
    base, features, train_log, grouper = pretrained_base(world, world_file, settings, options.output_dir)
    base_s = time.perf_counter() - started
    products = train_log.products
    members = group_members(world, grouper)
    loop = settings.loop
    scorer = base if getattr(options, "rerank", "live") == "base" else None
    serve = getattr(options, "serve", None) or loop.ctr_served
    judge = WorldCTR(world, members, features, products, settings.generation, loop.ctr_products_per_group,
                     scorer=scorer, serve=serve)
    groups = judge.groups()
    by_category: dict[str, list[str]] = {}
    for group in groups:
        by_category.setdefault(group.split("/", 1)[0], []).append(group)
    one_size_features = {c: f for c, f in category_features(train_log).items() if c.split("/", 1)[0] in by_category}
    one_size_members: dict[str, Counter] = {}
    for category, in_category in by_category.items():
        total: Counter = Counter()
        for group in in_category:
            total.update(members[group])
        one_size_members[f"{category}/all"] = total
    serve_one_size = {g: one_size_features[f"{g.split('/', 1)[0]}/all"] for g in groups}
    judges = {
        "base": judge, "Group-DPO": judge,
        "one-size DPO": WorldCTR(world, members, serve_one_size, products, settings.generation,
                                 loop.ctr_products_per_group, scorer=scorer, serve=serve),
    }
    gate_judges = {
        name: WorldCTR(world, members, j.features, products, settings.generation, loop.ctr_products_per_group,
                       first_product=loop.ctr_products_per_group, scorer=scorer, draws=loop.ctr_draws_per_product,
                       serve=serve)
        for name, j in judges.items()
    } if gated else {}
    for name in baselines:  # Group-DPO's judges: the same prefixes, products and draws
        judges[name] = judge
        if gated:
            gate_judges[name] = gate_judges["Group-DPO"]
    gate = default_gate(settings)

    base_ctr = judge(base)
    base_sampled = dict(judge.last_sampled)
    # per model: per seed: per round (0 = base): ctr per group
    series: dict[str, list[list[dict[str, float]]]] = {m: [] for m in models[1:]}
    sampled: dict[str, list[dict[str, float]]] = {m: [] for m in models[1:]}
    round_log: list[dict[str, Any]] = []
    for seed in range(seeds):
        arms = [
            Arm("one-size DPO", base, dict(one_size_features), dict(one_size_members), one_size=True),
            Arm("Group-DPO", base, {g: features[g] for g in groups}, {g: members[g] for g in groups},
                one_size=False),
            *(Arm(name, base, {g: features[g] for g in groups}, {g: members[g] for g in groups}, one_size=False,
                  method=method, config=configs[method]) for name, method in baselines.items()),
        ]
        for arm in arms:
            trace = [base_ctr if judges[arm.name] is judge else judges[arm.name](base)]
            live_sampled = dict(judges[arm.name].last_sampled)
            for number in range(1, rounds + 1):
                with Progress(transient=True) as progress:
                    progress.add_task(f"seed {seed} round {number}: {arm.name}", total=None)
                    figures = onpolicy_round(arm, world, products, settings, seed=seed, round_number=number,
                                             gate_judge=gate_judges.get(arm.name), gate=gate)
                live, candidate_ctr = dict(trace[-1]), {}
                for candidate, fitted_for, moved in figures.pop("candidates"):
                    served = [g for t in fitted_for for g in target_groups(t, groups)]
                    went_live = [g for t in moved for g in target_groups(t, groups)]
                    lineage_judge = judges[arm.name].restricted(served)
                    ctr = lineage_judge(candidate)
                    candidate_ctr.update(ctr)
                    live.update({g: ctr[g] for g in went_live})
                    live_sampled.update({g: lineage_judge.last_sampled[g] for g in went_live})
                trace.append(live)
                figures["candidate_ctr"] = {g: round(v, 5) for g, v in sorted(candidate_ctr.items())} or None
                if candidate_ctr:
                    figures["candidate_mean"] = round(float(np.mean(list(candidate_ctr.values()))), 5)
                figures["live_mean"] = round(float(np.mean([trace[-1][g] for g in groups])), 5)
                figures["live_worst"] = round(min(trace[-1][g] for g in groups), 5)
                round_log.append({"seed": seed, "model": arm.name, **figures})
                progress_line = (f"seed {seed} round {number} {arm.name}: {_learned_from(figures)}, "
                                 f"{_verdict(figures, len(arm.targets))}; "
                                 f"live mean {figures['live_mean']:.4f} worst {figures['live_worst']:.4f}")
                Console(stderr=True).print(progress_line, highlight=False)
            series[arm.name].append(trace)
            sampled[arm.name].append(live_sampled)
    random_ctr = judge.random_ctr()
    oracle = judge.oracle_ctr(QUICK_ORACLE_PROMPTS if options.quick else ORACLE_PROMPTS)

    def stats(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    final = {m: [trace[-1] for trace in series[m]] for m in series}
    final["base"] = [base_ctr] * seeds
    summary: dict[str, dict[str, float]] = {}
    for model in models:
        means = [float(np.mean([c[g] for g in groups])) for c in final[model]]
        worsts = [min(c[g] for g in groups) for c in final[model]]
        (m, m_sd), (w, w_sd) = stats(means), stats(worsts)
        summary[model] = {"mean": m, "mean_sd": m_sd, "worst": w, "worst_sd": w_sd}
    summary["random"] = {"mean": float(np.mean([random_ctr[g] for g in groups])),
                         "worst": min(random_ctr[g] for g in groups), "mean_sd": 0.0, "worst_sd": 0.0}
    summary["oracle"] = {"mean": float(np.mean([oracle[g] for g in groups])), "worst": min(oracle[g] for g in groups),
                         "mean_sd": 0.0, "worst_sd": 0.0}
    per_round = []
    for number in range(rounds + 1):
        row: dict[str, Any] = {"round": number}
        for model in series:
            means = [float(np.mean([trace[number][g] for g in groups])) for trace in series[model]]
            worsts = [min(trace[number][g] for g in groups) for trace in series[model]]
            (m, m_sd), (w, w_sd) = stats(means), stats(worsts)
            row[model] = {"mean": round(m, 5), "mean_sd": round(m_sd, 5), "worst": round(w, 5),
                          "worst_sd": round(w_sd, 5)}
        per_round.append(row)
    per_group: dict[str, dict[str, Any]] = {}
    for group in groups:
        entry: dict[str, Any] = {}
        for model in models:
            m, sd = stats([c[group] for c in final[model]])
            entry[model] = {"mean": round(m, 5), "sd": round(sd, 5)}
        g, g_sd = entry["Group-DPO"]["mean"], entry["Group-DPO"]["sd"]
        o, o_sd = entry["one-size DPO"]["mean"], entry["one-size DPO"]["sd"]
        entry["above_base_1sd"] = bool(g - g_sd > entry["base"]["mean"])
        entry["above_one_size_1sd"] = bool(g - max(g_sd, o_sd) > o)
        per_group[group] = entry
    pair_counts: Counter = Counter()
    for entry in round_log:
        if entry["model"] == "Group-DPO":
            pair_counts.update(entry["pairs_per_group"])

    g_sum, b_sum, o_sum, one = summary["Group-DPO"], summary["base"], summary["oracle"], summary["one-size DPO"]
    lift = {"mean": (g_sum["mean"] - b_sum["mean"]) / b_sum["mean"],
            "worst": (g_sum["worst"] - b_sum["worst"]) / b_sum["worst"]}
    headroom = o_sum["mean"] - b_sum["mean"]
    oracle_fraction = (g_sum["mean"] - b_sum["mean"]) / headroom if headroom > 0 else float("nan")
    goals = {
        "lift_mean_ge_10pct": lift["mean"] >= 0.10,
        "lift_worst_ge_0": lift["worst"] >= 0.0,
        "worst_ge_1.1x_one_size": g_sum["worst"] >= 1.1 * one["worst"],
        "oracle_lift_fraction_ge_0.5": oracle_fraction >= 0.5,
    }

    def pm(model: str, key: str) -> str:
        s = summary[model]
        return f"{s[key]:.4f} ± {s[key + '_sd']:.4f}"

    rows = []
    for group in groups:
        majority, count = members[group].most_common(1)[0]
        rows.append([group, f"{majority} ({count / sum(members[group].values()):.0%})", pair_counts.get(group, 0),
                     random_ctr[group], *(f"{per_group[group][m]['mean']:.4f} ± {per_group[group][m]['sd']:.4f}"
                                          for m in models), oracle[group],
                     ("↑base " if per_group[group]["above_base_1sd"] else "") +
                     ("↑1size" if per_group[group]["above_one_size_1sd"] else "")])
    for label in ("mean", "worst"):
        rows.append(["mean of groups" if label == "mean" else "worst group", "", sum(pair_counts.values()),
                     summary["random"][label],
                     *(pm(m, label) for m in models), summary["oracle"][label], ""])
    print_table(f"alignment on {world.name}: simulated CTR of the served creative per group after {rounds} "
                f"on-policy round(s), mean ± sd over {seeds} seed(s)",
                ["group", "majority segment", "pairs (all rounds)", "random", *models, "oracle",
                 "Group-DPO > (1 sd)"], rows)
    print_table("per round (live models, mean ± sd over seeds)", ["round", "model", "mean", "worst"],
                [[r["round"], m, f"{r[m]['mean']:.4f} ± {r[m]['mean_sd']:.4f}",
                  f"{r[m]['worst']:.4f} ± {r[m]['worst_sd']:.4f}"] for r in per_round for m in series])
    mean_ctr = {m: {g: float(np.mean([c[g] for c in final[m]])) for g in groups} for m in models}
    plot = _plot(options.output_dir / ("alignment-quick.png" if options.quick else "alignment.png"), world.name,
                 groups, {"random": random_ctr, **mean_ctr, "oracle": oracle})
    total_pairs = sum(pair_counts.values())
    figures: dict[str, Any] = {
        "world": world.name,
        "world_file": str(world_file),
        "quick": options.quick,
        "seeds": seeds,
        "rounds": rounds,
        "gate": gated,
        "rerank": getattr(options, "rerank", "live"),
        "serve": serve,
        "groups": len(groups),
        "pairs_train": total_pairs,
        "pairs_per_group": dict(sorted(pair_counts.items())),
        "base_seconds": round(base_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "ctr_per_group": {m: {g: round(v, 5) for g, v in mean_ctr[m].items()} for m in models},
        "sampled_ctr_per_group": {"base": {g: round(v, 5) for g, v in base_sampled.items()},
                                  **{m: {g: round(float(np.mean([s[g] for s in sampled[m] if g in s])), 5)
                                         for g in groups} for m in sampled}},
        "random_ctr_per_group": {g: round(v, 5) for g, v in random_ctr.items()},
        "oracle_ctr_per_group": {g: round(v, 5) for g, v in oracle.items()},
        "summary": {m: {k: round(v, 5) for k, v in s.items()} for m, s in summary.items()},
        "per_round": per_round,
        "per_group": per_group,
        "lift_over_base": {k: round(v, 4) for k, v in lift.items()},
        "oracle_lift_fraction": round(oracle_fraction, 4),
        "goals": goals,
        "rounds_log": round_log,
        "settings": {"dpo": settings.dpo.model_dump(mode="json"),
                     "loop": settings.loop.model_dump(mode="json", exclude={"model_repository"}),
                     "generation": settings.generation.model_dump(mode="json")},
        "plot": str(plot),
    }
    figures["group_vs_one_size_mean"] = round(g_sum["mean"] / one["mean"], 4)
    figures["group_vs_one_size_worst"] = round(g_sum["worst"] / one["worst"], 4)
    figures["group_vs_base_mean"] = round(g_sum["mean"] / b_sum["mean"], 4)
    if baselines:
        figures["baselines"] = _baseline_verdicts(summary, baselines)
        figures["settings"]["baselines"] = {key: asdict(config) for key, config in configs.items()}
        for name, verdict in figures["baselines"].items():
            Console(stderr=True).print(verdict["verdict"], highlight=False)
    if not total_pairs:
        figures["note"] = "no preference pair was mined in any round; the fine-tunes stayed at the base"
    return figures


def _verdict(figures: dict[str, Any], targets: int) -> str:
    """What the gate did, for the progress line: ``promoted``, ``live for k of n targets`` or ``kept: why``."""
    if not figures["promoted"]:
        return "kept: " + figures["reason"]
    moved = len(figures.get("promoted_targets") or [])
    return "promoted" if moved in (0, targets) else f"live for {moved} of {targets} targets"


def _learned_from(figures: dict[str, Any]) -> str:
    """What an arm's round learned from, for the progress line."""
    method = figures.get("method")
    if method == "kto":
        return f"{figures.get('rows', 0)} rows of {figures['clicks']:,} clicks"
    if method == "rloo":
        return f"{figures.get('prompts', 0)} prompts, valid share {figures.get('valid_share')}"
    return (f"{figures['pairs']} pairs ({figures.get('mirrored', 0)} mirrored, "
            f"{figures.get('anchors', 0)} anchors)")


def _baseline_verdicts(summary: dict[str, dict[str, float]], baselines: dict[str, str]) -> dict[str, Any]:
    """Per baseline arm: its mean and worst group against Group-DPO's, and a one-line verdict.

    A baseline *wins* when its mean over groups is above Group-DPO's by more than both arms' sd over seeds
    (at least 1 % of Group-DPO's mean with one seed) and its worst group is not lower beyond the same margin.
    """
    g = summary["Group-DPO"]
    out: dict[str, Any] = {}
    for name, key in baselines.items():
        b = summary[name]
        margin_mean = max(b["mean_sd"], g["mean_sd"], 0.01 * g["mean"])
        margin_worst = max(b["worst_sd"], g["worst_sd"], 0.01 * g["worst"])
        wins = b["mean"] - g["mean"] > margin_mean and g["worst"] - b["worst"] <= margin_worst
        loses = g["mean"] - b["mean"] > margin_mean
        verdict = ("wins over" if wins else "loses to" if loses else "ties with")
        out[name] = {
            "option": key,
            "mean_vs_group_dpo": round(b["mean"] / g["mean"], 4) if g["mean"] else float("nan"),
            "worst_vs_group_dpo": round(b["worst"] / g["worst"], 4) if g["worst"] else float("nan"),
            "wins": bool(wins),
            "verdict": (f"{name} {verdict} Group-DPO: mean {b['mean']:.4f} vs {g['mean']:.4f}, worst group "
                        f"{b['worst']:.4f} vs {g['worst']:.4f}"),
        }
    return out


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
