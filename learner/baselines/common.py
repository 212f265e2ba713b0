"""What the baselines' fits share: Group-DPO's CPU training arguments, TRL's logged figures, the fit summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infra.settings import DPOSettings
from learner.dpo.train import FitResult, dpo_config, log_collector  # noqa: F401 - log_collector re-exported for the baselines

SHARED_ARGUMENTS = (
    "use_cpu", "bf16", "fp16", "gradient_checkpointing", "report_to", "save_strategy", "logging_strategy",
    "logging_steps", "disable_tqdm", "learning_rate", "lr_scheduler_type", "warmup_steps", "max_steps", "beta",
    "seed", "data_seed", "dataloader_num_workers",
)
"""The fields of Group-DPO's TRL configuration every baseline takes as they are (:func:`trainer_arguments`)."""


def trainer_arguments(settings: DPOSettings, output_dir: str | Path, steps: int) -> dict[str, Any]:
    """Keyword arguments of a TRL config for a baseline fit of ``steps`` steps: exactly Group-DPO's
    (:func:`learner.dpo.train.dpo_config`: CPU, fp32, no checkpointing, no saving, no reporting, its lr,
    schedule, warm-up, β and seeds), so the arms differ only in what they learn from."""
    group_dpo = dpo_config(settings, output_dir, steps)
    return {"output_dir": str(output_dir), **{name: getattr(group_dpo, name) for name in SHARED_ARGUMENTS}}


def fit_summary(trainer: Any, groups: Sequence[str], seconds: float, history: list[dict[str, float]],
                batch_size: int, margin: str) -> FitResult:
    """:class:`learner.dpo.train.FitResult` of a baseline fit: ``pairs`` counts its rows (or prompts), one
    per entry of ``groups``; ``margins`` holds the logged figure ``margin``."""
    counts = {g: list(groups).count(g) for g in sorted(set(groups))}
    steps = int(trainer.state.global_step)
    return FitResult(
        steps=steps, pairs=len(groups), seconds=seconds, pairs_per_group=counts,
        sampled_share={g: round(n / max(1, len(groups)), 4) for g, n in counts.items()},
        losses=[h["loss"] for h in history], margins=[h.get(margin, float("nan")) for h in history],
        pairs_seen=steps * batch_size,
    )
