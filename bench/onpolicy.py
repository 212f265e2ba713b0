"""On-policy rounds of the alignment benchmark: sample from the live model, simulate, mine, fit, gate.

One :class:`Arm` is one learner under test (Group-DPO, or the one-size
baseline) with its live model. :func:`onpolicy_round` runs one round for it:

1. the live model samples ``learner.loop.onpolicy_candidates`` creatives per
   (target, product) (:func:`learner.dpo.onpolicy.sample_slates`); a target
   is a learned group (Group-DPO) or a whole category (one-size);
2. each creative is shown ``onpolicy_impressions`` times to the target's
   members in the world (:func:`sim.judge.simulate_slate_traffic`);
3. the stream worker's :class:`streams.pairs.PairMiner` mines pairs among
   each slate, then the margin filter (``pair_min_lift``) and, optionally,
   only the best winner's pairs;
4. Group-DPO: groups without pairs are protected (``learner.dpo.preserve``):
   mirrored pairs (:func:`learner.dpo.onpolicy.mirrored_pairs`) or SFT
   anchors on the live model's own samples (:func:`learner.dpo.onpolicy.quiet_group_anchors`);
5. fit from the live model (also the round's frozen reference) on the fresh
   pairs plus those mined from the same live model in earlier rounds whose
   candidate the gate refused (all of them are its own samples);
6. the gate (:func:`learner.gate.decide`) compares candidate and live model
   by simulated CTR per group on *other* products than the benchmark judges
   (``gate_judge``), each group within its interval; a refused candidate is
   dropped and the live model stays.
7. repair (``learner.loop.repair_fits``): a candidate refused because groups
   regressed is refitted from the live model without those groups' pairs
   (they become groups without evidence, held by ``dpo.preserve``) and gated
   again; the round's figures keep what the refused fits were refused for.

A baseline arm (``Arm.method``) gets the same slates, traffic and gate but
learns otherwise: ``kto`` fits TRL's KTO on single clicked / not-clicked
impressions of the slates (:func:`learner.baselines.kto.fit_kto`) instead of
mining pairs; ``rloo`` fits TRL's RLOO on the slates' prompts with the live
model's click head, calibrated per group on the slates, as the reward
(:func:`learner.baselines.rloo.fit_rloo`); slate traffic of the same live model from rounds whose candidate
the gate refused is kept, as pairs are for Group-DPO.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from features.group import GroupFeatures
from infra.settings import LearnerSettings
from learner.baselines.config import KTOBaselineConfig, RLOOBaselineConfig
from learner.data import ProductRecord
from learner.dpo.onpolicy import (
    best_winner_pairs,
    lineages,
    target_groups,
    mine_slate_pairs,
    protection_for,
    sample_slates,
    with_margin,
)
from learner.dpo.train import protected_fit
from learner.gate import GateConfig, GroupFigures, decide, passing_units, regressed_groups
from learner.model.gmllm import GMLLM
from learner.round import gate_config, judged, judged_pair
from sim.judge import WorldCTR, simulate_slate_traffic
from sim.world import World
from streams.ctr import CreativeStats
from streams.pairs import PairMinerConfig

METHODS = ("dpo", "kto", "rloo")
"""How an arm learns from its slates: Group-DPO on mined pairs, or a baseline (:mod:`learner.baselines`)."""


@dataclass
class Arm:
    """One learner under test and its live model.

    ``targets``: what the model reads per training target (group id or
    ``<category>/all``); ``target_members``: the world segments of each
    target's users; ``one_size``: uniform pair weights, no anchors;
    ``method``: ``dpo`` (Group-DPO, or one-size DPO with ``one_size``) or a
    baseline of :data:`METHODS`; ``config``: the baseline's configuration
    (:mod:`learner.baselines.config`; ``None``: its defaults).
    """

    name: str
    model: GMLLM
    targets: dict[str, GroupFeatures | str]
    target_members: dict[str, Counter]
    one_size: bool
    gate_figures: dict[str, GroupFigures] | None = None
    """The live model's figures by the gate's judge (computed once per live model)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)
    """Pairs mined from the live model's own samples since it went live (kept while the gate refuses); for a
    baseline, the slate traffic (one counts dict per round)."""
    method: str = "dpo"
    config: Any = None
    live: dict[str, GMLLM] = field(default_factory=dict)
    """Per-group promotion (``learner.loop.promotion = "group"``): the live model of each target whose model
    is not ``model`` (empty: ``model`` serves every target)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Arm.method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def live_model(self, target: str) -> GMLLM:
        """The model that serves ``target``."""
        return self.live.get(target, self.model)

    def lineages(self, split: str = "version") -> list[tuple[GMLLM, list[str]]]:
        """The targets grouped by the live model that serves them, in target order (``split``:
        :func:`learner.dpo.onpolicy.lineages`)."""
        return lineages(self.targets, self.live_model, split)


def slate_products(world: World, products: Mapping[str, ProductRecord], targets: Sequence[str],
                   count: int) -> dict[str, list[ProductRecord]]:
    """The first ``count`` products of each target's category (those the learner knows)."""
    out = {}
    for target in targets:
        category = target.split("/", 1)[0]
        out[target] = [products[p.id] for p in world.products.get(category, []) if p.id in products][:count]
    return out


