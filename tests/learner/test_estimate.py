"""Offline CTR estimates from logged slates (learner/estimate.py)."""

from __future__ import annotations

import numpy as np
import pytest

from learner.data import ProductRecord
from learner.estimate import AttributeCTR, LoggedSlate, click_head_calibration, click_head_estimate, ips_estimate

MUG = ProductRecord("mug-0", "mugs", "Enamel mug", 9.5)


class _FixedPolicy:
    """A policy whose log-probability of each completion text is given (the estimator's arithmetic only)."""

    def __init__(self, logp: dict[str, float]) -> None:
        self.logp = logp

    def completion_logprobs(self, items):  # noqa: ANN001, ANN201
        return np.array([self.logp[text] for _, _, text in items])


def _slate(gmllm, n: int = 6) -> LoggedSlate:  # noqa: ANN001
    texts = tuple(g.prompt.to_text() for g in gmllm.generate("group mugs/g0", MUG, n=n, seed=3, max_new_tokens=80))
    counts = {t: (200, 4 + 3 * i) for i, t in enumerate(dict.fromkeys(texts))}
    return LoggedSlate("mugs/g0", MUG, texts, counts)


def test_ips_of_the_incumbent_is_its_observed_ctr(tiny_gmllm) -> None:  # noqa: ANN001
    slate = _slate(tiny_gmllm)
    estimate = ips_estimate(tiny_gmllm, tiny_gmllm, [slate], {"mugs/g0": "group mugs/g0"})
    assert estimate["mugs/g0"] == pytest.approx([slate.observed_ctr()])


def test_ips_moves_towards_the_creatives_the_candidate_prefers() -> None:
    slate = LoggedSlate("mugs/g0", MUG, ("a", "b", "b", "c"), {"a": (100, 9), "b": (100, 2), "c": (100, 4)})
    incumbent = _FixedPolicy({"a": -2.0, "b": -1.0, "c": -2.0})
    likes_a = _FixedPolicy({"a": -0.5, "b": -3.0, "c": -2.0})
    likes_b = _FixedPolicy({"a": -4.0, "b": -0.2, "c": -4.0})
    targets = {"mugs/g0": "group mugs/g0"}
    observed = slate.observed_ctr()
    up = ips_estimate(likes_a, incumbent, [slate], targets)["mugs/g0"][0]
    down = ips_estimate(likes_b, incumbent, [slate], targets)["mugs/g0"][0]
    assert down < observed < up <= 0.09
    assert down >= 0.02


def test_click_head_is_calibrated_to_the_groups_logged_clicks(tiny_gmllm) -> None:  # noqa: ANN001
    slate = _slate(tiny_gmllm)
    targets = {"mugs/g0": "group mugs/g0"}
    scale = click_head_calibration(tiny_gmllm, [slate], targets)["mugs/g0"]
    raw = tiny_gmllm.click_probability([("group mugs/g0", MUG, t) for t in slate.texts]).mean()
    assert scale * raw == pytest.approx(slate.observed_ctr())
    estimate = click_head_estimate(tiny_gmllm, tiny_gmllm, [slate], targets, samples=4, max_new_tokens=80)
    assert len(estimate["mugs/g0"]) == 1 and 0 < estimate["mugs/g0"][0] < 1


def test_attribute_model_learns_each_groups_taste_from_logged_clicks() -> None:
    import random

    from infra.contracts.prompt import random_prompt

    rng = random.Random(0)
    texts = [random_prompt(rng).to_text() for _ in range(300)]
    logged = []
    for text in texts:
        pink = "palette=pink," in text
        logged.append(("mugs/g0", text, 400, 40 if pink else 8))  # g0 clicks pink primaries 10 % vs 2 %
        logged.append(("mugs/g1", text, 400, 8 if pink else 16))  # g1 avoids them
    model = AttributeCTR.fit(logged)
    pink = [t for t in texts if "palette=pink," in t][:5]
    other = [t for t in texts if "palette=pink," not in t][:5]
    g0_pink, g0_other = model.predict("mugs/g0", pink).mean(), model.predict("mugs/g0", other).mean()
    g1_pink, g1_other = model.predict("mugs/g1", pink).mean(), model.predict("mugs/g1", other).mean()
    assert g0_pink > 3 * g0_other and 0.07 < g0_pink < 0.13
    assert g1_pink < 0.7 * g1_other
    assert model.predict("mugs/g9", pink) is None
