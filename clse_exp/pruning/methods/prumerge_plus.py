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

Every image of the batch is scored, laid out and merged at once (the images stacked, padded per sample to the
most images a sample has; a sample's tokens are its images' in prompt order). Nothing is read back, except the
adaptive counts: every image's in ONE transfer per stage, since they set how many tokens each sample keeps.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import (
    BatchSelection,
    Layers,
    MethodOptions,
    ModelFacts,
    PruningMethod,
    Rules,
    Selection,
)
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.methods.visionzip import require_clip_encoder, split_budget
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import gather_rows, positions_of

NEIGHBOURS = 32  # tokens each kept token absorbs (PM:268)


def cls_attention_one_head(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]-to-patch attention [..., n] of CLIP `layer` taken as one head over all C channels, scale C^-1/2,
    and its keys [..., 1 + n, C], from the layer's input x [..., 1 + n, C] (PM:182-201)."""
    attn = layer.self_attn
    hidden = layer.layer_norm1(x)
    query = attn.q_proj(hidden[..., 0, :]).to(dtype)  # [CLS] rows, one product whatever the batch
    keys = attn.k_proj(hidden).to(dtype)
    probs = torch.softmax((query[..., None, :] @ keys.transpose(-1, -2)) * x.shape[-1] ** -0.5, dim=-1)
    return probs[..., 0, 1:], keys


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """[I]: how many of each row of scores [I, n] exceed Q3 + 1.5 IQR, with numpy's default (linear)
    percentiles as the official code takes them of a float32 array (PM:34-47), float32 arithmetic included."""
    values = scores.float()
    ordered = values.sort(dim=1).values
    q1, q3 = _percentile(ordered, 0.25), _percentile(ordered, 0.75)
    return (values > (q3 + 1.5 * (q3 - q1))[:, None]).sum(1)


def _percentile(ordered: torch.Tensor, q: float) -> torch.Tensor:
    """numpy.percentile(row, 100 q) of each ascending row: its virtual index, neighbours and interpolation."""
    n = ordered.shape[1]
    virtual = n * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's n q + alpha + q (1 - alpha - beta) - 1, alpha = beta = 1
    below = n - 1 if virtual >= n - 1 else math.floor(virtual)
    above = min(below + 1, n - 1)
    gamma = virtual - below if virtual < n - 1 else 0.0
    low, high = ordered[:, below], ordered[:, above]
    diff = high - low
    return high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma


def official_stride(outliers: int, n: int) -> int:
    """⌊⌊1 / ratio⌋ / 3⌋ with ratio = outliers / n, in floating point as the official code (PM:209-210)."""
    return int(int(1 / (outliers / n)) / 3)


@functools.lru_cache(maxsize=64)
def official_strides(n: int) -> dict[int, list[int]]:
    """Official grid stride -> the outlier counts that give it (every count with a stride of at least 1)."""
    strides: dict[int, list[int]] = {}
    for outliers in range(1, n + 1):
        if official_stride(outliers, n) < 1:
            break
        strides.setdefault(official_stride(outliers, n), []).append(outliers)
    return strides


def device_stride(outliers: torch.Tensor, n: int) -> torch.Tensor:
    """`official_stride` of device outlier counts, in float64 as the official floating point."""
    return ((1 / (outliers.double() / n)).floor() / 3).floor().long()


def grid_length(stride: torch.Tensor, n: int) -> torch.Tensor:
    """Patches of the grid 0, stride, ... < n - 1 for each stride."""
    return (n - 1 + stride - 1) // stride