def onpolicy_round(
    arm: Arm,
    world: World,
    products: Mapping[str, ProductRecord],
    settings: LearnerSettings,
    *,
    seed: int,
    round_number: int,
    gate_judge: WorldCTR | None,
    gate: GateConfig | None = None,
) -> dict[str, Any]:
    """Run one on-policy round for ``arm`` (see the module docstring); returns its figures.

    ``candidates`` in the figures lists each fit as (candidate, the targets it was fitted for, the targets it
    went live for). With ``learner.loop.promotion = "group"`` (Group-DPO and one-size arms) each lineage, the
    targets one live model serves, is fitted from that model on its own targets' pairs and gated per target:
    the candidate goes live for each target whose groups it raises without regressing (:func:`decide` on that
    target's groups), and the other targets keep their model.
    """
    if settings.loop.promotion == "group" and arm.method == "dpo":
        return _per_target_round(arm, world, products, settings, seed=seed, round_number=round_number,
                                 gate_judge=gate_judge, gate=gate)
    result = _round(arm, world, products, settings, seed=seed, round_number=round_number, gate_judge=gate_judge,
                    gate=gate)
    candidate = result.pop("candidate")
    moved = sorted(arm.targets) if result.get("promoted") else []
    return result | {"candidates": [] if candidate is None else [(candidate, sorted(arm.targets), moved)]}


def _per_target_round(arm: Arm, world: World, products: Mapping[str, ProductRecord], settings: LearnerSettings,
                      *, seed: int, round_number: int, gate_judge: WorldCTR | None,
                      gate: GateConfig | None) -> dict[str, Any]:
    """One round per lineage (see :func:`onpolicy_round`); the figures of all of them, summed or listed."""
    started = time.perf_counter()
    judged_groups = gate_judge.groups() if gate_judge is not None else []
    results: list[dict[str, Any]] = []
    candidates: list[tuple[GMLLM, list[str], list[str]]] = []
    for model, targets in arm.lineages(settings.loop.lineage):
        groups = [g for t in targets for g in target_groups(t, judged_groups)]
        known = arm.gate_figures or {}
        lineage = Arm(arm.name, model, {t: arm.targets[t] for t in targets},
                      {t: arm.target_members[t] for t in targets if t in arm.target_members}, arm.one_size,
                      gate_figures={g: known[g] for g in groups} if all(g in known for g in groups) else None,
                      pending=[p for p in arm.pending if p.group_id in targets], method=arm.method,
                      config=arm.config)
        lineage_judge = gate_judge.restricted(groups) if gate_judge is not None else None
        result = _round(lineage, world, products, settings, seed=seed, round_number=round_number,
                        gate_judge=lineage_judge, gate=gate, per_target=True)
        candidate = result.pop("candidate")
        moved = result.get("promoted_targets", [])
        for target in moved:
            arm.live[target] = candidate
        arm.gate_figures = {**known, **(lineage.gate_figures or {})}
        arm.pending = [p for p in arm.pending if p.group_id not in targets] + \
            [p for p in lineage.pending if settings.loop.onpolicy_replay or p.group_id not in moved]
        if candidate is not None:
            candidates.append((candidate, targets, moved))
        results.append(result | {"targets": targets})
    models = {id(m): m for m in arm.live.values()}
    if len(models) == 1 and set(arm.live) == set(arm.targets):  # one model serves every target again
        arm.model, arm.live = next(iter(models.values())), {}
    figures = _summed(results, round_number)
    figures.update(seconds=round(time.perf_counter() - started, 1), lineages=results,
                   live_models=len(arm.lineages()))
    arm.history.append(figures)
    return figures | {"candidates": candidates}


