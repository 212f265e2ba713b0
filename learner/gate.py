"""The evaluation gate: a new version goes live only if no group loses and the whole gains.

Figures per group come from held-out preference pairs (preference accuracy:
share of pairs whose implicit reward margin is > 0, and the mean margin) and,
when a simulated world is configured, from the simulated CTR of the
creatives each version writes for that group.

>>> old = {"a": GroupFigures("a", pairs=20, accuracy=0.5, mean_margin=0.0, ctr=0.030),
...        "b": GroupFigures("b", pairs=10, accuracy=0.5, mean_margin=0.0, ctr=0.020)}
>>> new = {"a": GroupFigures("a", pairs=20, accuracy=0.8, mean_margin=0.4, ctr=0.036),
...        "b": GroupFigures("b", pairs=10, accuracy=0.7, mean_margin=0.1, ctr=0.019)}
>>> decide(new, old, GateConfig(ctr_tolerance=0.005)).promote
True
>>> decide(new, old, GateConfig(ctr_tolerance=0.0005)).reason
'group b: simulated CTR 0.0190 < 0.0200 - 0.0005 (incumbent)'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class GroupFigures:
    """Held-out figures of one model version for one group."""

    group: str
    pairs: int
    accuracy: float
    mean_margin: float
    ctr: float | None = None
    ctr_se: float | None = None
    ctr_values: tuple[float, ...] | None = None
    """The CTR figures ``ctr`` averages (e.g. per judged product and draw); two versions judged on the same
    products and seeds are compared pair by pair (a paired standard error)."""


@dataclass(frozen=True)
class GateConfig:
    """Tolerances of the gate.

    Parameters
    ----------
    accuracy_tolerance
        A group may lose at most this much preference accuracy.
    ctr_tolerance
        A group may lose at most this much simulated CTR (absolute).
    min_gain
        The overall figure (pair-weighted accuracy, or mean CTR when known)
        must rise by more than this.
    min_group_pairs
        A group's preference accuracy can block promotion only from this
        many held-out pairs on (fewer are too noisy to judge by; they still
        count in the pair-weighted overall figure).
    ctr_interval_z
        With standard errors of the CTR (``GroupFigures.ctr_se``, over the
        judged products), a group may also not drop by more than this many
        standard errors of the difference: its allowed drop is
        ``min(ctr_tolerance, z * sqrt(se_new² + se_old²))`` when ``z > 0``
        (never looser than ``ctr_tolerance``; at least ``min_ctr_drop``).
    min_ctr_drop
        The allowed drop never goes below this (so two identical models
        always pass their CTR check).
    """

    accuracy_tolerance: float = 0.05
    ctr_tolerance: float = 0.002
    min_gain: float = 0.0
    min_group_pairs: int = 10
    ctr_interval_z: float = 0.0
    min_ctr_drop: float = 0.0


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, why, and the figures behind it."""

    promote: bool
    reason: str
    overall_candidate: float
    overall_incumbent: float
    candidate: dict[str, dict] = field(default_factory=dict)
    incumbent: dict[str, dict] = field(default_factory=dict)


def decide(
    candidate: Mapping[str, GroupFigures], incumbent: Mapping[str, GroupFigures], config: GateConfig = GateConfig()
) -> GateDecision:
    """Promote only if no group regresses beyond tolerance and the overall figure improves.

    Simulated CTR is used wherever both versions have it for a group (a
    group the simulator cannot judge, e.g. one without members, is judged by
    its preference accuracy only); the overall figure is then the mean CTR of
    those groups.
    """
    judged = ctr_groups(candidate, incumbent)
    for group in sorted(candidate):
        if (why := group_regression(group, candidate, incumbent, config, judged)) is not None:
            return _decision(False, why, candidate, incumbent, judged)
    new_overall, old_overall = _overall(candidate, judged), _overall(incumbent, judged)
    if new_overall <= old_overall + config.min_gain:
        what = "mean simulated CTR" if judged else "preference accuracy"
        return _decision(False, f"overall {what} {new_overall:.4f} does not beat {old_overall:.4f}",
                         candidate, incumbent, judged)
    return _decision(True, "no group regressed and the overall figure improved", candidate, incumbent, judged)


