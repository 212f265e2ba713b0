"""One learner round: fresh pairs → Group-DPO from the published version → gate → publish or keep → history.

:func:`run_round` is what ``osmf learner run`` does each time its trigger
fires (and what tests and benchmarks call directly):

1. split the replay buffer into training and held-out pairs (a pair's side is
   fixed by a hash of its identity);
2. copy the incumbent (the published version, also the frozen DPO
   reference) and fit it with Group-DPO on the training pairs, weighted by
   group and recency (:func:`learner.dpo.train.fit_group_dpo`);
3. measure candidate and incumbent per group (:mod:`learner.dpo.heldout`:
   preference accuracy and mean margin on held-out pairs; simulated CTR of
   the served creative when a ``served_ctr`` judge is given);
4. promote only if the gate passes (:func:`learner.gate.decide`): the
   candidate is saved as an artifact and published atomically as the next
   version (:func:`learner.publish.publish_version`, verified by its manifest);
   a candidate refused because groups regress is first repaired
   (``loop.repair_fits``): refitted without those groups' pairs, which makes
   them groups without evidence held by ``dpo.preserve``, and gated again;
   with ``loop.promotion = "group"`` the gate runs per group instead
   (:func:`learner.gate.passing_units`) and the version is published for the
   groups it raises only (publish metadata ``groups``, :mod:`learner.publish`),
   unless it raises every group of a default incumbent;
5. append a :class:`learner.history.RoundRecord` to the history log.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from infra.contracts.messages import PreferencePair
from infra.settings import LearnerSettings
from learner.buffer import PairBuffer
from learner.data import ProductRecord
from learner.dpo.heldout import heldout_figures
from learner.dpo.onpolicy import protection_for
from learner.dpo.train import FitResult, fit_group_dpo
from learner.gate import GateConfig, GateDecision, GroupFigures, decide, passing_units, regressed_groups
from features.group import GroupFeatures
from learner.history import RoundRecord, append_round
from learner.model.artifact import verify_artifact
from learner.model.gmllm import GMLLM
from learner.publish import GROUPS, publish_version


class ServedCTR(Protocol):
    """Simulated CTR per group of the creatives a model serves (``one_size``: with the neutral prefix)."""

    def __call__(self, gmllm: GMLLM, one_size: bool = False) -> dict[str, float]: ...


@dataclass
class RoundOutcome:
    """The round's record and, when promoted, the new live model."""

    record: RoundRecord
    decision: GateDecision | None
    promoted: GMLLM | None
    groups: list[str] | None = None
    """Per-group promotion: the groups the promoted version went live for (None: every group)."""


def gate_config(settings: LearnerSettings) -> GateConfig:
    """The gate tolerances of the loop settings."""
    loop = settings.loop
    return GateConfig(
        accuracy_tolerance=loop.accuracy_tolerance, ctr_tolerance=loop.ctr_tolerance, min_gain=loop.min_gain,
        min_group_pairs=loop.min_group_pairs, ctr_interval_z=loop.ctr_interval_z, min_ctr_drop=loop.min_ctr_drop,
    )


def with_ctr(figures: dict[str, GroupFigures], ctr: Mapping[str, float],
             se: Mapping[str, float] | None = None,
             values: Mapping[str, Sequence[float]] | None = None) -> dict[str, GroupFigures]:
    """``figures`` with each group's simulated CTR (its standard error and the figures it averages, when
    ``se`` and ``values`` have them) filled in; groups only the judge knows get 0 pairs, 0.5 accuracy."""
    out = dict(figures)
    for group, value in ctr.items():
        base = out.get(group, GroupFigures(group, 0, 0.5, 0.0))
        error = (se or {}).get(group)
        each = (values or {}).get(group)
        out[group] = dataclasses.replace(base, ctr=float(value), ctr_se=None if error is None else float(error),
                                         ctr_values=None if each is None else tuple(float(v) for v in each))
    return out


def judged(served_ctr: ServedCTR, gmllm: GMLLM, one_size: bool = False) -> dict[str, GroupFigures]:
    """Figures per group of ``gmllm`` by ``served_ctr``: its CTR, with the standard errors (``last_se``) and the
    figures behind each mean (``last_per_product``) when the judge reports them."""
    ctr = served_ctr(gmllm, one_size)
    return with_ctr({}, ctr, dict(getattr(served_ctr, "last_se", None) or {}),
                    dict(getattr(served_ctr, "last_per_product", None) or {}))