def _summed(results: list[dict[str, Any]], round_number: int) -> dict[str, Any]:
    """A round's figures over its lineages: counts added, per-group figures merged, reasons joined."""
    figures: dict[str, Any] = {"round": round_number}
    for key in ("slates", "creatives", "pairs_mined", "pairs_fresh", "pairs", "anchors", "mirrored", "steps"):
        figures[key] = sum(r.get(key, 0) for r in results)
    figures["fit_seconds"] = round(sum(r.get("fit_seconds", 0.0) for r in results), 1)
    figures["pairs_per_group"] = dict(sorted({g: n for r in results
                                              for g, n in r.get("pairs_per_group", {}).items()}.items()))
    figures["groups_without_pairs"] = sorted(g for r in results for g in r.get("groups_without_pairs", []))
    figures["promoted_targets"] = sorted(t for r in results for t in r.get("promoted_targets", []))
    figures["promoted"] = bool(figures["promoted_targets"])
    figures["reason"] = "; ".join(f"{'+'.join(r['targets'])}: {r.get('reason', '')}" for r in results)
    return figures


def _round(
    arm: Arm,
    world: World,
    products: Mapping[str, ProductRecord],
    settings: LearnerSettings,
    *,
    seed: int,
    round_number: int,
    gate_judge: WorldCTR | None,
    gate: GateConfig | None = None,
    per_target: bool = False,
) -> dict[str, Any]:
    """One round of one live model for all of ``arm``'s targets (``per_target``: gated per target)."""
    loop = settings.loop
    started = time.perf_counter()
    targets = sorted(arm.targets)
    shown = slate_products(world, products, targets, loop.onpolicy_products)
    slates = sample_slates(arm.model, arm.targets, shown, loop.onpolicy_candidates,
                           temperature=loop.onpolicy_temperature, seed=seed * 1_000 + round_number,
                           max_new_tokens=settings.generation.max_new_tokens)
    stats = simulate_slate_traffic(world, arm.target_members, slates, loop.onpolicy_impressions,
                                   seed=seed * 1_000 + round_number)
    if arm.method != "dpo":
        return _baseline_round(arm, stats, slates, products, settings, seed=seed, round_number=round_number,
                               gate_judge=gate_judge, gate=gate, started=started)
    categories = {pid: record.category for pid, record in products.items()}
    pairs = mine_slate_pairs(stats, categories, PairMinerConfig(), ts=round_number)
    mined = len(pairs)
    pairs = with_margin(pairs, loop.pair_min_lift)
    if loop.pair_best_winner:
        pairs = best_winner_pairs(pairs)
    fresh = len(pairs)
    fresh_per_group = dict(sorted(Counter(p.group_id for p in pairs).items()))
    seen = {p.pair_id for p in pairs}
    pairs = pairs + [p for p in arm.pending if p.pair_id not in seen]  # same live model: still on-policy
    arm.pending = list(pairs)
    quiet = sorted(set(targets) - {p.group_id for p in pairs})
    held = protection_for(pairs, arm.model, arm.targets, products, settings, seed * 1_000 + round_number,
                          arm.one_size)
    anchors, mirrored = held.anchors, held.mirrored
    figures: dict[str, Any] = {
        "round": round_number, "slates": len(slates), "creatives": sum(len(s) for s in slates.values()),
        "pairs_mined": mined, "pairs_fresh": fresh, "pairs": len(pairs),
        "pairs_per_group": fresh_per_group,
        "anchors": len(anchors), "mirrored": len(mirrored), "groups_without_pairs": quiet,
    }
    if not pairs:
        figures.update(promoted=False, reason="no pair mined", seconds=round(time.perf_counter() - started, 1))
        arm.history.append(figures)
        return figures | {"candidate": None}
    dpo = settings.dpo.model_copy(update={"group_weighting": "uniform", "seed": settings.dpo.seed + seed}) \
        if arm.one_size else settings.dpo.model_copy(update={"seed": settings.dpo.seed + seed})
    candidate, fit = _fit(arm, pairs, held, products, settings, dpo)
    figures.update(steps=fit.steps, fit_seconds=round(fit.seconds, 1), anchors=fit.anchors)
    result = _gated(arm, candidate, figures, settings, gate_judge, gate, started, per_target)
    held_back: list[str] = []
    while not per_target and not result["promoted"] and result.get("regressed") \
            and result.get("repair", 0) < loop.repair_fits:
        if set(result["regressed"]) <= set(held_back):
            break  # nothing new to hold back: the same fit again
        held_back = sorted({*held_back, *result["regressed"]})
        held_targets = {f"{g.split('/', 1)[0]}/all" for g in held_back} if arm.one_size else set(held_back)
        kept = [p for p in pairs if p.group_id not in held_targets]
        if not kept:
            break
        arm.history.pop()  # the refused fit's figures are kept inside the repair's
        held = protection_for(kept, arm.model, arm.targets, products, settings, seed * 1_000 + round_number,
                              arm.one_size)
        candidate, fit = _fit(arm, kept, held, products, settings, dpo)
        refused = {k: result[k] for k in ("reason", "gate_mean", "steps", "anchors", "mirrored") if k in result}
        figures = {**figures, "repair": result.get("repair", 0) + 1, "held_back": held_back,
                   "refused_before_repair": [*figures.get("refused_before_repair", []), refused],
                   "steps": fit.steps, "anchors": fit.anchors, "mirrored": len(held.mirrored),
                   "fit_seconds": round(figures.get("fit_seconds", 0) + fit.seconds, 1)}
        figures.pop("regressed", None)
        result = _gated(arm, candidate, figures, settings, gate_judge, gate, started)
    return result


