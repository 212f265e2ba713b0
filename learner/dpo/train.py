"""One Group-DPO fit of the G-MLLM on preference pairs (or its one-size-fits-all baseline).

:func:`fit_group_dpo` turns :class:`infra.settings.DPOSettings` into a
:class:`~learner.dpo.config.GroupDPOConfig` set up for CPU (``use_cpu``, no
bf16, no gradient checkpointing: the defaults cost 3× here), builds the TRL
dataset (:mod:`learner.dpo.data`) and trains the policy in place against a
frozen reference held in memory (vision inputs cannot use precomputed
reference log-probs).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.settings import DPOSettings, LearnerSettings
from learner.data import ProductRecord
from learner.dpo.anchor import anchor_batch
from learner.dpo.config import GroupDPOConfig
from learner.dpo.data import preference_dataset, usable_pairs
from learner.dpo.onpolicy import KL_MODES, Protection, protection_for
from features.group import GroupFeatures
from learner.model.gmllm import GMLLM
from infra.contracts.messages import PreferencePair


@dataclass
class FitResult:
    """What one fit did: steps, pairs, time, and TRL's logged losses and reward margins."""

    steps: int
    pairs: int
    seconds: float
    pairs_per_group: dict[str, int]
    sampled_share: dict[str, float]
    pairs_seen: int = 0
    losses: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    anchors: int = 0

    @property
    def samples_per_s(self) -> float:
        """Pairs processed per second of training (steps × batch size / seconds)."""
        return self.pairs_seen / self.seconds if self.seconds > 0 else float("nan")


def sft_coefficient(settings: DPOSettings, anchored: bool = False) -> float:
    """Weight of TRL's SFT term: ``sft_weight`` (RPO on winners), at least ``preserve_sft_weight`` when anchors train.

    TRL applies one SFT weight to every row's chosen completion, so the
    winners of pairs and the anchors of groups without pairs share it.
    """
    return max(settings.sft_weight, settings.preserve_sft_weight if anchored else 0.0)


def dpo_config(settings: DPOSettings, output_dir: str | Path, steps: int, one_size: bool = False,
               anchored: bool = False, **overrides: Any) -> GroupDPOConfig:
    """The TRL configuration of a fit: CPU, fp32, no checkpointing, no saving, no reporting."""
    sft = sft_coefficient(settings, anchored)
    loss_type = [settings.loss_type, "sft"] if sft > 0 else [settings.loss_type]
    extra: dict[str, Any] = {"loss_weights": [1.0, sft]} if sft > 0 else {}
    return GroupDPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=max(1, steps // 20),
        disable_tqdm=True,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, max(0, steps // 10)),
        max_steps=steps,
        beta=settings.beta,
        loss_type=loss_type,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        group_weighting="uniform" if one_size else settings.group_weighting,
        group_weight_power=settings.group_weight_power,
        group_weight_prior=settings.group_weight_prior,
        one_size=one_size,
        **extra,
        **overrides,
    )


def fit_steps(pairs: int, settings: DPOSettings) -> int:
    """Optimizer steps of a fit: ``epochs`` passes over ``pairs``, at least ``min_steps``, at most ``max_steps``."""
    passes = math.ceil(settings.epochs * pairs / settings.batch_size)
    return max(1, min(settings.max_steps, max(settings.min_steps, passes)))


def fit_group_dpo(
    policy: GMLLM,
    reference: GMLLM,
    pairs: Sequence[PreferencePair],
    features: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    settings: DPOSettings,
    *,
    one_size: bool = False,
    pair_weights: Sequence[float] | None = None,
    steps: int | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    trainer_class: Any = None,
    anchors: Sequence[Any] = (),
) -> FitResult:
    """Train ``policy`` (in place) with Group-DPO against ``reference`` on ``pairs``.

    ``one_size`` pools the pairs under the neutral prefix with uniform weights.
    ``pair_weights`` (one per pair, e.g. recency) multiply the group weights.
    ``trainer_class`` swaps the trainer (the ``group-dpo`` benchmark passes TRL's
    own ``DPOTrainer``). ``on_log(step, logs)`` sees TRL's logged figures.
    ``anchors`` (:class:`learner.dpo.onpolicy.Anchor`: creatives of groups
    without pairs) are held by a KL term to ``reference`` when ``preserve`` is
    ``kl``/``mirror_kl`` (:mod:`learner.dpo.anchor`, weight
    ``preserve_kl_weight``); otherwise they add rows (``chosen == rejected``)
    that only the SFT term acts on, weighted ``preserve_sft_weight``
    (:func:`sft_coefficient`), and steps count pairs and those rows alike.
    They are ignored in one-size mode.
    """
    from transformers import PrinterCallback

    from learner.dpo.trainer import GroupDPOTrainer
    from learner.model.gmllm import _quiet_transformers

    _quiet_transformers()
    kept, _ = usable_pairs(pairs, features, products, one_size)
    if pair_weights is not None:
        index = {id(p): w for p, w in zip(pairs, pair_weights, strict=True)}
        weights: list[float] | None = [index[id(p)] for p in kept]
    else:
        weights = None
    kl_anchors = anchor_batch(policy, anchors, features, products) \
        if anchors and not one_size and settings.preserve in KL_MODES else None
    if one_size or settings.preserve_sft_weight <= 0 or settings.preserve in KL_MODES:
        anchors = ()  # no SFT rows: the KL term holds them, or nothing does
    dataset = preference_dataset(kept, features, products, policy.tokenizer.eos_token, one_size, anchors)
    n_anchors = len(dataset) - len(kept)
    if weights is not None and n_anchors:
        weights = weights + [1.0] * n_anchors
    total_steps = steps or fit_steps(len(dataset), settings)
    history: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="osmf-dpo-") as scratch:
        args = dpo_config(settings, scratch, total_steps, one_size, anchored=n_anchors > 0)
        cls = trainer_class or GroupDPOTrainer
        kwargs: dict[str, Any] = dict(
            model=policy.model, ref_model=reference.model, processing_class=policy.processor,
            args=args, train_dataset=dataset, callbacks=[log_collector(history, on_log)],
        )
        if cls is GroupDPOTrainer or issubclass(cls, GroupDPOTrainer):
            kwargs.update(pair_weights=weights, anchors=kl_anchors, anchor_weight=settings.preserve_kl_weight)
        trainer = cls(**kwargs)
        trainer.remove_callback(PrinterCallback)  # figures go to on_log and FitResult, not stdout
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    policy.model.eval()
    groups = [p.group_id for p in kept]
    counts = {g: groups.count(g) for g in sorted(set(groups))}
    all_groups = list(dataset["group_id"]) if n_anchors else groups
    shares = (trainer.group_shares() if hasattr(trainer, "group_shares")
              else {g: all_groups.count(g) / len(all_groups) for g in sorted(set(all_groups))})
    return FitResult(
        steps=int(trainer.state.global_step),
        pairs=len(kept),
        seconds=seconds,
        pairs_per_group=counts,
        sampled_share={g: round(s, 4) for g, s in sorted(shares.items())},
        losses=[h["loss"] for h in history],
        margins=[h.get("rewards/margins", float("nan")) for h in history],
        pairs_seen=int(trainer.state.global_step) * settings.batch_size,
        anchors=n_anchors or (len(kl_anchors) if kl_anchors is not None else 0),
    )