def group_regression(group: str, candidate: Mapping[str, GroupFigures], incumbent: Mapping[str, GroupFigures],
                     config: GateConfig, judged: set[str] | None = None) -> str | None:
    """Why ``group`` regresses from incumbent to candidate (its preference accuracy or simulated CTR falls
    beyond tolerance), or None."""
    new, old = candidate.get(group), incumbent.get(group)
    if new is None or old is None:
        return None
    judged = ctr_groups(candidate, incumbent) if judged is None else judged
    if new.pairs >= config.min_group_pairs and new.accuracy < old.accuracy - config.accuracy_tolerance:
        return (f"group {group}: preference accuracy {new.accuracy:.3f} < {old.accuracy:.3f} - "
                f"{config.accuracy_tolerance} (incumbent)")
    allowed = ctr_allowed_drop(new, old, config)
    if group in judged and new.ctr < old.ctr - allowed:  # type: ignore[operator]
        return f"group {group}: simulated CTR {new.ctr:.4f} < {old.ctr:.4f} - {allowed:.4g} (incumbent)"
    return None


def regressed_groups(candidate: Mapping[str, GroupFigures], incumbent: Mapping[str, GroupFigures],
                     config: GateConfig = GateConfig()) -> list[str]:
    """Every group that regresses (:func:`group_regression`), sorted: what a repair fit holds at the incumbent.

    >>> old = {"a": GroupFigures("a", 0, 0.5, 0.0, ctr=0.030), "b": GroupFigures("b", 0, 0.5, 0.0, ctr=0.020)}
    >>> new = {"a": GroupFigures("a", 0, 0.5, 0.0, ctr=0.025), "b": GroupFigures("b", 0, 0.5, 0.0, ctr=0.026)}
    >>> regressed_groups(new, old, GateConfig(ctr_tolerance=0.002))
    ['a']
    """
    judged = ctr_groups(candidate, incumbent)
    return [g for g in sorted(candidate) if group_regression(g, candidate, incumbent, config, judged) is not None]


def passing_units(candidate: Mapping[str, GroupFigures], incumbent: Mapping[str, GroupFigures],
                  units: Mapping[str, Sequence[str]], config: GateConfig = GateConfig()) -> list[str]:
    """Per-group promotion: the units (a group, or a training target and the groups it serves) whose own groups
    pass :func:`decide` on their own (none regresses, their overall figure rises), sorted. Only groups with
    evidence count: a simulated CTR for both versions, or else held-out pairs on which the candidate beats
    chance (:func:`accuracy_p_value` at most :data:`GROUP_EVIDENCE_ALPHA`); a group without evidence keeps its
    version, and a unit with none does not pass.

    >>> old = {"a": GroupFigures("a", 0, 0.5, 0.0, ctr=0.030), "b": GroupFigures("b", 0, 0.5, 0.0, ctr=0.020)}
    >>> new = {"a": GroupFigures("a", 0, 0.5, 0.0, ctr=0.025), "b": GroupFigures("b", 0, 0.5, 0.0, ctr=0.026)}
    >>> passing_units(new, old, {"a": ["a"], "b": ["b"], "c": ["c"]}, GateConfig(ctr_tolerance=0.002))
    ['b']
    >>> passing_units(new, old, {"both": ["a", "b"]}, GateConfig(ctr_tolerance=0.002))
    []
    >>> old = {"c": GroupFigures("c", pairs=3, accuracy=0.5, mean_margin=0.0)}
    >>> passing_units({"c": GroupFigures("c", pairs=3, accuracy=1.0, mean_margin=0.9)}, old, {"c": ["c"]})
    []
    >>> old = {"c": GroupFigures("c", pairs=8, accuracy=0.5, mean_margin=0.0)}
    >>> passing_units({"c": GroupFigures("c", pairs=8, accuracy=1.0, mean_margin=0.9)}, old, {"c": ["c"]})
    ['c']
    """
    out = []
    judged = ctr_groups(candidate, incumbent)
    for unit, groups in units.items():
        mine = [g for g in groups if g in candidate and g in incumbent
                and (g in judged or accuracy_p_value(candidate[g]) <= GROUP_EVIDENCE_ALPHA)]
        if mine and decide({g: candidate[g] for g in mine}, {g: incumbent[g] for g in mine}, config).promote:
            out.append(unit)
    return sorted(out)


