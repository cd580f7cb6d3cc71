"""FastV (Chen et al., ECCV 2024): keep the visual tokens the last prompt token attends to most in layer K-1.

Official code (pkunlp-icler/FastV): one cut before layer K=2, head-mean attention of the LAST query row
(not an all-token mean), original positions with gaps, layers before K keep their full cache. Its count,
round(N * (1 - R)), is the planner's `budget=final` count, so both protocols count alike.
"""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import Layers, ModelFacts, PruningMethod
from clse_exp.pruning.signals import StageContext


class FastV(PruningMethod):
    name = "fastv"

    def default_layers(self, facts: ModelFacts) -> Layers:
        return Layers(0, (2,) if facts.num_layers > 2 else (1,))

    def batch_scores(self, ctx: StageContext) -> torch.Tensor:
        return ctx.attention_batch()
