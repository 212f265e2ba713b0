"""Baselines measured beside Group-DPO (issue 12): what TRL ships for learning from clicks and rewards.

* :mod:`learner.baselines.kto` — TRL's ``KTOTrainer`` on single clicked /
  not-clicked impressions of the live model's on-policy slates.
* :mod:`learner.baselines.rloo` — TRL's ``RLOOTrainer`` with the live model's
  click head, calibrated per group, as the reward.
"""

from learner.baselines.config import BASELINES, KTOBaselineConfig, RLOOBaselineConfig

__all__ = ["BASELINES", "KTOBaselineConfig", "RLOOBaselineConfig"]