def _fit(arm: Arm, pairs: list[Any], held: Any, products: Mapping[str, ProductRecord], settings: LearnerSettings,
         dpo: Any) -> tuple[GMLLM, Any]:
    """Step 5: a copy of the live model fitted on ``pairs`` plus the protection ``held`` (mirrored pairs at
    ``preserve_weight``, anchors); returns the candidate and the fit (:func:`learner.dpo.onpolicy.protected_fit`)."""
    return protected_fit(arm.model, pairs, held, arm.targets, products, settings, dpo)


def _gated(arm: Arm, candidate: GMLLM, figures: dict[str, Any], settings: LearnerSettings,
           gate_judge: WorldCTR | None, gate: GateConfig | None, started: float,
           per_target: bool = False) -> dict[str, Any]:
    """Step 6: the gate keeps ``candidate`` (the arm's new live model) or drops it; the round's figures.

    ``per_target``: the candidate is judged per target (``promoted_targets``: those whose groups pass
    :func:`decide` on their own); ``arm.gate_figures`` and ``arm.pending`` follow the targets that moved,
    ``arm.model`` is left to the caller.
    """
    if gate_judge is None:
        figures.update(promoted=True, reason="no gate", promoted_targets=sorted(arm.targets))
        arm.model = candidate
        if not settings.loop.onpolicy_replay:
            arm.pending = []
    else:
        if settings.loop.ctr_estimate == "reweight":
            new_figures, arm.gate_figures = judged_pair(gate_judge, candidate, arm.model, estimate="reweight")
        else:
            if arm.gate_figures is None:
                arm.gate_figures = judged(gate_judge, arm.model)
            new_figures = judged(gate_judge, candidate)
        config = gate or GateConfig()
        whole = decide(new_figures, arm.gate_figures, config)
        figures.update(gate_mean=(round(whole.overall_incumbent, 5), round(whole.overall_candidate, 5)))
        groups = gate_judge.groups()
        moved = passing_units(new_figures, arm.gate_figures, {t: target_groups(t, groups) for t in arm.targets},
                              config) if per_target else (sorted(arm.targets) if whole.promote else [])
        if per_target and moved and not whole.promote:
            reason = f"live for {', '.join(moved)} only; {whole.reason}"
        else:
            reason = whole.reason
        figures.update(promoted=bool(moved), promoted_targets=moved, reason=reason)
        if set(moved) != set(arm.targets):
            figures["regressed"] = regressed_groups(new_figures, arm.gate_figures, config)
        moved_groups = {g for t in moved for g in target_groups(t, groups)}
        arm.gate_figures = {**arm.gate_figures, **{g: new_figures[g] for g in moved_groups if g in new_figures}}
        if settings.loop.onpolicy_replay:
            pass  # earlier rounds' pairs stay, as in the production buffer
        elif set(moved) == set(arm.targets):
            arm.pending = []
        elif moved:  # only per target, and only a Group-DPO arm's pending pairs (a baseline keeps its traffic)
            arm.pending = [p for p in arm.pending if p.group_id not in moved]
        if whole.promote and not per_target:
            arm.model = candidate
    figures["seconds"] = round(time.perf_counter() - started, 1)
    arm.history.append(figures)
    return figures | {"candidate": candidate}


