"""Group-DPO: DPO with policy and reference conditioned on the group, pairs balanced per group."""

from learner.dpo.config import GroupDPOConfig
from learner.dpo.weights import group_pair_weights

__all__ = ["GroupDPOConfig", "group_pair_weights"]
