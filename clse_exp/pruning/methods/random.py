"""Random selection: the control every method must beat. Seeded, and the same for a sample in any batch.

It has no official code; under `protocol=official` it is treated like the pre-LLM methods it controls for
(DivPrune): the survivors are fed as a shorter sequence, so their positions are contiguous.
"""

from __future__ import annotations

import torch

from clse_exp.efficiency.counts import host_side, upload
from clse_exp.pruning.methods.base import BatchSelection, ModelFacts, PruningMethod, Rules
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.signals import StageContext


class RandomPrune(PruningMethod):
    name = "random"

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers) -> set[int]:
        return set()

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        return torch.randperm(ctx.n_current[b], generator=ctx.generator(b))[:k].to(ctx.hidden.device)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """The same draws as `select` (a seeded CPU generator per sample), sent to the device in one upload."""
        width = ctx.visual_slots.shape[1]
        with host_side():
            rows = [torch.arange(n) if k is None else torch.randperm(n, generator=ctx.generator(b))[:k].sort().values
                    for b, (k, n) in enumerate(zip(budgets, ctx.n_current, strict=True))]
            counts = [len(row) for row in rows]
            padded = torch.full((len(rows), max(counts, default=0)), width, dtype=torch.long)
            for b, row in enumerate(rows):
                padded[b, : len(row)] = row
        return BatchSelection(upload(padded, ctx.hidden.device), counts, width)
