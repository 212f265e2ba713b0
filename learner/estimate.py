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
* :func:`attribute_estimate`, the direct method: per group, a logistic
  regression of clicks on a creative's attributes (background, each palette
  slot, position, scale, style words; :class:`AttributeCTR`), fitted on every
  logged impression the group has (the traffic log and the slates), scores
  the candidate's own samples.

Both return per group the estimate of each logged slate (a list), the form
of :func:`learner.round.with_ctr`'s ``values``, so the gate's paired interval
applies. ``osmf bench gate-estimate`` measures how well each ranks candidates
against a simulated world's truth.

>>> round(LoggedSlate("mugs/g0", None, ("a", "b", "a"), {"a": (100, 6), "b": (100, 3)}).observed_ctr(), 4)
0.05
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from features.group import GroupFeatures
from infra.contracts.prompt import parse_prompt
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
    for slate, texts in _written(candidate, slates, targets, samples, temperature, max_new_tokens, seed):
        if not texts:
            continue
        scores = scorer.click_probability([(targets[slate.group], slate.product, t) for t in texts])
        out.setdefault(slate.group, []).append(float(scale.get(slate.group, 1.0) * scores.mean()))
    return out


def prompt_attributes(text: str) -> dict[str, float]:
    """The one-hot attributes of a canonical prompt text (its free-text copy line is left out).

    >>> sorted(prompt_attributes('background=spotlight; palette=gray,red; position=top; scale=0.8; copy=""; style=vivid'))
    ['background=spotlight', 'position=top', 'primary=gray', 'scale=0.8', 'secondary=red', 'style=vivid']
    """
    prompt = parse_prompt(text)
    names = [f"background={prompt.background}", f"primary={prompt.palette[0]}", f"secondary={prompt.palette[1]}",
             f"position={prompt.position}", f"scale={prompt.scale}", *(f"style={w}" for w in prompt.style)]
    return dict.fromkeys(names, 1.0)


@dataclass
class AttributeCTR:
    """Per group, P(click | creative attributes): an L2-regularised logistic regression on
    :func:`prompt_attributes`, fitted on logged ``(group, prompt text, impressions, clicks)``."""

    models: dict[str, tuple[object, object]]

    @classmethod
    def fit(cls, logged: Iterable[tuple[str, str, int, int]], regularisation: float = 1.0,
            min_clicks: int = 5) -> AttributeCTR:
        """Fit one model per group with at least ``min_clicks`` clicks (``regularisation``: sklearn's ``C``)."""
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.linear_model import LogisticRegression

        counts: dict[str, dict[str, list[int]]] = {}
        for group, text, impressions, clicks in logged:
            cell = counts.setdefault(group, {}).setdefault(text, [0, 0])
            cell[0] += impressions
            cell[1] += clicks
        models: dict[str, tuple[object, object]] = {}
        for group, cells in counts.items():
            if sum(c for _, c in cells.values()) < min_clicks:
                continue
            texts = list(cells)
            vectorizer = DictVectorizer()
            x = vectorizer.fit_transform([prompt_attributes(t) for t in texts] * 2)
            y = np.r_[np.ones(len(texts)), np.zeros(len(texts))]
            weights = np.r_[[cells[t][1] for t in texts], [cells[t][0] - cells[t][1] for t in texts]].astype(float)
            classifier = LogisticRegression(C=regularisation, max_iter=500)
            classifier.fit(x, y, sample_weight=weights / weights.mean())
            models[group] = (vectorizer, classifier)
        return cls(models)

    def predict(self, group: str, texts: Sequence[str]) -> np.ndarray | None:
        """Predicted CTR of each text for ``group`` (None for a group without a model)."""
        if group not in self.models or not texts:
            return None
        vectorizer, classifier = self.models[group]
        return classifier.predict_proba(vectorizer.transform([prompt_attributes(t) for t in texts]))[:, 1]


def attribute_estimate(candidate: GMLLM, model: AttributeCTR, slates: Sequence[LoggedSlate],
                       targets: Mapping[str, GroupFeatures | str], samples: int, *, temperature: float = 1.0,
                       max_new_tokens: int = 64, seed: int = 0) -> dict[str, list[float]]:
    """Per group, for each logged slate's product: the mean :class:`AttributeCTR` prediction over ``samples``
    creatives the candidate writes for the group."""
    out: dict[str, list[float]] = {}
    for slate, texts in _written(candidate, slates, targets, samples, temperature, max_new_tokens, seed):
        predicted = model.predict(slate.group, texts)
        if predicted is not None:
            out.setdefault(slate.group, []).append(float(predicted.mean()))
    return out


def _written(candidate: GMLLM, slates: Sequence[LoggedSlate], targets: Mapping[str, GroupFeatures | str],
             samples: int, temperature: float, max_new_tokens: int, seed: int) -> Iterator[tuple[LoggedSlate, list[str]]]:
    """Each logged slate (with a product) and the valid prompt texts of ``samples`` creatives the candidate
    writes for its group and product (seeded per slate)."""
    for index, slate in enumerate(slates):
        if slate.product is None:
            continue
        written = candidate.generate(targets[slate.group], slate.product, n=samples, seed=seed * 7_919 + index,
                                     temperature=temperature, constrained=True, max_new_tokens=max_new_tokens)
        yield slate, [g.prompt.to_text() for g in written if g.prompt is not None]
