"""DivPrune (Alvar et al., 2025): a max-min diverse subset of the visual embeddings at the LLM input."""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import PruningMethod
from clse_exp.pruning.signals import StageContext


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity under D = 1 - cosine: [N, C] -> k positions, in pick order.

    First pick: the token farthest from its nearest neighbour; then, repeatedly, the token whose
    distance to the nearest already-picked token is largest.
    """
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    n = distance.shape[0]
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf")).min(1).values
    picks = [int(nearest.argmax())]
    to_picked = distance[picks[0]].clone()
    to_picked[picks[0]] = float("-inf")
    for _ in range(k - 1):
        nxt = int(to_picked.argmax())
        picks.append(nxt)
        to_picked = torch.minimum(to_picked, distance[nxt])
        to_picked[picks] = float("-inf")
    return torch.tensor(picks, device=features.device)


class DivPrune(PruningMethod):
    """Runs at the LLM input (layer 0): the features are the projector outputs."""

    name = "divprune"

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        return max_min_diverse(ctx.hidden_states(b), k)
