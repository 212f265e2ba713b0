"""Settings of the baselines beside Group-DPO (the step budget, learning rate, β and batch come from
:class:`infra.settings.DPOSettings`, so every arm trains alike)."""

from __future__ import annotations

from dataclasses import dataclass

BASELINES = ("kto", "rloo")
"""Names of the baselines the alignment benchmark can run beside Group-DPO."""


@dataclass(frozen=True)
class KTOBaselineConfig:
    """How on-policy slate traffic becomes KTO rows (:func:`learner.baselines.kto.kto_rows`).

    Parameters
    ----------
    rows_per_slate
        Desirable rows drawn per (group, product) slate, at most (the slate's
        clicks if fewer); as many undesirable rows are drawn, so each slate
        gives at most ``2 * rows_per_slate`` rows. Clicks are drawn without
        replacement from all of the slate's clicks, non-clicks from all of its
        non-clicked impressions, so a creative's share of each class is its
        share of the slate's clicks (non-clicks): the rows keep every
        creative's CTR relative to its slate.
    loss_type
        TRL's ``KTOConfig.loss_type`` (``kto`` or ``apo_zero_unpaired``).
    desirable_weight
        TRL's ``desirable_weight``; ``None``: ``n_undesirable / n_desirable``
        of the rows, the lower end of the range TRL recommends (its Eq. 8
        check: ``desirable_weight · n_D / (undesirable_weight · n_U)`` in
        [1, 4/3]). The per-slate draw makes the classes equal, so it is 1.
    undesirable_weight
        TRL's ``undesirable_weight``.
    steps
        Optimizer steps of a fit; ``None``: Group-DPO's rule on the number of
        rows (:func:`learner.dpo.train.fit_steps`, capped by ``dpo.max_steps``).
    """

    rows_per_slate: int = 32
    loss_type: str = "kto"
    desirable_weight: float | None = None
    undesirable_weight: float = 1.0
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.rows_per_slate < 1:
            raise ValueError(f"rows_per_slate must be >= 1, got {self.rows_per_slate}")
        if self.loss_type not in ("kto", "apo_zero_unpaired"):
            raise ValueError(f"loss_type must be kto or apo_zero_unpaired, got {self.loss_type!r}")
        if self.desirable_weight is not None and self.desirable_weight <= 0:
            raise ValueError(f"desirable_weight must be > 0, got {self.desirable_weight}")
        if self.undesirable_weight <= 0:
            raise ValueError(f"undesirable_weight must be > 0, got {self.undesirable_weight}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {self.steps}")


@dataclass(frozen=True)
class RLOOBaselineConfig:
    """TRL's RLOO on the slates' prompts (:func:`learner.baselines.rloo.fit_rloo`).

    Parameters
    ----------
    num_generations
        Completions per prompt: RLOO's leave-one-out group (TRL's ``num_generations``).
    beta
        TRL's KL coefficient to the reference (the live model); TRL's default.
    max_completion_length
        Tokens a sampled completion may have (``generation.max_new_tokens`` of serving is 64).
    constrained
        ``False`` (default): TRL samples as it ships, unconstrained, and a completion that does not parse
        earns 0; ``True``: TRL's ``generate`` call gets our grammar as a logits processor
        (:class:`learner.baselines.rloo.GrammarLogits`), so every completion parses, as served.
    steps
        Optimizer steps of a fit; ``None``: Group-DPO's rule on prompts × generations.
    """

    num_generations: int = 4
    beta: float = 0.05
    max_completion_length: int = 64
    constrained: bool = False
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (RLOO's baseline is the other completions), "
                             f"got {self.num_generations}")
        if self.beta < 0 or self.max_completion_length < 1:
            raise ValueError("beta must be >= 0 and max_completion_length >= 1")
