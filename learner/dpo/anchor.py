"""A KL term that holds groups without pairs where the incumbent has them (``learner.dpo.preserve=kl``).

Anchors (:func:`learner.dpo.onpolicy.quiet_group_anchors`) are the incumbent's
own creatives for groups without a pair. :func:`anchor_kl` is the token-level
``KL(π_ref ‖ π_θ)`` over the whole vocabulary at every position of those
creatives: it is zero while the policy writes them as the reference does and
grows with any drift a fit on other groups' pairs causes through shared
weights. Unlike an SFT term on the sampled tokens, it holds the full
distribution at each step, not only the sampled choice, and it does not act
on the winners of pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from features.group import GroupFeatures
from learner.data import ProductRecord
from learner.model.gmllm import GMLLM


@dataclass(frozen=True)
class AnchorBatch:
    """Every anchor as model inputs (:meth:`learner.model.gmllm.GMLLM.completion_batch`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    completion_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor) -> AnchorBatch:
        """The anchors at ``index``."""
        return AnchorBatch(self.input_ids[index], self.attention_mask[index], self.pixel_values[index],
                           self.completion_mask[index])


def anchor_batch(gmllm: GMLLM, anchors: Sequence[Any], features: Mapping[str, GroupFeatures | str],
                 products: Mapping[str, ProductRecord]) -> AnchorBatch | None:
    """The anchors whose group and product are known, as one batch; ``None`` when none is."""
    items = [(features[a.group_id], products[a.product_id], a.prompt) for a in anchors
             if a.group_id in features and a.product_id in products]
    if not items:
        return None
    return AnchorBatch(*gmllm.completion_batch(items))


def anchor_kl(policy: Any, reference: Any, batch: AnchorBatch) -> torch.Tensor:
    """Mean over the anchors' completion tokens of ``KL(π_ref ‖ π_θ)`` of the next-token distributions."""
    device = next(policy.parameters()).device
    inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
              "pixel_values": batch.pixel_values.to(device), "use_cache": False}
    with torch.no_grad():
        ref_logps = torch.log_softmax(reference(**inputs).logits[:, :-1].float(), dim=-1)
    logps = torch.log_softmax(policy(**inputs).logits[:, :-1].float(), dim=-1)
    per_token = (ref_logps.exp() * (ref_logps - logps)).sum(dim=-1)
    mask = batch.completion_mask.to(per_token.device)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
