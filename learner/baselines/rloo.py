"""RLOO baseline: TRL's ``RLOOTrainer`` with the live model's click head, calibrated per group, as the reward.

The policy writes ``num_generations`` creatives per (group, product) prompt
(TRL samples them with ``transformers``' ``generate``: *unconstrained*, unlike
our grammar-constrained serving, :mod:`learner.model.grammar`), and each
completion is rewarded with the frozen live model's click answer
(:meth:`learner.model.gmllm.GMLLM.click_probability`) for that group on that
product, scaled per group so that its mean over the group's logged slate
equals the group's observed CTR on it (:func:`learner.estimate.click_head_calibration`).
A completion that does not parse as a canonical creative prompt gets reward 0
(the fit reports the valid share). RLOO's advantage is the reward minus the
mean of the prompt's other completions. With ``constrained=True``
(:class:`learner.baselines.config.RLOOBaselineConfig`) TRL's ``generate`` call
gets our grammar as a logits processor (:class:`GrammarLogits`), so it samples
as serving does; the loss still uses the model's unconstrained
log-probabilities, as Group-DPO's does on constrained samples.

Adapters, the smallest found for TRL 1.16 with our LLaVA model:

* a multimodal prompt must be *conversational* (``RLOOTrainer._generate_and_score_completions``
  raises "Multimodal training requires conversational prompts" otherwise), and TRL
  renders it with ``processing_class.apply_chat_template``: the processor (a
  copy; the model's own is untouched) gets :data:`CHAT_TEMPLATE`, which writes
  the user turn's parts back to exactly our generation input (group prefix,
  ``<image>``, product text, instruction);
* with ``beta > 0`` TRL builds the reference from ``model.config._name_or_path``
  (``create_model_from_path``, no ``ref_model`` argument), so the live model is
  saved to a scratch directory and the policy's config points there for the fit.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from features.group import GroupFeatures
from infra.contracts.prompt import PromptError, parse_prompt
from infra.settings import DPOSettings
from learner.baselines.common import fit_summary, log_collector, trainer_arguments
from learner.baselines.config import RLOOBaselineConfig
from learner.baselines.kto import SlateStats
from learner.data import ProductRecord
from learner.dpo.train import FitResult, fit_steps
from learner.estimate import LoggedSlate, click_head_calibration
from learner.model.gmllm import GMLLM
from learner.model.inputs import IMAGE_TOKEN, generation_input

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)
"""Renders a conversation's parts in order, an image part as ``<image>`` + newline: our generation input."""


def conversation(group: GroupFeatures | str, product: ProductRecord) -> list[dict[str, Any]]:
    """The generation input as one user turn: text before the image, the image, text after it."""
    before, after = generation_input(group, product).split(IMAGE_TOKEN + "\n", 1)
    return [{"role": "user", "content": [{"type": "text", "text": before}, {"type": "image"},
                                         {"type": "text", "text": after}]}]


class GrammarLogits:
    """A ``transformers`` logits processor: only tokens that keep each row's completion a valid prompt prefix,
    EOS only once it is complete (:meth:`learner.model.gmllm.GMLLM._constrain`, the serving grammar).

    ``prompt_length``: the width of the (left-padded) prompt, so ``input_ids[:, prompt_length:]`` is the
    completion so far.
    """

    def __init__(self, gmllm: GMLLM, prompt_length: int) -> None:
        self.gmllm, self.prompt_length = gmllm, prompt_length

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        texts, done = [], []
        for row in input_ids[:, self.prompt_length:].tolist():
            finished = self.gmllm.eos_id in row
            tokens = row[: row.index(self.gmllm.eos_id)] if finished else row
            texts.append("".join(self.gmllm._token_text[t] for t in tokens))
            done.append(finished)
        return self.gmllm._constrain(scores, texts, done)


