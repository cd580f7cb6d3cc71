"""PruMerge+ (Shang et al., ICCV 2025): [CLS]-attention outliers plus a spatially uniform sample, each kept
token absorbing its nearest tokens by key similarity, before the projector.

Official code (42Shawn/LLaVA-PruMerge@097c041, llava/model/multimodal_encoder/clip_encoder.py, cited PM:<lines>;
`forward` runs token_prune_merge_advanced_plus, PM:295-300), LLaVA-1.5:
- Score: q_proj and k_proj outputs of the LAST CLIP layer, whose input is LLaVA's feature (layer -2's
  output), as ONE head over all C channels: softmax(q kᵀ / sqrt(C)) over every key, [CLS] row, patch
  columns (PM:182-201).
- Count: the IQR outliers of those scores, #(a > Q3 + 1.5 IQR) with numpy percentiles (PM:34-47,203-205);
  outliers by descending score (topk). Grid: every ⌊⌊1 / ratio⌋ / 3⌋-th flattened index of 0..574 (ratio =
  outliers / N), minus the outliers, ascending, appended (PM:208-214).
- Merge: each kept token i (outlier or grid) becomes x_i + Σ a_j x_j over the 32 OTHER patches (kept or not)
  whose L2-normalised last-layer keys are most similar to i's, weights the scores a, not normalised
  (PM:229-276); one extra token Σ a_j x_j over the pruned patches is appended (PM:278-279). x are the
  features of layer -2's output ([CLS] dropped); the result goes through the projector and is fed as a
  shorter sequence, in that order (contiguous positions; llava/model/llava_arch.py:94-106,211-232).

Budget: the official count is adaptive (it ignores any ratio: PM:203-204,300). `prune.adaptive=true`
reproduces it (protocol=official only; `keep` < 1 just switches pruning on and the trace's budget is the
planner's, not the count reached: each run says so in one log line, and every record is flagged
`budget_unreachable`, so a keep sweep's identical rows are marked as such); the IQR runs per image, the
official batch-1 case (the official code pools it over a batch). Where the official code raises, we clamp: no
outlier -> 1, a zero stride -> 1. The grid runs over 0..N-2 for any N (575 = N - 1 for LLaVA-1.5). By default
(`adaptive=false`) a sample keeps k = round(keep * N) tokens, split evenly over its images; an image's k tokens
keep the official structure:
outliers (descending) + the official grid of the outlier count + the extra token, with the smallest outlier
count whose official total is exactly k, or else the largest whose total falls short, with further outliers
(in score order, same grid) until the total is k; for k below the smallest official total, k - 1 outliers
and no grid. So an image whose adaptive total is k keeps the adaptive tokens. The extra token has no patch
of its own: it takes the slot of the pruned patch with the largest score (its largest weight), which only
names it in the trace under `official`; under `uniform` the k tokens keep their original positions there
(float32). The features are the last CLIP layer's captured input (LLaVA-1.5's vision_feature_layer = -2).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import Layers, MethodOptions, ModelFacts, PruningMethod, Rules, Selection
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.methods.visionzip import per_image, require_clip_encoder, split_budget
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import positions_of

NEIGHBOURS = 32  # tokens each kept token absorbs (PM:268)


def cls_attention_one_head(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]-to-patch attention [n] of CLIP `layer` taken as one head over all C channels, scale C^-1/2, and
    its keys [1 + n, C], from the layer's input x [1 + n, C] (PM:182-201)."""
    attn = layer.self_attn
    hidden = layer.layer_norm1(x)
    query = attn.q_proj(hidden[:1]).to(dtype)
    keys = attn.k_proj(hidden).to(dtype)
    probs = torch.softmax((query @ keys.T) * x.shape[-1] ** -0.5, dim=-1)
    return probs[0, 1:], keys


def iqr_outliers(scores: torch.Tensor) -> int:
    """How many scores exceed Q3 + 1.5 IQR (numpy's linear percentiles on float32, PM:34-47)."""
    values = scores.detach().float().cpu().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return int((values > q3 + 1.5 * (q3 - q1)).sum())


def official_stride(outliers: int, n: int) -> int:
    """⌊⌊1 / ratio⌋ / 3⌋ with ratio = outliers / n, in floating point as the official code (PM:209-210)."""
    return int(int(1 / (outliers / n)) / 3)


def plus_tokens(ranked: torch.Tensor, n: int, outliers: int, stride: int) -> torch.Tensor:
    """The top `outliers` patches (descending score), then the grid 0, stride, ... < n - 1 minus them."""
    top = ranked[:outliers]
    grid = torch.arange(0, n - 1, stride, device=ranked.device)
    return torch.cat([top, grid[~torch.isin(grid, top)]])


@functools.lru_cache(maxsize=64)
def official_strides(n: int) -> dict[int, list[int]]:
    """Official grid stride -> the outlier counts that give it (every count with a stride of at least 1)."""
    strides: dict[int, list[int]] = {}
    for outliers in range(1, n + 1):
        if official_stride(outliers, n) < 1:
            break
        strides.setdefault(official_stride(outliers, n), []).append(outliers)
    return strides