def merged_stats(rounds: Sequence[Mapping[tuple[str, str], Mapping[str, CreativeStats]]]
                 ) -> dict[tuple[str, str], dict[str, CreativeStats]]:
    """Slate traffic of several rounds as one: counts of the same (group, product, creative) added."""
    out: dict[tuple[str, str], dict[str, CreativeStats]] = {}
    for stats in rounds:
        for key, creatives in stats.items():
            slate = out.setdefault(key, {})
            for text, counts in creatives.items():
                slate.setdefault(text, CreativeStats(0, 0)).add(counts)
    return out


def _baseline_round(arm: Arm, stats: dict[tuple[str, str], dict[str, CreativeStats]], slates: Mapping[Any, Any],
                    products: Mapping[str, ProductRecord], settings: LearnerSettings, *, seed: int,
                    round_number: int, gate_judge: WorldCTR | None, gate: GateConfig | None,
                    started: float) -> dict[str, Any]:
    """Steps 3–6 for a baseline arm: fit on the slates' impressions (this round's and those kept while the gate
    refused), then the same gate."""
    from learner.baselines.kto import fit_kto
    from learner.baselines.rloo import fit_rloo

    arm.pending = [*arm.pending, stats]
    traffic = merged_stats(arm.pending)
    impressions = sum(c.impressions for slate in stats.values() for c in slate.values())
    clicks = sum(c.clicks for slate in stats.values() for c in slate.values())
    figures: dict[str, Any] = {
        "round": round_number, "method": arm.method, "slates": len(slates),
        "creatives": sum(len(s) for s in slates.values()), "impressions": impressions, "clicks": clicks,
        "pairs": 0, "pairs_per_group": {}, "groups_without_pairs": [],
    }
    dpo = settings.dpo.model_copy(update={"seed": settings.dpo.seed + seed})
    candidate = arm.model.copy()
    try:
        if arm.method == "kto":
            fit = fit_kto(candidate, arm.model, traffic, arm.targets, products, dpo,
                          arm.config or KTOBaselineConfig())
            figures.update(rows=fit.pairs, rows_per_group=fit.pairs_per_group)
        else:
            config = arm.config or RLOOBaselineConfig(max_completion_length=settings.generation.max_new_tokens)
            fit, extra = fit_rloo(candidate, arm.model, traffic, arm.targets, products, dpo, config)
            figures.update(prompts=fit.pairs, valid_share=extra["valid_share"], completions=extra["completions"],
                           calibration=extra["calibration"],
                           reward_first_last=[round(r, 5) for r in extra["rewards"][:1] + extra["rewards"][-1:]])
    except ValueError as error:  # no click (KTO) or no known slate
        figures.update(promoted=False, reason=str(error), rows=0, seconds=round(time.perf_counter() - started, 1))
        arm.history.append(figures)
        return figures | {"candidate": None}
    figures.update(steps=fit.steps, fit_seconds=round(fit.seconds, 1))
    return _gated(arm, candidate, figures, settings, gate_judge, gate, started)


def default_gate(settings: LearnerSettings) -> GateConfig:
    """The loop's gate tolerances (:func:`learner.round.gate_config`)."""
    return gate_config(settings)
