"""FastV (Chen et al., 2024): keep the visual tokens the last prompt token attends to most in layer K-1."""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import PruningMethod
from clse_exp.pruning.signals import StageContext


class FastV(PruningMethod):
    """Head-averaged attention of the last query row (as the official code does, not an all-token mean)."""

    name = "fastv"

    def scores(self, ctx: StageContext, b: int) -> torch.Tensor:
        return ctx.attention(b)
