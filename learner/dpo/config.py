"""Configuration of Group-DPO: TRL's ``DPOConfig`` plus how pairs are grouped and weighted."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig


@dataclass
class GroupDPOConfig(DPOConfig):
    """TRL's DPO configuration with the group-aware fields.

    Parameters
    ----------
    group_column
        Dataset column holding each pair's group id (default ``"group_id"``).
    group_weighting
        ``"inverse_share"`` (default): a pair is drawn with probability
        proportional to ``share(group) ** -group_weight_power``, so each group
        gets the same expected weight; ``"uniform"``: every pair alike.
    group_weight_power
        Exponent of the inverse share (1.0 balances groups fully, 0.5 halfway).
    group_weight_prior
        Pseudo-pairs added to each group's pair count before inverting it:
        groups with few pairs are balanced less (see
        :func:`learner.dpo.weights.group_pair_weights`).
    one_size
        One-size-fits-all baseline: the same trainer with uniform weighting;
        the caller also builds prompts without the group prefix
        (:func:`learner.dpo.data.preference_dataset` with ``one_size=True``).
    """

    group_column: str = field(default="group_id", metadata={"help": "Dataset column with each pair's group id."})
    group_weighting: str = field(
        default="inverse_share", metadata={"help": "inverse_share (balance groups) or uniform."}
    )
    group_weight_power: float = field(default=1.0, metadata={"help": "Exponent of the inverse group share."})
    group_weight_prior: float = field(
        default=0.0, metadata={"help": "Pseudo-pairs added to each group's count before inverting it."}
    )
    one_size: bool = field(default=False, metadata={"help": "One-size-fits-all baseline: uniform weights."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.one_size:
            self.group_weighting = "uniform"
        if self.group_weighting not in ("inverse_share", "uniform"):
            raise ValueError(f"group_weighting must be inverse_share or uniform, got {self.group_weighting!r}")
        if self.group_weight_power < 0:
            raise ValueError(f"group_weight_power must be >= 0, got {self.group_weight_power}")