def budgeted_tokens(ranked: torch.Tensor, n: int, kept: int) -> torch.Tensor:
    """`kept` patches in the official outlier + grid structure (see the module docstring), found on the device:
    the outlier count and stride it settles on are device scalars, never read back."""
    largest = sum(len(counts) for counts in official_strides(n).values())  # outlier counts with a stride
    if largest == 0 or kept == 0:
        return ranked[:kept]
    device = ranked.device
    counts = torch.arange(1, largest + 1, device=device)
    strides = device_stride(counts, n)
    # the official layout of m outliers: m + its grid, less the grid patches among the top m
    official = counts + grid_length(strides, n) - grid_hits(ranked, strides, n).diagonal()
    exact, below = official == kept, official < kept
    first_exact = exact.to(torch.int8).argmax()
    last_below = largest - 1 - below.flip(0).to(torch.int8).argmax()
    # from the last count below `kept`, with its stride, the layout grows by 0 or 1 patch per further outlier
    stride = torch.where(exact.any(), strides[first_exact], strides[last_below])
    sizes = torch.arange(1, n + 1, device=device) + grid_length(stride, n) - grid_hits(ranked, stride[None], n)[0]
    reach = (sizes == kept) & (torch.arange(n, device=device) >= last_below)
    outliers = torch.where(exact.any(), first_exact + 1, torch.where(below.any(), reach.to(torch.int8).argmax() + 1,
                                                                     kept))
    # the order plus_tokens gives: outliers by rank, then the grid ascending (ranked[:kept] when none is below)
    rank = torch.empty_like(ranked).scatter_(0, ranked, torch.arange(n, device=device))
    patch = torch.arange(n, device=device)
    top = rank < outliers
    grid = (exact.any() | below.any()) & (patch % stride == 0) & (patch < n - 1) & ~top
    key = torch.where(top, rank, torch.where(grid, n + patch, 2 * n + patch))
    return key.argsort()[:kept]


def device_stride(outliers: torch.Tensor, n: int) -> torch.Tensor:
    """`official_stride` of device outlier counts, in float64 as the official floating point."""
    return ((1 / (outliers.double() / n)).floor() / 3).floor().long()


def grid_length(stride: torch.Tensor, n: int) -> torch.Tensor:
    """Patches of the grid 0, stride, ... < n - 1 for each stride."""
    return (n - 1 + stride - 1) // stride


def grid_hits(ranked: torch.Tensor, strides: torch.Tensor, n: int) -> torch.Tensor:
    """[len(strides), n]: entry (i, m - 1) is how many of the top m patches lie on the grid of strides[i]."""
    on_grid = (ranked[None] % strides[:, None] == 0) & (ranked[None] < n - 1)
    return on_grid.long().cumsum(1)


class PruMergePlus(PruningMethod):
    name = "prumerge_plus"

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "prumerge_plus"
        adaptive: bool = False  # the official IQR count (ignores keep; protocol=official only)

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        require_clip_encoder(self.name, facts, layers)
        if self.options.adaptive and not official:
            raise ConfigError("prune.adaptive=true is the official code's own count, so it needs "
                              "protocol=official; protocol=uniform keeps exactly round(keep * N) tokens")

    def keep_ignored(self, official: bool) -> str | None:
        if not self.options.adaptive:
            return None
        return ("prune.adaptive=true keeps the official IQR count of each image, which no keep or budget sets "
                "(keep < 1 only switches pruning on, so every keep gives the same tokens)")

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """The last layer's input: layer -2's output (the features), from which its q and k are recomputed."""
        return (-1,)

    def select(self, ctx: StageContext, b: int, k: int) -> Selection:
        layer = ctx.vision_layers[-1]
        images = per_image(ctx, b, -1)
        orders, rows = [], []
        for (offset, x), count in zip(images, split_budget(k, len(images)), strict=True):
            if count == 0 and not self.options.adaptive:
                continue
            order, merged = self._one_image(layer, x, count, ctx.protocol == "official")
            orders.append(offset + order)
            rows.append(ctx.projector(merged.to(x.dtype)))
        hidden = torch.cat(rows).to(ctx.hidden.dtype)
        return Selection(torch.cat(orders), hidden)

    def _one_image(self, layer: torch.nn.Module, x: torch.Tensor, k: int, official: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's tokens in sequence order and their merged CLIP features [kept (+ 1 extra), C]."""
        dtype = x.dtype if official else torch.float32  # official: the tower's own precision
        scores, keys = cls_attention_one_head(layer, x, dtype)
        n = len(scores)
        ranked = scores.topk(n).indices
        if self.options.adaptive:
            # the official count is the data's (numpy percentiles): one read per image, as kept counts go to the host
            outliers = max(1, iqr_outliers(scores))
            kept = plus_tokens(ranked, n, outliers, max(1, official_stride(outliers, n)))
        else:
            kept = budgeted_tokens(ranked, n, k - 1)
        pruned = torch.ones(n, dtype=torch.bool, device=scores.device).index_fill_(0, kept, False)
        pruned = positions_of(pruned[None], n - len(kept))[0]  # the kept patches are distinct
        patches = x[1:].to(dtype)
        unit = F.normalize(keys[1:], dim=-1)
        similarity = unit[kept] @ unit.T
        similarity[torch.arange(len(kept), device=kept.device), kept] = float("-inf")  # the OTHER patches
        near = similarity.topk(min(NEIGHBOURS, n - 1), dim=1).indices
        weights = torch.zeros_like(similarity).scatter_(1, near, scores[near])
        merged = patches[kept] + weights @ patches
        if len(pruned) == 0:  # nothing left to gather into the extra token
            return kept, merged
        extra = scores[pruned] @ patches[pruned]
        slot = pruned[scores[pruned].argmax()]
        return torch.cat([kept, slot[None]]), torch.cat([merged, extra[None]])