def budgeted_layout(ranked: torch.Tensor, n: int, kept: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outliers, stride, grid on) [I] of the official structure that holds kept[i] patches of image i (see the
    module docstring), from each image's patches by descending score, ranked [I, n]; all on the device."""
    largest = sum(len(counts) for counts in official_strides(n).values())  # outlier counts with a stride
    if largest == 0:  # no count has a grid: the top `kept`
        return kept, torch.ones_like(kept), torch.zeros_like(kept, dtype=torch.bool)
    device = ranked.device
    counts = torch.arange(1, largest + 1, device=device)
    strides = device_stride(counts, n)
    # the official layout of m outliers: m + its grid, less the grid patches among the top m
    on_grid = (ranked[:, None] % strides[None, :, None] == 0) & (ranked[:, None] < n - 1)  # [I, M, n]
    hits = on_grid.long().cumsum(2).diagonal(dim1=1, dim2=2)  # [I, M]: of the top m, on the grid of m
    official = counts + grid_length(strides, n) - hits
    exact, below = official == kept[:, None], official < kept[:, None]
    has_exact, has_below = exact.any(1), below.any(1)
    first_exact = exact.to(torch.int8).argmax(1)
    last_below = largest - 1 - below.flip(1).to(torch.int8).argmax(1)
    # from the last count below `kept`, with its stride, the layout grows by 0 or 1 patch per further outlier
    stride = torch.where(has_exact, strides[first_exact], strides[last_below])
    hits = ((ranked % stride[:, None] == 0) & (ranked < n - 1)).long().cumsum(1)
    sizes = torch.arange(1, n + 1, device=device) + grid_length(stride, n)[:, None] - hits
    reach = (sizes == kept[:, None]) & (torch.arange(n, device=device) >= last_below[:, None])
    outliers = torch.where(has_exact, first_exact + 1,
                           torch.where(has_below, reach.to(torch.int8).argmax(1) + 1, kept))
    return outliers, stride, has_exact | has_below


def layout_key(ranked: torch.Tensor, n: int, outliers: torch.Tensor, stride: torch.Tensor, grid_on: torch.Tensor
               ) -> torch.Tensor:
    """[I, n] sort keys of the patches: the top outliers[i] by rank, then (where grid_on) the rest of the grid
    0, stride, ... < n - 1 ascending, then the pruned patches (keys >= 2n), the order the official code feeds."""
    patch = torch.arange(n, device=ranked.device)
    rank = torch.empty_like(ranked).scatter_(1, ranked, patch.expand_as(ranked))
    top = rank < outliers[:, None]
    grid = grid_on[:, None] & (patch % stride[:, None] == 0) & (patch < n - 1) & ~top
    return torch.where(top, rank, torch.where(grid, n + patch, 2 * n + patch))


