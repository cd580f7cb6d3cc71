"""Random selection: the control every method must beat. Seeded, and the same for a sample in any batch."""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import PruningMethod
from clse_exp.pruning.signals import StageContext


class RandomPrune(PruningMethod):
    name = "random"

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        n = len(ctx.visual_positions(b))
        return torch.randperm(n, generator=ctx.generator(b))[:k].to(ctx.hidden.device)
