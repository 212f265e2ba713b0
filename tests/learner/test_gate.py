"""The evaluation gate promotes only when no group loses and the whole gains."""

import dataclasses

from learner.gate import GateConfig, GroupFigures, ctr_allowed_drop, decide, paired_se


def _figs(**acc: float) -> dict[str, GroupFigures]:
    return {g: GroupFigures(g, pairs=10, accuracy=a, mean_margin=a - 0.5) for g, a in acc.items()}


def test_improvement_everywhere_is_promoted() -> None:
    decision = decide(_figs(a=0.8, b=0.7), _figs(a=0.5, b=0.5))
    assert decision.promote and decision.overall_candidate > decision.overall_incumbent


def test_one_group_regressing_blocks_promotion_and_says_which() -> None:
    decision = decide(_figs(a=0.95, b=0.40), _figs(a=0.5, b=0.5), GateConfig(accuracy_tolerance=0.05))
    assert not decision.promote
    assert "group b" in decision.reason


def test_no_overall_gain_is_refused() -> None:
    decision = decide(_figs(a=0.5, b=0.5), _figs(a=0.5, b=0.5))
    assert not decision.promote and "does not beat" in decision.reason


def test_simulated_ctr_is_used_when_known() -> None:
    new = {"a": GroupFigures("a", 10, 0.9, 1.0, ctr=0.02)}
    old = {"a": GroupFigures("a", 10, 0.5, 0.0, ctr=0.03)}
    decision = decide(new, old, GateConfig(ctr_tolerance=0.001))
    assert not decision.promote and "simulated CTR" in decision.reason


def test_ctr_still_guards_the_groups_it_knows_when_one_group_has_none() -> None:
    # drill/g0 has no members the simulator can score; the others' CTR must still decide.
    new = {"a": GroupFigures("a", 6, 0.7, 0.2), "b": GroupFigures("b", 5, 0.6, 0.1, ctr=0.024),
           "c": GroupFigures("c", 16, 0.7, 0.3, ctr=0.055)}
    old = {"a": GroupFigures("a", 6, 0.5, 0.0), "b": GroupFigures("b", 5, 0.5, 0.0, ctr=0.033),
           "c": GroupFigures("c", 16, 0.5, 0.0, ctr=0.037)}
    decision = decide(new, old, GateConfig(ctr_tolerance=0.002))
    assert not decision.promote and decision.reason.startswith("group b: simulated CTR")
    new["b"] = GroupFigures("b", 5, 0.6, 0.1, ctr=0.034)
    decision = decide(new, old, GateConfig(ctr_tolerance=0.002))
    assert decision.promote
    assert decision.overall_candidate == (0.034 + 0.055) / 2 and decision.overall_incumbent == (0.033 + 0.037) / 2


def test_few_held_out_pairs_cannot_block_on_accuracy_alone() -> None:
    new = {"a": GroupFigures("a", 4, 0.0, -0.5), "b": GroupFigures("b", 40, 0.8, 0.3)}
    old = {"a": GroupFigures("a", 4, 0.5, 0.0), "b": GroupFigures("b", 40, 0.5, 0.0)}
    assert decide(new, old, GateConfig(min_group_pairs=10)).promote
    assert not decide(new, old, GateConfig(min_group_pairs=4)).promote


def _paired(ctr_values: tuple[float, ...]) -> GroupFigures:
    mean = sum(ctr_values) / len(ctr_values)
    spread = (sum((v - mean) ** 2 for v in ctr_values) / (len(ctr_values) - 1) / len(ctr_values)) ** 0.5
    return GroupFigures("a", 0, 0.5, 0.0, ctr=mean, ctr_se=spread, ctr_values=ctr_values)


def test_paired_figures_catch_a_small_drop_on_every_draw_that_the_spread_between_products_hides() -> None:
    gate = GateConfig(ctr_tolerance=0.002, ctr_interval_z=2.0, min_ctr_drop=0.0005)
    old_values = (0.020, 0.060, 0.030, 0.050, 0.025, 0.055)
    lower = tuple(v - 0.001 for v in old_values)  # 0.001 below on every product: a real, small loss
    old, new = _paired(old_values), _paired(lower)
    unpaired = {"a": dataclasses.replace(new, ctr_values=None)}, {"a": dataclasses.replace(old, ctr_values=None)}
    assert ctr_allowed_drop(*(f["a"] for f in unpaired), gate) == 0.002  # the spread between products: wide
    assert ctr_allowed_drop(new, old, gate) == 0.0005  # paired: the differences do not vary
    other_new, other_old = GroupFigures("b", 0, 0.5, 0.0, ctr=0.05), GroupFigures("b", 0, 0.5, 0.0, ctr=0.04)
    decision = decide({"a": new, "b": other_new}, {"a": old, "b": other_old}, gate)
    assert not decision.promote and decision.reason.startswith("group a: simulated CTR")


def test_paired_noise_around_no_change_passes() -> None:
    gate = GateConfig(ctr_tolerance=0.002, ctr_interval_z=2.0, min_ctr_drop=0.0005)
    old_values = (0.020, 0.060, 0.030, 0.050, 0.025, 0.055)
    noisy = tuple(v + d for v, d in zip(old_values, (0.003, -0.004, 0.002, -0.002, 0.004, -0.004)))
    assert paired_se(_paired(noisy), _paired(old_values)) > 0.001
    assert ctr_allowed_drop(_paired(noisy), _paired(old_values), gate) == 0.002