def log_collector(history: list[dict[str, float]],
                  on_log: Callable[[int, dict[str, float]], None] | None = None) -> Any:
    """A ``TrainerCallback`` that appends TRL's logged training figures to ``history`` (and calls ``on_log``)."""
    from transformers import TrainerCallback

    class _Collect(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                history.append({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
                if on_log is not None:
                    on_log(state.global_step, history[-1])

    return _Collect()


def protected_fit(model: GMLLM, pairs: Sequence[PreferencePair], held: Protection,
                  targets: Mapping[str, GroupFeatures | str], products: Mapping[str, ProductRecord],
                  settings: LearnerSettings, dpo: DPOSettings | None = None) -> tuple[GMLLM, FitResult]:
    """A copy of ``model`` (also the fit's frozen reference) fitted on ``pairs`` plus the protection ``held``
    (mirrored pairs at ``dpo.preserve_weight``, anchors); returns the candidate and the fit.

    ``dpo``: the fit's settings (default ``settings.dpo``; e.g. with a round seed or uniform weighting).
    """
    candidate = model.copy()
    weights = [1.0] * len(pairs) + [max(settings.dpo.preserve_weight, 1e-6)] * len(held.mirrored)
    fit = fit_group_dpo(candidate, model, [*pairs, *held.mirrored], targets, products, dpo or settings.dpo,
                        pair_weights=weights, anchors=held.anchors)
    return candidate, fit


def fit_with_protection(model: GMLLM, pairs: Sequence[PreferencePair], targets: Mapping[str, GroupFeatures | str],
                        products: Mapping[str, ProductRecord], settings: LearnerSettings, seed: int,
                        one_size: bool = False, dpo: DPOSettings | None = None
                        ) -> tuple[GMLLM, FitResult, Protection]:
    """One on-policy fit from ``model``: the protection of ``targets`` without evidence (:func:`protection_for`,
    anchors sampled at ``seed``), then :func:`protected_fit`; returns the candidate, the fit and the protection."""
    held = protection_for(pairs, model, targets, products, settings, seed, one_size)
    candidate, fit = protected_fit(model, pairs, held, targets, products, settings, dpo)
    return candidate, fit, held
