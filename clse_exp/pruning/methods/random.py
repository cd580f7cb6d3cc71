"""Random selection: the control every method must beat. Seeded, and the same for a sample in any batch.

It has no official code; under `protocol=official` it is treated like the pre-LLM methods it controls for
(DivPrune): the survivors are fed as a shorter sequence, so their positions are contiguous.
"""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import ModelFacts, PruningMethod, Rules
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.signals import StageContext


class RandomPrune(PruningMethod):
    name = "random"

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers) -> set[int]:
        return set()

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        n = len(ctx.visual_positions(b))
        return torch.randperm(n, generator=ctx.generator(b))[:k].to(ctx.hidden.device)
