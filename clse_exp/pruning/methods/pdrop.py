"""PyramidDrop (Xing et al., CVPR 2025): multi-stage; each stage ranks by the last instruction token's attention
computed with the pruning layer's OWN norm, projections and RoPE on its input.

Official code (Cooperx521/PyramidDrop@6444f30, llava/model/modeling_llama_pdrop.py): stages before layers
[8, 16, 24] of 32 (1/4, 1/2, 3/4 of the depth), stage s keeps int(N * lambda**s) of the ORIGINAL N visual
tokens (truncation; lambda = 0.5 by default), positions renumbered contiguously after every cut and each
layer's decode position continuing from its own cached length (L1445-1446, L1259-1268). Here lambda is
solved from `keep` (budget=final: lambda**3 = keep; average: the layer-averaged retention equals keep),
so `budget=final keep=0.125` is the official lambda = 0.5 (576 -> 288 -> 144 -> 72) and keep=0.064 is
lambda = 0.4 (230 -> 92 -> 36). The official query has no GQA head repeat (it assumes H_kv = H); the
repeat here is the same for H_kv = H and the only sound transfer otherwise.
"""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import Layers, ModelFacts, PruningMethod, Rules, fraction_of_depth
from clse_exp.pruning.signals import StageContext

LAMBDA = 0.5
DIGITS = 10  # a solved lambda is rounded here, so 0.125 ** (1/3) is exactly 0.5 before int() truncates


class PDrop(PruningMethod):
    name = "pdrop"
    has_official_counts = True

    def default_layers(self, facts: ModelFacts) -> Layers:
        return Layers(0, fraction_of_depth((0.25, 0.5, 0.75), facts.num_layers))

    def default_shape(self, n_stages: int) -> list[float]:
        return [LAMBDA ** (s + 1) for s in range(n_stages)]

    def official_counts(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> list[int]:
        lam = solve_lambda(keep, budget, layers.prune_layers, facts.num_layers)
        return [max(1, int(n_visual * lam ** (s + 1))) for s in range(len(layers.prune_layers))]

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        if protocol == "official" and not facts.mrope:
            return Rules(prefill="compact", decode="cache_length")
        return Rules()

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()  # the stage's own layer input is the current hidden state

    def batch_scores(self, ctx: StageContext) -> torch.Tensor:
        return ctx.attention_batch(layer=ctx.layer)


def solve_lambda(keep: float, budget: str, prune_layers: tuple[int, ...], num_layers: int) -> float:
    """The lambda whose official schedule meets `keep` (continuously, before the counts are truncated)."""
    stages = len(prune_layers)
    if budget == "final":
        return round(keep ** (1 / stages), DIGITS)
    spans = [b - a for a, b in zip(prune_layers, (*prune_layers[1:], num_layers), strict=True)]

    def average(lam: float) -> float:
        return (prune_layers[0] + sum(span * lam ** (s + 1) for s, span in enumerate(spans))) / num_layers

    low, high = 0.0, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < keep else (low, middle)
    return round((low + high) / 2, DIGITS)