def _constrained_generate(gmllm: GMLLM) -> Callable[..., Any]:
    """``gmllm.model.generate`` with :class:`GrammarLogits` added (what TRL calls to sample completions)."""
    from transformers import LogitsProcessorList

    generate = gmllm.model.generate

    def constrained(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(GrammarLogits(gmllm, int(input_ids.shape[1])))
        return generate(*args, logits_processor=processors, **kwargs)

    return constrained


def parses(text: str) -> bool:
    """True when ``text`` (EOS stripped) is a canonical creative prompt, as the grammar would have written it."""
    try:
        return parse_prompt(text).to_text() == text
    except PromptError:
        return False


class ClickReward:
    """TRL reward function: the scorer's click probability × the group's calibration; 0 for an invalid creative.

    Counts the completions it saw and how many parsed (``valid``, ``seen``).
    """

    __name__ = "calibrated_click"

    def __init__(self, scorer: GMLLM, targets: Mapping[str, GroupFeatures | str],
                 products: Mapping[str, ProductRecord], calibration: Mapping[str, float]) -> None:
        self.scorer, self.targets, self.products, self.calibration = scorer, targets, products, calibration
        self.seen = self.valid = 0

    def __call__(self, prompts: list[Any], completions: list[Any], group_id: list[str], product_id: list[str],
                 **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        texts = [t if isinstance(t, str) else "".join(p.get("text", "") for p in t) for t in texts]
        texts = [t.split(self.scorer.tokenizer.eos_token, 1)[0].strip() for t in texts]
        ok = [parses(t) for t in texts]
        self.seen += len(texts)
        self.valid += sum(ok)
        items = [(self.targets[g], self.products[p], t) for g, p, t, v in zip(group_id, product_id, texts, ok) if v]
        scores = iter(self.scorer.click_probability(items).tolist() if items else [])
        return [self.calibration.get(g, 1.0) * next(scores) if v else 0.0 for g, v in zip(group_id, ok)]


def logged_slates(stats: SlateStats, products: Mapping[str, ProductRecord]) -> list[LoggedSlate]:
    """The slate traffic as :class:`learner.estimate.LoggedSlate` (one text per distinct creative)."""
    return [LoggedSlate(group, products.get(product), tuple(sorted(creatives)),
                        {t: (c.impressions, c.clicks) for t, c in creatives.items()})
            for (group, product), creatives in sorted(stats.items()) if product in products]


def fit_rloo(
    policy: GMLLM,
    reference: GMLLM,
    stats: SlateStats,
    targets: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    settings: DPOSettings,
    config: RLOOBaselineConfig | None = None,
    *,
    steps: int | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[FitResult, dict[str, Any]]:
    """Train ``policy`` (in place) with TRL's RLOO on the slates' prompts, rewarded by ``reference``'s calibrated
    click head; the reference is also RLOO's KL anchor. Returns the fit and ``{"valid_share", "calibration"}``.

    One prompt per slate (group, product); steps as Group-DPO's rule on the number of prompts × generations.
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    from learner.model.gmllm import _quiet_transformers

    _quiet_transformers()
    config = config or RLOOBaselineConfig()
    slates = [s for s in logged_slates(stats, products) if s.group in targets]
    if not slates:
        raise ValueError("no slate of a known group and product to prompt RLOO with")
    calibration = click_head_calibration(reference, slates, targets)
    reward = ClickReward(reference, targets, products, calibration)
    dataset = Dataset.from_dict({
        "prompt": [conversation(targets[s.group], s.product) for s in slates],
        "images": [[s.product.rgb_image()] for s in slates],
        "group_id": [s.group for s in slates],
        "product_id": [s.product.id for s in slates],
    })
    # a batch holds whole groups of generations, of at most as many prompts as there are
    batch = config.num_generations * max(1, min(len(dataset), settings.batch_size // config.num_generations))
    total_steps = steps or config.steps or fit_steps(len(dataset) * config.num_generations, settings)
    processor = copy.copy(policy.processor)
    processor.chat_template = CHAT_TEMPLATE
    history: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="osmf-rloo-") as scratch:
        reference.model.save_pretrained(f"{scratch}/reference", safe_serialization=True)
        name_or_path = policy.model.config._name_or_path
        policy.model.config._name_or_path = f"{scratch}/reference"
        if config.constrained:  # an instance attribute: TRL's call to generate goes through the grammar
            policy.model.generate = _constrained_generate(policy)
        arguments = {**trainer_arguments(settings, f"{scratch}/out", total_steps),
                     "beta": config.beta}  # RLOO's β is a KL coefficient, not DPO's temperature
        args = RLOOConfig(**arguments, per_device_train_batch_size=batch, num_generations=config.num_generations,
                          max_completion_length=config.max_completion_length, temperature=1.0)
        try:
            trainer = RLOOTrainer(model=policy.model, reward_funcs=reward, args=args, train_dataset=dataset,
                                  processing_class=processor, callbacks=[log_collector(history, on_log)])
            trainer.remove_callback(PrinterCallback)
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
        finally:
            policy.model.config._name_or_path = name_or_path
            policy.model.__dict__.pop("generate", None)
    policy.model.eval()
    fit = fit_summary(trainer, [s.group for s in slates], seconds, history, batch, "reward")
    extra = {"valid_share": round(reward.valid / reward.seen, 4) if reward.seen else float("nan"),
             "completions": reward.seen, "calibration": {g: round(v, 4) for g, v in calibration.items()},
             "rewards": [h.get("reward", float("nan")) for h in history]}
    return fit, extra