def judged_pair(served_ctr: ServedCTR, candidate: GMLLM, incumbent: GMLLM, one_size: bool = False,
                estimate: str = "resample") -> tuple[dict[str, GroupFigures], dict[str, GroupFigures]]:
    """Figures of ``candidate`` and ``incumbent`` per group, for the gate.

    ``estimate="resample"``: each version's own samples (:func:`judged`, same seeds); ``"reweight"``: the
    candidate estimated on the incumbent's samples by importance weights, when the judge can
    (``served_ctr.reweighted``, e.g. :meth:`sim.judge.WorldCTR.reweighted`), paired sample by sample.
    """
    reweighted = getattr(served_ctr, "reweighted", None)
    if estimate == "reweight" and reweighted is not None:
        new, old = reweighted(candidate, incumbent, one_size)
        return _figures_of(new), _figures_of(old)
    return judged(served_ctr, candidate, one_size), judged(served_ctr, incumbent, one_size)


def _figures_of(values: Mapping[str, Sequence[float]]) -> dict[str, GroupFigures]:
    """Figures from each group's per-(product, draw) CTR values: their mean, standard error and the values."""
    ctr = {g: sum(v) / len(v) for g, v in values.items() if v}
    se = {g: (sum((x - ctr[g]) ** 2 for x in v) / (len(v) - 1) / len(v)) ** 0.5 if len(v) > 1 else 0.0
          for g, v in values.items() if v}
    return with_ctr({}, ctr, se, {g: list(v) for g, v in values.items() if v})


def run_round(
    number: int,
    buffer: PairBuffer,
    incumbent: GMLLM,
    incumbent_version: int | None,
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    settings: LearnerSettings,
    repository: Path,
    history: Path,
    *,
    served_ctr: ServedCTR | None = None,
    one_size: bool = False,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    pairs_left_out: Mapping[str, int] | None = None,
    default: bool = True,
) -> RoundOutcome:
    """Run one round (see the module docstring); the buffer's new-pair count is reset.

    ``pairs_left_out`` (pairs per group the caller could not use, e.g. groups
    without features) is recorded in the history as it is. With per-group
    promotion the incumbent serves the groups of ``features``; ``default``:
    it is the version that serves every other group too, so a candidate that
    raises all of its groups is published for every group.
    """
    started = time.time()
    loop = settings.loop
    train, heldout = buffer.split(loop.heldout_fraction)
    held = buffer.pairs()  # oldest first
    window = (held[0].ts, held[-1].ts) if held else (0, 0)
    per_group = dict(sorted(Counter(p.group_id for p in train).items()))
    buffer.mark_trained()

    def record(decision: str, gate: dict, version: int | None, losses: list[float], training: dict) -> RoundRecord:
        entry = RoundRecord(
            round=number, started_at=started, data_window=window, pairs_per_group=per_group,
            heldout_pairs=len(heldout), losses=losses, gate=gate, decision=decision, version=version,
            reference_version=incumbent_version, training=training,
            pairs_left_out=dict(sorted((pairs_left_out or {}).items())),
        )
        append_round(history, entry)
        return entry

    if not train:
        return RoundOutcome(record("skipped: no training pairs", {}, incumbent_version, [], {}), None, None)
    def fit_candidate(pairs: list[PreferencePair]) -> tuple[GMLLM, FitResult, dict[str, Any]]:
        candidate = incumbent.copy()
        held = protection_for(pairs, incumbent, features, products, settings, number, one_size)
        mirrored = held.mirrored
        weights = buffer.recency_weights(pairs).tolist() + [max(settings.dpo.preserve_weight, 1e-6)] * len(mirrored)
        fit = fit_group_dpo(
            candidate, incumbent, list(pairs) + mirrored, features, products, settings.dpo,
            one_size=one_size, pair_weights=weights, on_log=on_log, anchors=held.anchors,
        )
        training = {
            "mode": "one-size" if one_size else "group", "steps": fit.steps, "pairs": fit.pairs,
            "mirrored": len(mirrored), "anchors": fit.anchors,
            "seconds": round(fit.seconds, 2), "samples_per_s": round(fit.samples_per_s, 2),
            "sampled_share": fit.sampled_share, "margins": fit.margins,
        }
        return candidate, fit, training

    def judge(candidate: GMLLM) -> tuple[dict[str, GroupFigures], dict[str, GroupFigures]]:
        new, old = heldout_figures(candidate, incumbent, heldout, features, products, settings.dpo.beta, one_size)
        if served_ctr is not None:
            new_ctr, old_ctr = judged_pair(served_ctr, candidate, incumbent, one_size, loop.ctr_estimate)
            new, old = _merge_ctr(new, new_ctr), _merge_ctr(old, old_ctr)
        return new, old

    candidate, fit, training = fit_candidate(list(train))
    new, old = judge(candidate)
    if not new:
        gate = {"promote": False, "reason": "no held-out pairs and no simulator: nothing to judge the candidate by"}
        return RoundOutcome(record("kept: " + gate["reason"], gate, incumbent_version, fit.losses, training),
                            None, None)
    decision = decide(new, old, gate_config(settings))
    if loop.promotion == "group" and not one_size:
        return _promoted_per_group(candidate, decision, new, old, sorted(features), default, fit, training,
                                   settings, repository, number, incumbent_version, record)
    held_back: list[str] = []
    refused: list[dict[str, Any]] = []
    while not decision.promote and len(refused) < loop.repair_fits:
        regressed = regressed_groups(new, old, gate_config(settings))
        kept = [p for p in train if p.group_id not in {*held_back, *regressed}]
        if not kept or set(regressed) <= set(held_back):  # nothing new to hold back: the same fit again
            break
        held_back = sorted({*held_back, *regressed})
        refused.append({"reason": decision.reason, "steps": fit.steps, "held_back_after": held_back})
        candidate, fit, training = fit_candidate(kept)
        new, old = judge(candidate)
        decision = decide(new, old, gate_config(settings))
    if refused:
        training |= {"repairs": refused, "held_back": held_back}
    gate = dataclasses.asdict(decision)
    if not decision.promote:
        return RoundOutcome(record("kept: " + decision.reason, gate, incumbent_version, fit.losses, training),
                            decision, None)
    version = publish_candidate(candidate, repository, loop.model_name, {
        "round": number, "reference_version": incumbent_version, "reason": decision.reason,
        "overall": decision.overall_candidate,
    })
    return RoundOutcome(record("promoted", gate, version, fit.losses, training), decision, candidate)