GROUP_EVIDENCE_ALPHA = 0.05
"""Per-group promotion without a simulated CTR: a group moves only if its held-out accuracy beats chance at
this level (the incumbent is the round's reference, so its implicit margins are 0: a coin flip)."""


def accuracy_p_value(figures: GroupFigures) -> float:
    """One-sided binomial p-value of ``figures.accuracy`` on ``figures.pairs`` held-out pairs against chance (0.5).

    >>> round(accuracy_p_value(GroupFigures("g", pairs=8, accuracy=1.0, mean_margin=1.0)), 4)
    0.0039
    >>> round(accuracy_p_value(GroupFigures("g", pairs=9, accuracy=7 / 9, mean_margin=1.0)), 4)
    0.0898
    >>> accuracy_p_value(GroupFigures("g", pairs=0, accuracy=0.5, mean_margin=0.0))
    1.0
    """
    n = figures.pairs
    if n <= 0:
        return 1.0
    k = round(figures.accuracy * n)
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def ctr_allowed_drop(new: GroupFigures, old: GroupFigures, config: GateConfig) -> float:
    """How much CTR a group may lose: ``ctr_tolerance``, narrowed to its interval when standard errors are known.

    >>> a = GroupFigures("a", 0, 0.5, 0.0, ctr=0.03, ctr_se=0.0003)
    >>> round(ctr_allowed_drop(a, a, GateConfig(ctr_tolerance=0.002, ctr_interval_z=2.0)), 6)
    0.000849
    >>> ctr_allowed_drop(a, a, GateConfig(ctr_tolerance=0.002))
    0.002
    """
    if config.ctr_interval_z <= 0:
        return config.ctr_tolerance
    se = paired_se(new, old)
    if se is None:
        if new.ctr_se is None or old.ctr_se is None:
            return config.ctr_tolerance
        se = (new.ctr_se**2 + old.ctr_se**2) ** 0.5
    return max(config.min_ctr_drop, min(config.ctr_tolerance, config.ctr_interval_z * se))


def paired_se(new: GroupFigures, old: GroupFigures) -> float | None:
    """Standard error of the mean difference of two versions' paired CTR figures (None unless both have
    ``ctr_values`` of one length, at least 2).

    >>> old = GroupFigures("a", 0, 0.5, 0.0, ctr=0.03, ctr_values=(0.02, 0.04, 0.03))
    >>> new = GroupFigures("a", 0, 0.5, 0.0, ctr=0.032, ctr_values=(0.022, 0.041, 0.033))
    >>> round(paired_se(new, old), 6)
    0.000577
    """
    if not new.ctr_values or not old.ctr_values or len(new.ctr_values) != len(old.ctr_values):
        return None
    n = len(new.ctr_values)
    if n < 2:
        return None
    diffs = [a - b for a, b in zip(new.ctr_values, old.ctr_values)]
    mean = sum(diffs) / n
    return (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5


def ctr_groups(candidate: Mapping[str, GroupFigures], incumbent: Mapping[str, GroupFigures]) -> set[str]:
    """Groups whose simulated CTR is known for both versions."""
    return {g for g, f in candidate.items() if f.ctr is not None and g in incumbent and incumbent[g].ctr is not None}


def _overall(figures: Mapping[str, GroupFigures], judged: set[str]) -> float:
    """Mean CTR over the ``judged`` groups when there are any, else pair-weighted preference accuracy."""
    if judged:
        return sum(figures[g].ctr for g in judged) / len(judged)  # type: ignore[misc]
    if not figures:
        return 0.0
    pairs = sum(f.pairs for f in figures.values()) or 1
    return sum(f.accuracy * f.pairs for f in figures.values()) / pairs


def _decision(promote: bool, reason: str, candidate: Mapping[str, GroupFigures],
              incumbent: Mapping[str, GroupFigures], judged: set[str]) -> GateDecision:
    return GateDecision(
        promote=promote,
        reason=reason,
        overall_candidate=_overall(candidate, judged),
        overall_incumbent=_overall(incumbent, judged),
        candidate={g: asdict(f) for g, f in candidate.items()},
        incumbent={g: asdict(f) for g, f in incumbent.items()},
    )
