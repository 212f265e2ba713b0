"""``GroupDPOTrainer``: TRL's ``DPOTrainer`` with pairs drawn in proportion to their group weight.

The loss is TRL's own (``-log σ(β[(log πθ(y_w|x,G) − log πref(y_w|x,G)) −
(log πθ(y_l|x,G) − log πref(y_l|x,G))])``): conditioning on the group is in
the prompt ``x`` (the group prefix), which policy and reference both read.
Balancing groups changes only which pairs a batch holds: the sampler draws
pair *i* with probability proportional to its weight, so the expected
gradient equals the weighted loss without touching TRL's loss code
(TRL 1.16 has no per-example weight and drops extra dataset columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler
from trl import DPOTrainer

from learner.dpo.anchor import AnchorBatch, anchor_kl
from learner.dpo.config import GroupDPOConfig
from learner.dpo.weights import group_pair_weights


class GroupDPOTrainer(DPOTrainer):
    """Group-DPO on TRL; ``train_dataset`` needs the ``args.group_column`` column.

    ``pair_weights`` (keyword only, optional): extra per-pair weights, e.g. the
    replay buffer's recency weights, multiplied into the group weights.
    ``anchors`` (keyword only, optional): creatives of groups without pairs; each
    step adds ``anchor_weight`` × :func:`learner.dpo.anchor.anchor_kl` on a batch
    of them drawn uniformly (logged as ``anchor_kl``).
    """

    def __init__(self, *args: Any, pair_weights: Any = None, anchors: AnchorBatch | None = None,
                 anchor_weight: float = 1.0, **kwargs: Any) -> None:
        config: GroupDPOConfig = kwargs.get("args") or (args[2] if len(args) > 2 else None)
        if not isinstance(config, GroupDPOConfig):
            raise TypeError("GroupDPOTrainer needs args=GroupDPOConfig(...)")
        dataset = kwargs.get("train_dataset")
        if dataset is None or config.group_column not in dataset.column_names:
            raise ValueError(
                f"train_dataset needs a {config.group_column!r} column (each pair's group id); "
                f"got columns {getattr(dataset, 'column_names', None)}"
            )
        self.pair_groups: list[str] = list(dataset[config.group_column])
        self.pair_weights: np.ndarray = group_pair_weights(
            self.pair_groups, config.group_weighting, config.group_weight_power, config.group_weight_prior
        )
        if pair_weights is not None:
            extra = np.asarray(pair_weights, dtype=np.float64)
            if extra.shape != self.pair_weights.shape or not np.all(extra > 0):
                raise ValueError(f"pair_weights needs one positive weight per pair ({len(self.pair_groups)})")
            combined = self.pair_weights * extra
            self.pair_weights = combined / combined.mean()
        self.anchors, self.anchor_weight = anchors, float(anchor_weight)
        self._anchor_draws = torch.Generator().manual_seed(config.seed)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """TRL's DPO loss, plus the anchors' KL to the reference when there are anchors."""
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.anchors is None or not model.training:
            return out
        index = torch.randint(len(self.anchors), (self.args.per_device_train_batch_size,),
                              generator=self._anchor_draws)
        kl = anchor_kl(model, self.ref_model, self.anchors.rows(index))
        self._metrics["train"]["anchor_kl"].append(float(kl.detach()))
        if return_outputs:
            loss, outputs = out
            return loss + self.anchor_weight * kl, outputs
        return out + self.anchor_weight * kl

    def group_shares(self) -> dict[str, float]:
        """Each group's expected share of the pairs the sampler draws."""
        totals: dict[str, float] = {}
        for group, weight in zip(self.pair_groups, self.pair_weights, strict=True):
            totals[group] = totals.get(group, 0.0) + float(weight)
        norm = sum(totals.values()) or 1.0
        return {g: w / norm for g, w in totals.items()}

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
        if np.allclose(self.pair_weights, 1.0):
            return super()._get_train_sampler(train_dataset)
        generator = torch.Generator().manual_seed(self.args.seed)
        return WeightedRandomSampler(
            torch.as_tensor(self.pair_weights, dtype=torch.double),
            num_samples=len(self.pair_weights),
            replacement=True,
            generator=generator,
        )