def _promoted_per_group(candidate: GMLLM, decision: GateDecision, new: dict[str, GroupFigures],
                        old: dict[str, GroupFigures], serves: list[str], default: bool, fit: FitResult,
                        training: dict[str, Any], settings: LearnerSettings, repository: Path, number: int,
                        incumbent_version: int | None, record: Callable[..., RoundRecord]) -> RoundOutcome:
    """Step 4 with per-group promotion: publish ``candidate`` for the groups of ``serves`` it raises on their own
    (for every group when it raises all of a default incumbent's); keep it when it raises none."""
    moved = passing_units(new, old, {g: [g] for g in serves}, gate_config(settings))
    gate = dataclasses.asdict(decision) | {"promoted_groups": moved, "serves": serves}
    if not moved:
        return RoundOutcome(record("kept: no group gains on its own; " + decision.reason, gate, incumbent_version,
                                   fit.losses, training), decision, None)
    groups = None if default and set(moved) >= set(serves) else moved
    version = publish_candidate(candidate, repository, settings.loop.model_name, {
        "round": number, "reference_version": incumbent_version, "reason": decision.reason,
        "overall": decision.overall_candidate, GROUPS: groups,
    })
    # the record's decision stays "promoted" (dashboards and metrics read it); the groups are in gate.promoted_groups
    return RoundOutcome(record("promoted", gate, version, fit.losses, training), decision, candidate, groups)


def publish_candidate(gmllm: GMLLM, repository: Path, model_name: str, metadata: dict) -> int:
    """Save ``gmllm`` as an artifact and publish it as the next version; returns the version number."""
    repository.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".candidate-", dir=repository))
    scratch.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read the version
    try:
        artifact = gmllm.save(scratch / "model", extra={"published": metadata})
        return publish_version(artifact, repository, model_name, verify=verify_artifact, metadata=metadata).version
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _merge_ctr(figures: dict[str, GroupFigures], ctr: Mapping[str, GroupFigures]) -> dict[str, GroupFigures]:
    """``figures`` with the CTR fields of ``ctr`` (groups only ``ctr`` has are added)."""
    out = dict(figures)
    for group, judged_figures in ctr.items():
        base = out.get(group)
        out[group] = judged_figures if base is None else dataclasses.replace(
            base, ctr=judged_figures.ctr, ctr_se=judged_figures.ctr_se, ctr_values=judged_figures.ctr_values)
    return out
