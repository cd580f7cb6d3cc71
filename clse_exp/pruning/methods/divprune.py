"""DivPrune (Alvar et al., CVPR 2025): a max-min diverse subset of the visual embeddings at the LLM input.

Official code (vbdi/divprune@799e2d9, LLaVA/llava/model/llava_arch.py:147-171, 352-386): distances
D = 1 - cosine of the projector outputs; the first pick is the token whose nearest other token is farthest
(the second-smallest entry of its column of D, the smallest being its own ~0 distance), then repeatedly
the token whose distance to the nearest picked token is largest, picked tokens not excluded explicitly
(their ~0 self-distance keeps them out); count round(ratio * N); the survivors are fed as a shorter
sequence, so their positions are contiguous. `uniform` excludes picked tokens explicitly and keeps
original positions.
"""

from __future__ import annotations

import torch

from clse_exp.pruning.methods.base import BatchSelection, ModelFacts, PruningMethod, Rules
from clse_exp.pruning.signals import StageContext


def pre_llm_rules(protocol: str, facts: ModelFacts) -> Rules:
    """A method that cuts at the LLM input feeds fewer tokens: contiguous positions at prefill and decode.
    M-RoPE families place text after an image by the grid's extent, not its token count, so they keep
    the original (3-D) positions."""
    if protocol == "official" and not facts.mrope:
        return Rules(prefill="compact", decode="cache_length")
    return Rules()


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity under D = 1 - cosine: [N, C] -> k positions, in pick order.

    First pick: the token farthest from its nearest neighbour; then, repeatedly, the token whose
    distance to the nearest already-picked token is largest (picked tokens excluded).
    """
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    n = distance.shape[0]
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf")).min(1).values
    return greedy_farthest(distance, nearest.argmax(), k, exclude_picked=True)


def official_max_min(features: torch.Tensor, k: int) -> torch.Tensor:
    """The official greedy, step for step: second-smallest column entry first, no explicit exclusion (the
    minimum over the picked rows, kept as a running minimum: the same values)."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    return greedy_farthest(distance, distance.topk(2, dim=0, largest=False).values[1].argmax(), k,
                           exclude_picked=False)


def greedy_farthest(distance: torch.Tensor, first: torch.Tensor, k: int, exclude_picked: bool) -> torch.Tensor:
    """k picks from `first` on, each the token farthest (largest running minimum distance) from those picked.
    Tensor ops only, no host synchronisation per pick, so on a GPU the loop only queues kernels."""
    picks = torch.empty(k, dtype=torch.long, device=distance.device)
    nxt = first.view(1)
    to_picked = torch.full_like(distance[0], float("inf"))
    for i in range(k):
        picks[i : i + 1] = nxt
        to_picked = torch.minimum(to_picked, distance.index_select(0, nxt)[0])
        if exclude_picked:
            to_picked.index_fill_(0, nxt, float("-inf"))
        nxt = to_picked.argmax().view(1)
    return picks


def batched_greedy_farthest(distance: torch.Tensor, first: torch.Tensor, k: int, exclude_picked: bool
                            ) -> torch.Tensor:
    """`greedy_farthest` for a batch: distance [B, N, N], first [B] -> picks [B, k], a fixed number of kernels
    per pick whatever the batch size, none reading the device."""
    batch, n, _ = distance.shape
    picks = torch.empty(batch, k, dtype=torch.long, device=distance.device)
    nxt = first[:, None]
    to_picked = torch.full((batch, n), float("inf"), dtype=distance.dtype, device=distance.device)
    for i in range(k):
        picks[:, i : i + 1] = nxt
        to_picked = torch.minimum(to_picked, distance.gather(1, nxt[:, :, None].expand(-1, 1, n))[:, 0])
        if exclude_picked:
            to_picked.scatter_(1, nxt, float("-inf"))
        nxt = to_picked.argmax(1, keepdim=True)
    return picks


class DivPrune(PruningMethod):
    """Runs at the LLM input (layer 0): the features are the projector outputs."""

    name = "divprune"

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers) -> set[int]:
        return set()

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        if ctx.protocol == "official":
            return official_max_min(ctx.hidden_states(b), k)
        return max_min_diverse(ctx.hidden_states(b), k)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """The greedy for every sample at once: one [B, N, N] distance and k_max steps of batched kernels
        (the per-sample greedy's arithmetic, samples padded to the longest and their padding never picked)."""
        counts = [n if k is None else k for k, n in zip(budgets, ctx.n_current, strict=True)]
        width, keep = ctx.visual_slots.shape[1], max(counts, default=0)
        if keep == 0:
            return BatchSelection(ctx.visual_slots[:, :0], counts, width)
        valid = ctx.visual_valid
        features = ctx.visual_hidden()
        official = ctx.protocol == "official"
        if official:
            unit = features / features.norm(dim=-1, keepdim=True)
        else:
            unit = torch.nn.functional.normalize(features.float(), dim=-1)
        distance = 1.0 - unit @ unit.transpose(1, 2)
        pair = valid[:, :, None] & valid[:, None, :]
        if official:  # the column's second-smallest entry over real rows; padding columns never win
            column = distance.masked_fill(~pair, float("inf")).topk(2, dim=1, largest=False).values[:, 1]
            first = column.masked_fill(~valid, float("-inf")).argmax(1)
        else:
            eye = torch.eye(width, dtype=torch.bool, device=distance.device)
            nearest = distance.masked_fill(eye | ~pair, float("inf")).min(2).values
            first = nearest.masked_fill(~valid, float("-inf")).argmax(1)
        distance = distance.masked_fill(~valid[:, None, :], float("-inf"))  # padding is never the farthest
        picks = batched_greedy_farthest(distance, first, keep, exclude_picked=not official)
        limit = ctx.keep_counts[:, None]
        order = torch.arange(keep, device=picks.device)[None]
        picks = torch.where(limit == valid.sum(1, keepdim=True), order, picks)  # a sample left whole keeps all
        picks = torch.where(order < limit, picks, width)
        return BatchSelection(picks.sort(dim=1).values, counts, width)
