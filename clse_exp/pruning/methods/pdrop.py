"""PyramidDrop (Xing et al., 2025): multi-stage; each stage ranks by the last instruction token's attention
computed with the pruning layer's OWN norm, projections and RoPE on its input."""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import PruningMethod
from clse_exp.pruning.signals import StageContext


class PDrop(PruningMethod):
    name = "pdrop"

    def scores(self, ctx: StageContext, b: int) -> torch.Tensor:
        return ctx.current_layer_attention(b)
