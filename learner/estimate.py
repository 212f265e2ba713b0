"""Offline estimates of a candidate's CTR per group from logged slates, for a gate without a simulated world.

In production the gate cannot simulate the world: what it has is the
incumbent's *logged slates*, the creatives the incumbent sampled for a
group on a product, each with its impressions and clicks. Two estimates of
the CTR a candidate would get, per group and logged slate:

* :func:`ips_estimate`, off-policy evaluation: the slate's observed CTRs
  weighted by ``p_candidate(text) / p_incumbent(text)`` of each sampled text
  (self-normalised within the slate). Unbiased as the slate grows when the
  logged texts were sampled from the incumbent as written (duplicates kept);
  it sees only creatives the incumbent wrote.
* :func:`click_head_estimate`: the candidate writes its own samples and a
  click head (the incumbent's: the candidate's is not trained by DPO) scores
  them for the group, calibrated per group so that the head's mean over the
  group's logged creatives equals their observed CTR.

Both return per group the estimate of each logged slate (a list), the form
of :func:`learner.round.with_ctr`'s ``values``, so the gate's paired interval
applies. ``osmf bench gate-estimate`` measures how well each ranks candidates
against a simulated world's truth.

>>> round(LoggedSlate("mugs/g0", None, ("a", "b", "a"), {"a": (100, 6), "b": (100, 3)}).observed_ctr(), 4)
0.05
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from features.group import GroupFeatures
from learner.data import ProductRecord
from learner.model.gmllm import GMLLM


@dataclass(frozen=True)
class LoggedSlate:
    """The incumbent's sampled creatives for one (group, product) and what traffic did with them.

    ``texts`` are the sampled canonical prompt texts in sampling order, duplicates kept (they carry the
    incumbent's probabilities); ``counts`` maps each distinct text to ``(impressions, clicks)``.
    """

    group: str
    product: ProductRecord | None
    texts: tuple[str, ...]
    counts: Mapping[str, tuple[int, int]]

    def text_ctr(self) -> np.ndarray:
        """Observed CTR of each sampled text (0 for a text without impressions)."""
        return np.array([self.counts[t][1] / self.counts[t][0] if self.counts[t][0] else 0.0 for t in self.texts])

    def observed_ctr(self) -> float:
        """The incumbent's observed CTR on this slate: the mean over its samples, duplicates counted."""
        return float(self.text_ctr().mean()) if self.texts else float("nan")


def ips_estimate(candidate: GMLLM, incumbent: GMLLM, slates: Sequence[LoggedSlate],
                 targets: Mapping[str, GroupFeatures | str], max_log_weight: float = 20.0) -> dict[str, list[float]]:
    """Per group, the candidate's CTR on each logged slate by self-normalised importance weights.

    ``targets`` maps a group to what the models read for it (features or prefix). Log-ratios are clipped
    at ``max_log_weight`` above the slate's largest before exponentiating (numerical safety only: the
    weights are normalised within the slate).
    """
    out: dict[str, list[float]] = {}
    for slate in slates:
        if not slate.texts or slate.product is None:
            continue
        items = [(targets[slate.group], slate.product, text) for text in slate.texts]
        log_ratio = candidate.completion_logprobs(items) - incumbent.completion_logprobs(items)
        weights = np.exp(np.maximum(log_ratio - log_ratio.max(), -max_log_weight))
        out.setdefault(slate.group, []).append(float(np.sum(weights * slate.text_ctr()) / np.sum(weights)))
    return out


def click_head_calibration(scorer: GMLLM, slates: Sequence[LoggedSlate],
                           targets: Mapping[str, GroupFeatures | str]) -> dict[str, float]:
    """Per group, observed CTR / the scorer's mean click probability over the group's logged samples."""
    predicted: dict[str, list[float]] = {}
    observed: dict[str, list[float]] = {}
    for slate in slates:
        if not slate.texts or slate.product is None:
            continue
        items = [(targets[slate.group], slate.product, text) for text in slate.texts]
        predicted.setdefault(slate.group, []).extend(scorer.click_probability(items).tolist())
        observed.setdefault(slate.group, []).extend(slate.text_ctr().tolist())
    return {g: float(np.mean(observed[g]) / max(np.mean(p), 1e-9)) for g, p in predicted.items()}


def click_head_estimate(candidate: GMLLM, scorer: GMLLM, slates: Sequence[LoggedSlate],
                        targets: Mapping[str, GroupFeatures | str], samples: int, *, temperature: float = 1.0,
                        max_new_tokens: int = 64, seed: int = 0,
                        calibration: Mapping[str, float] | None = None) -> dict[str, list[float]]:
    """Per group, for each logged slate's product: the calibrated click probability (by ``scorer``) of
    ``samples`` creatives the candidate writes for the group, averaged."""
    scale = calibration if calibration is not None else click_head_calibration(scorer, slates, targets)
    out: dict[str, list[float]] = {}
    for index, slate in enumerate(slates):
        if slate.product is None:
            continue
        written = candidate.generate(targets[slate.group], slate.product, n=samples, seed=seed * 7_919 + index,
                                     temperature=temperature, constrained=True, max_new_tokens=max_new_tokens)
        texts = [g.prompt.to_text() for g in written if g.prompt is not None]
        if not texts:
            continue
        scores = scorer.click_probability([(targets[slate.group], slate.product, t) for t in texts])
        out.setdefault(slate.group, []).append(float(scale.get(slate.group, 1.0) * scores.mean()))
    return out
