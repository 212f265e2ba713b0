"""KTO baseline: TRL's ``KTOTrainer`` on single clicked / not-clicked impressions of on-policy slates.

Group-DPO learns from *pairs* the stream worker calls among a slate's
creatives. KTO (Ethayarajh et al. 2024) learns from single completions
labelled desirable or not: here one row per logged impression, desirable
when it was clicked. The rows are built from the same slate traffic the
Group-DPO arm gets (:func:`kto_rows`): each row's ``prompt`` is the group's
generation input (group prefix, ``<image>``, product text; the format of
:mod:`learner.dpo.data`), ``images`` the product image, ``completion`` the
creative's canonical prompt + EOS, ``label`` whether it was clicked.

A slate of K creatives shown ~2,000 times each has tens of thousands of
impressions, so a bounded sample is drawn per slate (:class:`KTOBaselineConfig`):
``rows_per_slate`` clicks drawn without replacement from the slate's clicks and
as many non-clicks from its non-clicked impressions. Drawing each class at one
rate across the slate's creatives keeps each creative's clicks-to-non-clicks
ratio proportional to its CTR, so KTO's loss pushes up the creatives above
the slate's CTR and down those below it (the balance point of the two
classes' gradients is the slate's mean). The classes are then equal in size,
and ``desirable_weight`` is set from the counts by TRL's rule.

:func:`fit_kto` trains the policy in place with the live model as reference,
on CPU in fp32, with the learning rate, β, batch size and step rule
(:func:`learner.dpo.train.fit_steps`) of Group-DPO. TRL's KTOTrainer takes the
LLaVA model and its processor as they are (its vision collator expands the
``<image>`` placeholder like the DPO one); the only adaptation is the row
order: KTO estimates its KL term from completions shifted by one within each
batch, so TRL reads the rows in order (``train_sampling_strategy="sequential"``)
and the rows are shuffled here, once, with the fit's seed.

>>> from streams.ctr import CreativeStats
>>> from learner.data import ProductRecord
>>> stats = {("mugs/g0", "p1"): {"A": CreativeStats(1000, 60), "B": CreativeStats(1000, 20)}}
>>> rows = kto_rows(stats, {"mugs/g0": "group mugs/g0"}, {"p1": ProductRecord("p1", "mugs", "Mug")}, "<eos>",
...                 KTOBaselineConfig(rows_per_slate=40), seed=0)
>>> sum(rows["label"]), len(rows["label"]) - sum(rows["label"])  # 40 clicks, 40 non-clicks
(40, 40)
>>> rows["prompt"][0].splitlines()[0], sorted(set(rows["completion"]))
('group mugs/g0', ['A<eos>', 'B<eos>'])
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from features.group import GroupFeatures
from infra.settings import DPOSettings
from learner.baselines.common import fit_summary, log_collector, trainer_arguments
from learner.baselines.config import KTOBaselineConfig
from learner.data import ProductRecord
from learner.dpo.train import FitResult, fit_steps
from learner.model.gmllm import GMLLM
from learner.model.inputs import generation_input
from streams.ctr import CreativeStats

SlateStats = Mapping[tuple[str, str], Mapping[str, CreativeStats]]
"""(group id, product id) -> creative prompt text -> impressions and clicks
(:func:`sim.judge.simulate_slate_traffic`)."""

COLUMNS = ("prompt", "images", "completion", "label", "group_id", "product_id")


def kto_rows(
    stats: SlateStats,
    targets: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    eos_token: str,
    config: KTOBaselineConfig | None = None,
    *,
    seed: int = 0,
) -> dict[str, list[Any]]:
    """KTO rows of single impressions, at most ``2 * config.rows_per_slate`` per slate (see the module docstring).

    Per slate ``D = min(rows_per_slate, clicks, non-clicks)`` clicked and ``D``
    non-clicked impressions are drawn without replacement (a multivariate
    hypergeometric draw over the slate's creatives). Slates of unknown
    groups or products, or without a click, give no row. Rows come in slate
    order; :func:`fit_kto` shuffles them.
    """
    config = config or KTOBaselineConfig()
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for (group, product_id), creatives in sorted(stats.items()):
        if group not in targets or product_id not in products or not creatives:
            continue
        texts = sorted(creatives)
        clicks = np.array([max(0, min(creatives[t].clicks, creatives[t].impressions)) for t in texts], dtype=np.int64)
        misses = np.array([creatives[t].impressions for t in texts], dtype=np.int64) - clicks
        draw = int(min(config.rows_per_slate, clicks.sum(), misses.sum()))
        if draw <= 0:
            continue
        product = products[product_id]
        prompt, image = generation_input(targets[group], product), [product.rgb_image()]
        for label, counts in ((True, clicks), (False, misses)):
            for text, n in zip(texts, rng.multivariate_hypergeometric(counts, draw), strict=True):
                for _ in range(int(n)):
                    rows["prompt"].append(prompt)
                    rows["images"].append(image)
                    rows["completion"].append(text + eos_token)
                    rows["label"].append(label)
                    rows["group_id"].append(group)
                    rows["product_id"].append(product_id)
    return rows


def class_weights(labels: list[bool], config: KTOBaselineConfig) -> tuple[float, float]:
    """``(desirable_weight, undesirable_weight)``: the configured ones, or TRL's balance rule from the counts."""
    if config.desirable_weight is not None:
        return config.desirable_weight, config.undesirable_weight
    desirable = max(1, sum(labels))
    undesirable = max(1, len(labels) - sum(labels))
    return undesirable * config.undesirable_weight / desirable, config.undesirable_weight


def kto_config(settings: DPOSettings, output_dir: str | Path, steps: int, config: KTOBaselineConfig,
               desirable_weight: float, undesirable_weight: float) -> Any:
    """TRL's ``KTOConfig`` of a fit: Group-DPO's arguments (:func:`learner.baselines.common.trainer_arguments`)
    and batch size, KTO's loss type and class weights."""
    from trl import KTOConfig

    return KTOConfig(
        **trainer_arguments(settings, output_dir, steps),
        per_device_train_batch_size=max(2, settings.batch_size),  # KTO's KL term needs two rows a batch
        loss_type=config.loss_type,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        max_length=None,
    )


def fit_kto(
    policy: GMLLM,
    reference: GMLLM,
    stats: SlateStats,
    targets: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    settings: DPOSettings,
    config: KTOBaselineConfig | None = None,
    *,
    steps: int | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``policy`` (in place) with TRL's KTO against ``reference`` on rows of ``stats`` (:func:`kto_rows`).

    Steps: ``steps``, ``config.steps``, or Group-DPO's rule on the number of rows
    (:func:`learner.dpo.train.fit_steps`: ``epochs`` passes, at least
    ``min_steps``, at most ``max_steps``). ``FitResult.pairs`` counts rows.
    Raises ``ValueError`` when the slates give no row (no click anywhere).
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import KTOTrainer

    from learner.model.gmllm import _quiet_transformers

    _quiet_transformers()
    config = config or KTOBaselineConfig()
    rows = kto_rows(stats, targets, products, policy.tokenizer.eos_token, config, seed=settings.seed)
    if not rows["label"]:
        raise ValueError(f"no KTO row from {len(stats)} slates: no slate of a known group and product has a click")
    order = np.random.default_rng(settings.seed).permutation(len(rows["label"]))
    dataset = Dataset.from_dict({c: [rows[c][i] for i in order] for c in ("prompt", "images", "completion", "label")})
    desirable_weight, undesirable_weight = class_weights(rows["label"], config)
    total_steps = steps or config.steps or fit_steps(len(dataset), settings)
    history: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="osmf-kto-") as scratch:
        args = kto_config(settings, scratch, total_steps, config, desirable_weight, undesirable_weight)
        trainer = KTOTrainer(model=policy.model, ref_model=reference.model, processing_class=policy.processor,
                             args=args, train_dataset=dataset, callbacks=[log_collector(history, on_log)])
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    policy.model.eval()
    return fit_summary(trainer, rows["group_id"], seconds, history, args.per_device_train_batch_size,
                       "rewards/margins")