def budgeted_tokens(ranked: torch.Tensor, n: int, kept: int) -> torch.Tensor:
    """One image's `kept` patches in the official outlier + grid structure, from its ranked patches [n]."""
    counts = torch.full((1,), kept, dtype=torch.long, device=ranked.device)
    key = layout_key(ranked[None], n, *budgeted_layout(ranked[None], n, counts))
    return key[0].argsort()[:kept]


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
        """Sample b alone (the batch's rule on a batch of one)."""
        keep = torch.full((1,), k, dtype=torch.long, device=ctx.hidden.device)
        order, rows, counts = self._merge(ctx, [b], [k], keep)
        return Selection(order[0, : counts[0]], rows[0, : counts[0]])

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Every image of the batch at once; a sample without a cut keeps its own tokens and rows."""
        samples, width = list(range(len(budgets))), ctx.visual_slots.shape[1]
        if all(k is not None for k in budgets):
            order, rows, counts = self._merge(ctx, samples, budgets, ctx.keep_counts)
            return BatchSelection(order, counts, width, rows)
        # the samples that keep everything merge nothing (keep -1), then take their own tokens back
        visual = ctx.visual_valid.sum(1)
        whole = ctx.keep_counts == visual
        order, rows, counts = self._merge(ctx, samples, budgets, ctx.keep_counts.masked_fill(whole, -1))
        counts = [n if k is None else c for k, n, c in zip(budgets, ctx.n_current, counts, strict=True)]
        length = max(counts)
        order = F.pad(order, (0, length - order.shape[1]), value=width)
        rows = F.pad(rows, (0, 0, 0, length - rows.shape[1]))
        own = torch.arange(length, device=order.device).expand_as(order)
        order = torch.where(whole[:, None], torch.where(own < visual[:, None], own, width), order)
        rows = torch.where(whole[:, None, None], ctx.visual_hidden()[:, :length].to(rows.dtype), rows)
        return BatchSelection(order, counts, width, rows)

    def _merge(self, ctx: StageContext, samples: list[int], budgets: list[int | None], keep: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The kept tokens [S, K] of `samples` (positions into each one's visual tokens, then the filler width),
        their merged rows [S, K, C'] and how many each keeps (host); sample s keeps keep[s] tokens split over its
        images (host: budgets[s]; keep -1 and budget None: it merges nothing)."""
        inputs = [ctx.vision_inputs(b, -1) for b in samples]
        n = inputs[0][0].shape[0] - 1
        for b, images in zip(samples, inputs, strict=True):
            if any(image.shape[0] != n + 1 for image in images) or len(images) * n != ctx.n_current[b]:
                raise RuntimeError(f"sample {b}: its images hold {[image.shape[0] - 1 for image in images]} patch "
                                   f"tokens but it has {ctx.n_current[b]} visual tokens (only images of one size "
                                   "can be merged here)")
        per_sample = [len(images) for images in inputs]
        slots = max(per_sample)  # image slots per sample; a sample with fewer repeats its first image, unused
        x = torch.stack([image for images in inputs for image in images + images[:1] * (slots - len(images))])
        official = ctx.protocol == "official"
        dtype = x.dtype if official else torch.float32  # official: the tower's own precision
        scores, keys = cls_attention_one_head(ctx.vision_layers[-1], x, dtype)  # [I, n], [I, 1 + n, C]
        ranked = scores.topk(n, dim=1).indices
        slot = torch.arange(slots, device=x.device)
        # images per sample: a host int when every sample has as many, else the device's count of its tokens
        images = per_sample[0] if len(set(per_sample)) == 1 else (ctx.visual_valid.sum(1) // n)[:, None]
        if self.options.adaptive:
            # the official count is the data's: every image's total read back at once, as kept counts go to the host
            outliers = iqr_outliers(scores).clamp(min=1)
            stride = device_stride(outliers, n).clamp(min=1)
            key = layout_key(ranked, n, outliers, stride, torch.ones_like(outliers, dtype=torch.bool))
            on = ((keep[:, None] >= 0) & (slot < images)).flatten()
            patches = torch.where(on, (key < 2 * n).sum(1), 0)
            totals = patches.tolist()
            kept = [[] if k is None else totals[s * slots : s * slots + m]
                    for s, (k, m) in enumerate(zip(budgets, per_sample, strict=True))]
            counts = [sum(t + (t < n) for t in image_totals) for image_totals in kept]  # with the extra token
            shares = [t for image_totals in kept for t in image_totals]
        else:
            share = keep  # split_budget on the device, over each sample's images
            if slots > 1:
                share = keep[:, None] // images + (slot < keep[:, None] % images).long()
                share = torch.where(slot < images, share, 0).flatten()
            on = share > 0
            patches = (share - 1).clamp(min=0)
            key = layout_key(ranked, n, *budgeted_layout(ranked, n, patches))
            counts = [k or 0 for k in budgets]
            shares = [part - 1 for k, m in zip(budgets, per_sample, strict=True) if k for part in split_budget(k, m)
                      if part]
        longest, fewest = max(shares, default=0), min(shares, default=0)  # patches kept by the images that keep any
        extra = on & (patches < n)  # the pruned patches' token, where any is pruned
        order, rows = merge_images(scores, keys, x[:, 1:].to(dtype), key.argsort(dim=1)[:, :longest], patches,
                                   n - fewest)
        rows = ctx.projector(rows.to(x.dtype)).to(ctx.hidden.dtype)
        order, rows = place(order, rows, patches, extra, n, slots, max(counts), ctx.visual_slots.shape[1])
        return order, rows, counts


def merge_images(scores: torch.Tensor, keys: torch.Tensor, patches: torch.Tensor, kept: torch.Tensor,
                 patch_counts: torch.Tensor, pruned_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, its kept patches (the first patch_counts[i] of kept [I, T]) each plus the score-weighted sum of
    the NEIGHBOURS other patches with the most similar keys, then the score-weighted sum of the pruned patches
    (PM:229-280), taken over them in ascending order, pruned_width (the most any image prunes) wide: the patch
    index of each row [I, T + 1] (the last: the pruned patch with the largest score) and the rows [I, T + 1, C].
    Rows past an image's count are junk."""
    images, n = scores.shape
    length = kept.shape[1]
    unit = F.normalize(keys[:, 1:], dim=-1)
    similarity = gather_rows(unit, kept) @ unit.transpose(1, 2)  # [I, T, n]
    similarity.scatter_(2, kept[..., None], float("-inf"))  # the OTHER patches
    near = similarity.topk(min(NEIGHBOURS, n - 1), dim=2).indices
    weights = torch.zeros_like(similarity).scatter_(2, near, scores.gather(1, near.flatten(1)).view_as(near))
    merged = gather_rows(patches, kept) + weights @ patches
    real = torch.arange(length, device=kept.device) < patch_counts[:, None]
    pruned = torch.ones(images, n + 1, dtype=torch.bool, device=kept.device)
    pruned = pruned.scatter_(1, torch.where(real, kept, n), False)[:, :n]
    at = positions_of(pruned, pruned_width)  # where images prune as many, as the product over them alone
    pruned_weights = scores.gather(1, at).masked_fill(~pruned.gather(1, at), 0)
    extra = pruned_weights[:, None] @ gather_rows(patches, at)  # [I, 1, C]
    slot = scores.masked_fill(~pruned, float("-inf")).argmax(1)
    return torch.cat([kept, slot[:, None]], 1), torch.cat([merged, extra], 1)


def place(order: torch.Tensor, rows: torch.Tensor, patch_counts: torch.Tensor, extra: torch.Tensor, n: int,
          slots: int, length: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's tokens [S, length] (positions into its visual tokens, image by image; filler `width`) and
    rows [S, length, C], from per image (`slots` per sample) patch indices and rows [I, T + 1] (the last:
    the extra token, present where `extra`) of which the first patch_counts[i] patches are kept. Rows past a
    sample's count are junk."""
    images, columns = order.shape
    tokens = patch_counts + extra.long()
    column = torch.arange(columns, device=order.device)
    if slots == 1:  # one image per sample: its kept patches, then the extra token moved up to follow them
        source = torch.where(column < patch_counts[:, None], column, columns - 1)
        placed = torch.where(column < tokens[:, None], order.gather(1, source), width)
        return placed[:, :length], gather_rows(rows, source)[:, :length]
    tokens = tokens.view(-1, slots)
    start = (tokens.cumsum(1) - tokens).flatten()  # each image's first place in its sample
    local = torch.where(column < columns - 1, column, patch_counts[:, None])  # the extra token follows the kept
    real = torch.where(column < columns - 1, column < patch_counts[:, None], extra[:, None])
    sample = torch.arange(images, device=order.device) // slots
    target = torch.where(real, sample[:, None] * (length + 1) + start[:, None] + local, sample[:, None] * (length + 1)
                         + length).flatten()  # the spare last place of a sample takes what is not kept
    offset = (torch.arange(images, device=order.device) % slots * n)[:, None]
    placed = order.new_full((len(tokens) * (length + 1),), width).scatter_(0, target, (order + offset).flatten())
    merged = rows.new_zeros(len(tokens) * (length + 1), rows.shape[-1]).index_copy_(0, target, rows.flatten(0, 1))
    return placed.view(-1, length + 1)[:, :length], merged.view(-1, length + 1, rows.shape[-1])[:, :length]
