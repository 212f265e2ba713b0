"""The evaluation gate promotes only when no group loses and the whole gains."""

from learner.gate import GateConfig, GroupFigures, decide


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
