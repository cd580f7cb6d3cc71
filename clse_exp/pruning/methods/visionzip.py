"""VisionZip (Yang et al., CVPR 2025): dominant tokens by CLIP [CLS] attention, the rest merged into a few
contextual tokens, before the projector.

Official code (dvlab-research/VisionZip@3151f6d, cited VZ:<file>:<lines>), LLaVA-1.5:
- Score: the attention of CLIP layer -2 (the layer whose OUTPUT is LLaVA's feature), [CLS] row, patch
  columns, softmax over all keys in the tower's dtype, SUMMED over heads (VZ:visionzip/utils.py:22,61,191;
  clip_encoder.py:43-52).
- Dominant: `dominant` counts the [CLS] token: the top (dominant - 1) patches plus [CLS], in original order,
  [CLS] first (main.py:7; clip_encoder.py:53-57).
- Contextual: the R remaining patches (ascending); targets are every (R // contextual)-th of them (positions
  in that list, the first `contextual`); every other remaining patch joins the target whose key is most
  similar (cosine of the head-MEAN keys of the same layer) and the contextual token is target + MEAN of its
  members, in the features of layer -2's output (clip_encoder.py:60-80; utils.py:23-24,89).
- Output: [CLS, dominant patches, contextual tokens in target order] through the projector, fed as a
  shorter sequence (contiguous positions; clip_encoder.py:83; llava_arch.py:31-35,229-241). Multi-image
  LLaVA-1.5 prompts apply the same (dominant, contextual) to every image (llava_arch.py:91-104).

Official code for Qwen2.5-VL (Qwen2_5_VL/qwen2_5vl_visionzip.py at upstream commit 68993a3, read in the fork
jsilvcast/VisionZip that carries the upstream history; cited VZQ:<lines>):
- Score: the attention of the LAST vision block, recomputed eagerly (float32 softmax within the block's
  attention chunks, cast to the tower's dtype), averaged over heads and SUMMED over queries (the attention
  each row receives), averaged over the merge_size^2 rows of each merged token, un-permuted from window order
  (VZQ:263-306 eager, 594-598, 601-613; its FlashAttention-2 path, VZQ:176-231, takes the softmax over all rows
  of the call, which is the same for one image). Keys: that block's post-RoPE keys, averaged the same way,
  then over heads.
- Counts: dominant = int(0.65 N) and contextual = max(int(0.05 N), 1) of the N merged tokens, edited by hand
  per budget (its README: 0.45 + 0.05 for 50%); we read keep = dominant + contextual share, contextual 0.05 N
  (VZQ:1916-1917).
- Dominant: top-k of that score. Contextual: targets and assignment as for LLaVA over the non-dominant tokens,
  merged in the LLM input embeddings (post-merger); each contextual token sits in its target's slot and every
  kept token keeps its original M-RoPE position, prefill and decode (VZQ:1918-1968). Batch 1, one image.
We run it per sample over all its images (and video frames, which the official code does not handle), jointly
as the official tensors would; Qwen2-VL (no windows) takes the same rule.

Batching: one selection for the whole batch, with no kernel per sample. LLaVA: every image of the batch is a row
of one stack (a sample with fewer images gets zero rows that keep nothing), with its own share of its sample's
budget. Qwen-VL: every image and video of the batch is recomputed in one packed pass (attention blocks of
similar length padded together), then the samples are rows with masks. Host-known counts reach the device as
views of one arange (`device_ints`), not as an upload.

Budget (LLaVA): a sample keeps k = round(keep * N) tokens, split evenly over its images; per image of k tokens,
contextual = round(k * contextual_share) and dominant = k - contextual. The default share 5/32 reproduces
every published split (SPLITS). Our LLM sequence has no [CLS] slot (transformers' LLaVA drops it), so under
`official` the projected [CLS] is carried in one kept slot: the slot of the merged-away patch the [CLS]
attends to most (that patch still lives in its contextual token); the trace lists that slot's index.
`uniform` keeps original positions and exactly k patch slots: no [CLS] (`dominant` patches instead of
dominant - 1), contextual tokens at their target's position, float32. The features are the captured input
of the last CLIP layer, i.e. LLaVA-1.5's vision_feature_layer = -2.

Budget (Qwen): `official` keeps int((keep - 0.05) N) + max(int(0.05 N), 1) tokens, as the code's two
fractions; `uniform` keeps k = round(keep * N) with the same contextual count (at most k). A set
`contextual_share` splits the k kept tokens as on LLaVA instead, under either protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging

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
)
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import gather_rows, positions_of

# (dominant incl. [CLS], contextual) per LLaVA-1.5 budget: 54 + 10 is in the code (VZ:README.md:127-128); 162 + 30
# and 108 + 20 are the paper's (its Tables 8-9, quoted in docs/baselines.md section 4(c); not in the repository).
SPLITS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
CONTEXTUAL_SHARE = 5 / 32  # 30 / 192 = 20 / 128 = 10 / 64
QWEN_CONTEXTUAL = 0.05  # contextual tokens per visual token on Qwen2.5-VL (VZQ:1917)
CLIP_FAMILIES = ("llava",)  # families whose CLIP encoder (with its [CLS] token) the engine exposes
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # packed towers whose last block VisionZip reads
QUERY_CHUNK = 1024  # query rows per softmax block when recomputing a vision block's attention
ATTENTION_ELEMENTS = 2**26  # attention probabilities held at once when recomputing it for many blocks
log = logging.getLogger(__name__)


def require_clip_encoder(method: str, facts: ModelFacts, layers: Layers, families: tuple[str, ...] = CLIP_FAMILIES,
                         reads: str = "the CLIP encoder's [CLS] attention") -> None:
    """The vision-attention methods run at the LLM input and need an encoder they know how to read."""
    if facts.family not in families:
        raise ConfigError(f"prune={method} reads {reads}; model family {facts.family!r} is not supported "
                          f"(supported: {', '.join(families)})")
    if tuple(layers.prune_layers) != (0,):
        raise ConfigError(f"prune={method} merges before the projector, so it runs at the LLM input: "
                          f"layers.prune_layers={list(layers.prune_layers)} must be [0]")


def per_image(ctx: StageContext, b: int, layer: int) -> list[tuple[int, torch.Tensor]]:
    """(offset into the sample's current visual tokens, encoder input [1 + n, C]) per image, in prompt order:
    each image contributes its n patch tokens ([CLS] dropped)."""
    images = ctx.vision_inputs(b, layer)
    offsets = [0]
    for image in images:
        offsets.append(offsets[-1] + image.shape[0] - 1)
    if offsets[-1] != len(ctx.visual_positions(b)):
        raise RuntimeError(f"sample {b}: its images hold {offsets[-1]} patch tokens but it has "
                           f"{len(ctx.visual_positions(b))} visual tokens (only image tokens can be merged here)")
    return list(zip(offsets[:-1], images, strict=True))


def split_budget(k: int, images: int) -> list[int]:
    """k tokens over a sample's equal-size images, as evenly as possible, the earlier images taking the
    remainder (the official code gives every image the same count; k = round(keep * N) may not divide)."""
    return [k // images + (1 if i < k % images else 0) for i in range(images)]


def split_counts(k: int, share: float) -> tuple[int, int]:
    """(dominant incl. the [CLS] slot, contextual) for k tokens: contextual = round-half-up(k * share), at
    least 1 (the official code divides by it), the rest dominant."""
    contextual = min(k, max(1, int(k * share + 0.5)))
    return k - contextual, contextual


def device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """[len(values)] int64: host-known integers on `device` without an upload (a blocking sync on a GPU): 0-d
    views of one arange, stacked, i.e. two kernels however many values there are."""
    low = min(values, default=0)
    table = torch.arange(low, max(values, default=0) + 1, device=device)
    return torch.stack([table[v - low] for v in values]) if values else table[:0]


def cls_attention_per_head(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP `layer`'s attention from [CLS] to each patch per head [..., heads, n] (softmax over all 1 + n keys in
    `dtype`) and its keys [..., 1 + n, heads, head_dim], recomputed from the layer's input x [..., 1 + n, C]
    (any number of images at once) as transformers 4.37.2's eager CLIPAttention computes them (query scaled
    before the product)."""
    attn = layer.self_attn
    hidden = layer.layer_norm1(x)
    heads = attn.num_heads
    query = (attn.q_proj(hidden[..., :1, :]) * attn.scale).unflatten(-1, (heads, -1))[..., 0, :, :].to(dtype)
    keys = attn.k_proj(hidden).unflatten(-1, (heads, -1)).to(dtype)
    return torch.softmax(torch.einsum("...hd,...thd->...ht", query, keys), dim=-1)[..., 1:], keys


@dataclasses.dataclass
class ImageGrid:
    """Every sample's CLIP images at once: row b * per_sample + j of each stacked input is image j of sample b
    (zeros where sample b has fewer images); `budgets` gives each row's kept tokens (0: none, or not cut)."""

    inputs: list[torch.Tensor]  # per requested encoder layer, [B * per_sample, 1 + patches, C]
    per_sample: int
    patches: int
    budgets: list[int]


def image_grid(ctx: StageContext, budgets: list[int | None], layers: tuple[int, ...]) -> ImageGrid:
    """The batch's images as one stack per encoder layer in `layers`, and each image's share of its sample's
    budget (split_budget); CLIP encodes every image at one size, so they stack without padding rows."""
    images = [[x for _, x in per_image(ctx, b, layers[0])] for b in range(len(budgets))]
    others = [[ctx.vision_inputs(b, layer) for b in range(len(budgets))] for layer in layers[1:]]
    per_sample = max(map(len, images), default=0)
    first = next(x for sample in images for x in sample)
    pad = first.new_zeros(first.shape) if any(len(sample) < per_sample for sample in images) else None
    stacks = [torch.stack([sample[j] if j < len(sample) else pad for sample in per_layer for j in range(per_sample)])
              for per_layer in (images, *others)]
    shares = [[0] * per_sample if k is None else split_budget(k, len(sample)) + [0] * (per_sample - len(sample))
              for k, sample in zip(budgets, images, strict=True)]
    return ImageGrid(stacks, per_sample, first.shape[0] - 1, [k for share in shares for k in share])


def keep_all(order: torch.Tensor, hidden: torch.Tensor | None, ctx: StageContext, budgets: list[int | None]
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """order [B, K] (and hidden rows [B, K, C]) with every sample whose budget is None keeping all its current
    visual tokens, their own states, in order (K covers them: it is the largest kept count)."""
    if all(k is not None for k in budgets):
        return order, hidden
    width = ctx.visual_slots.shape[1]
    whole = device_ints([int(k is None) for k in budgets], order.device).bool()[:, None]
    own = torch.arange(order.shape[1], device=order.device).expand_as(order)
    order = torch.where(whole, torch.where(own < ctx.visual_valid.sum(1, keepdim=True), own, width), order)
    if hidden is not None:
        rows = gather_rows(ctx.visual_hidden(), own.clamp(max=max(width - 1, 0))).to(hidden.dtype)
        hidden = torch.where(whole[..., None], rows, hidden)
    return order, hidden


def compact(entries: torch.Tensor, real: torch.Tensor, keep: int, width: int, full: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, the `real` [G, E] entries of `entries` first, in their order, as `keep` columns with the filler
    `width` past them, and the columns of `entries` they came from (None: every entry is real, `full`, and
    they stay as they are)."""
    if full:
        return entries, None
    where = positions_of(real, min(keep, real.shape[1]))
    order = torch.where(real.gather(1, where), entries.gather(1, where), width)
    if keep > where.shape[1]:  # a sample kept whole holds more tokens than any selection
        order = F.pad(order, (0, keep - where.shape[1]), value=width)
        where = F.pad(where, (0, keep - where.shape[1]))
    return order, where


@dataclasses.dataclass
class Contextual:
    """Batched contextual tokens: per row, targets and members (positions, with validity masks), each
    member's target (index into the targets) and the merged rows [G, T, C]."""

    targets: torch.Tensor
    target_ok: torch.Tensor
    target_counts: list[int]  # per row, known on the host
    members: torch.Tensor
    member_ok: torch.Tensor
    assign: torch.Tensor
    merged: torch.Tensor


def merge_contextual(dominant: torch.Tensor, valid: torch.Tensor | None, metric: torch.Tensor, features: torch.Tensor,
                     counts: list[tuple[int, int]]) -> Contextual:
    """VisionZip's contextual tokens (VZ:clip_encoder.py:60-80, VZQ:1922-1960) for G rows at once: of the
    tokens (`valid` [G, n]; None: all) left after `dominant` [G, n] (ascending), every (R // contextual)-th is a
    target; every other one joins the target with the most similar key (cosine of `metric` [G, n, D]; first on
    ties), and a contextual token is its target + the MEAN of its members (`features` [G, n, C], in their
    dtype). counts: per row (R remaining tokens, contextual), known on the host."""
    device = metric.device
    steps = [max(1, r // max(c, 1)) for r, c in counts]
    targets_n = [len(range(0, r, step)[:c]) for (r, c), step in zip(counts, steps, strict=True)]
    members_n = [r - t for (r, _), t in zip(counts, targets_n, strict=True)]
    width, t_width, m_width = (max(1, max(x, default=0)) for x in ([r for r, _ in counts], targets_n, members_n))
    remaining_n, step, t_count, m_count = device_ints([r for r, _ in counts] + steps + targets_n + members_n,
                                                     device).view(4, -1, 1)
    remaining = positions_of(~dominant if valid is None else ~dominant & valid, width)
    column = torch.arange(max(width, t_width, m_width), device=device)
    target_ok = column[None, :t_width] < t_count
    at = torch.where(target_ok, column[:t_width] * step, 0)  # positions in the remaining list
    is_target = torch.zeros(len(counts), width + 1, dtype=torch.bool, device=device)
    is_target.scatter_(1, torch.where(target_ok, at, width), True)
    member_at = positions_of((column[None, :width] < remaining_n) & ~is_target[:, :width], m_width)
    targets, members = remaining.gather(1, at), remaining.gather(1, member_at)
    member_ok = column[None, :m_width] < m_count
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = gather_rows(unit, members) @ gather_rows(unit, targets).transpose(1, 2)
    assign = similarity.masked_fill(~target_ok[:, None], float("-inf")).argmax(dim=2)
    row = torch.arange(len(counts), device=device)[:, None] * (t_width + 1)
    slot = (row + torch.where(member_ok, assign, t_width)).flatten()
    means = per_token(gather_rows(features, members).flatten(0, 1), slot, len(counts) * (t_width + 1))
    merged = gather_rows(features, targets) + means.unflatten(0, (len(counts), -1))[:, :t_width]
    return Contextual(targets, target_ok, targets_n, members, member_ok, assign, merged)


def received_attention(queries: torch.Tensor, keys: torch.Tensor, blocks: list[int], dtype: torch.dtype
                       ) -> torch.Tensor:
    """[rows] float32: the attention each row receives ([heads, rows, D] queries and keys, softmax within each
    of the consecutive `blocks`, probabilities cast to `dtype` as the official eager code does), summed over
    queries, head-averaged. Blocks of similar length (the same power of two) go together, padded and masked
    (a run of equal blocks: no padding); query rows go in chunks of QUERY_CHUNK per block and the work in slices
    of ATTENTION_ELEMENTS, so no [heads, rows, rows] tensor is ever held. Sums run head by head, then chunk by
    chunk, as for one block alone."""
    heads, rows, dim = keys.shape
    received = torch.zeros(rows + 1, dtype=torch.float32, device=keys.device)
    starts = [0, *itertools.accumulate(blocks)]
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(blocks):
        groups.setdefault((length - 1).bit_length(), []).append(i)
    for group in groups.values():
        width = max(blocks[i] for i in group)
        chunk = min(width, QUERY_CHUNK)
        while chunk > 1 and heads * chunk * width > ATTENTION_ELEMENTS:  # one huge block: fewer query rows
            chunk //= 2
        per_slice = max(1, ATTENTION_ELEMENTS // (heads * chunk * width))
        for first in range(0, len(group), per_slice):
            part = group[first : first + per_slice]
            lead = starts[part[0]]
            if all(starts[i] == lead + j * width and blocks[i] == width for j, i in enumerate(part)):
                index, pad = slice(lead, lead + len(part) * width), None  # one run of equal blocks: views
                q, k = (x[:, index].unflatten(1, (len(part), width)) for x in (queries, keys))
            else:
                start, length = device_ints([starts[i] for i in part] + [blocks[i] for i in part],
                                            keys.device).view(2, -1, 1)
                column = torch.arange(width, device=keys.device)
                pad = column >= length  # [blocks, width]
                index = torch.where(pad, rows, start + column)
                q, k = (x[:, index.clamp(max=rows - 1)] for x in (queries, keys))  # [heads, blocks, width, D]
            k = k.to(dtype)
            sums = []
            for q_first in range(0, width, chunk):
                logits = (q[:, :, q_first : q_first + chunk].to(dtype) @ k.transpose(-1, -2)) / dim**0.5
                if pad is not None:
                    logits = logits.masked_fill(pad[:, None], float("-inf"))
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype).float()
                if pad is not None:
                    probs = probs.masked_fill(pad[:, q_first : q_first + chunk, None], 0)
                sums.append(probs.sum(dim=2))
            # summed head by head, then chunk by chunk: the order of one block alone
            total = (sums[0] if len(sums) == 1 else torch.stack(sums, dim=1).flatten(0, 1)).sum(dim=0)
            if pad is None:
                received[index].add_(total.flatten())
            else:
                received.index_add_(0, index.flatten(), total.flatten())
    return received[:rows] / heads


def per_token(values: torch.Tensor, token: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean of `values` [rows, ...] over the rows of each token (rows in any order), [tokens, ...]; a token
    with no rows gets zeros."""
    sums = torch.zeros((tokens, *values.shape[1:]), dtype=values.dtype, device=values.device)
    sums.index_add_(0, token, values)
    rows = torch.zeros(tokens, dtype=torch.long, device=token.device).index_add_(0, token, torch.ones_like(token))
    return sums / rows.clamp(min=1).view(-1, *[1] * (values.dim() - 1))  # a bincount, without its sync


def token_counts(ctx: StageContext, b: int, inputs: list) -> list[int]:
    """Visual tokens of each of sample b's encoded segments: their grids' sizes (known on the host) when the
    grids match the segments and the sample's count; otherwise read from the rows' token map."""
    grids = ctx.grids(b)
    sizes = [t * h * w for t, h, w in grids]
    if len(grids) == len(inputs) and sum(sizes) == ctx.n_current[b]:
        return sizes
    return [int(rows.token.max()) + 1 for rows in inputs]


@functools.cache
def announce_joint_selection() -> None:
    """Say once per process that a Qwen sample beyond the official code's one image is selected jointly."""
    log.warning("prune=visionzip on Qwen: a sample with several images or a video is selected jointly over all "
                "its visual tokens; the official code (68993a3) handles one image per prompt")


class VisionZip(PruningMethod):
    name = "visionzip"

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "visionzip"
        # contextual tokens / kept tokens; null: the official rule (LLaVA 5/32 of k; Qwen max(1, int(0.05 N)))
        contextual_share: float | None = None

    def validate(self) -> None:
        share = self.options.contextual_share
        if share is not None and not 0.0 < share < 1.0:
            raise ConfigError(f"prune.contextual_share={share} must lie in (0, 1), or be null for the official "
                              f"split (LLaVA-1.5: {CONTEXTUAL_SHARE:.5f} of the kept tokens)")

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        require_clip_encoder(self.name, facts, layers, CLIP_FAMILIES + QWEN_FAMILIES, "a vision encoder's attention")
        if facts.family in QWEN_FAMILIES and official and self.options.contextual_share is None \
                and keep < QWEN_CONTEXTUAL:
            raise ConfigError(f"keep={keep}: prune=visionzip on {facts.family} merges {QWEN_CONTEXTUAL} of the "
                              f"visual tokens into contextual tokens (official: max(1, int({QWEN_CONTEXTUAL} N))), so "
                              f"keep must be at least {QWEN_CONTEXTUAL}; or set prune.contextual_share to split the "
                              "kept tokens")

    def official_counts(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> list[int | None] | None:
        """Qwen: the code's two fractions, each truncated: int((keep - 0.05) N) + max(int(0.05 N), 1)."""
        if facts.family not in QWEN_FAMILIES or self.options.contextual_share is not None:
            return None
        dominant = round(keep - QWEN_CONTEXTUAL, 9)  # 0.7 - 0.05 must read as the code's literal 0.65
        return [int(dominant * n_visual) + max(int(QWEN_CONTEXTUAL * n_visual), 1)]

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """CLIP: layer -2's input (its attention and keys) and layer -1's input (layer -2's output: the
        features). Qwen: the last block's input (the features are the LLM's input embeddings)."""
        return (-1,) if facts.family in QWEN_FAMILIES else (-2, -1)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        if ctx.family in QWEN_FAMILIES:
            return self._select_packed(ctx, budgets)
        return self._select_clip(ctx, budgets)

    def _select_clip(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """LLaVA: every image of the batch at once, each with its own split of its sample's budget."""
        official = ctx.protocol == "official"
        grid = image_grid(ctx, budgets, (-2, -1))
        x, features = grid.inputs
        n, device = grid.patches, ctx.hidden.device  # device_map: the tower may sit elsewhere
        dtype = x.dtype if official else torch.float32  # official: the tower's own precision
        probs, keys = cls_attention_per_head(ctx.vision_layers[-2], x, dtype)
        score = probs.sum(dim=1).to(device)  # VZ:visionzip/utils.py:19-61,89
        metric = keys.mean(dim=2)[:, 1:].to(device)
        features = features.to(device)
        share = CONTEXTUAL_SHARE if self.options.contextual_share is None else self.options.contextual_share
        splits = [split_counts(k, share) if k else (0, 0) for k in grid.budgets]
        leads = [int(official and dominant > 0) for dominant, _ in splits]  # 1: a [CLS] row leads the image
        dominant_n = [dominant - lead for (dominant, _), lead in zip(splits, leads, strict=True)]
        top = max(dominant_n, default=0)
        lead_n, dominant_count, offset = device_ints(leads + dominant_n + [(i % grid.per_sample) * n for i in
                                                                           range(len(leads))], device).view(3, -1, 1)
        ranked = score.topk(top, dim=1).indices
        dominant_ok = torch.arange(top, device=device) < dominant_count
        dominant = torch.where(dominant_ok, ranked, n).sort(dim=1).values  # ascending, then the filler n
        chosen = torch.zeros(len(leads), n + 1, dtype=torch.bool, device=device).scatter_(1, dominant, True)[:, :n]
        counts = [(n - d if k else 0, c) for k, d, (_, c) in zip(grid.budgets, dominant_n, splits, strict=True)]
        zipped = merge_contextual(chosen, None, metric, features[:, 1:].to(dtype), counts)
        rows = zipped.merged
        entries, real = [dominant, zipped.targets], [dominant_ok, zipped.target_ok]
        if official:  # the [CLS] row leads, in the slot of the merged-away patch it attends to most
            member_score = score.gather(1, zipped.members).masked_fill(~zipped.member_ok, float("-inf"))
            slot = zipped.members.gather(1, member_score.argmax(dim=1, keepdim=True))
            rows = torch.cat([features[:, :1].to(dtype), rows], dim=1)
            entries, real = [slot, *entries], [lead_n > 0, *real]
        current = ctx.visual_hidden()
        projected = ctx.projector(rows.to(x.device, x.dtype)).to(device, current.dtype)
        at = (offset + dominant).view(len(budgets), grid.per_sample * top).clamp(max=current.shape[1] - 1)
        own = gather_rows(current, at).view(len(leads), top, current.shape[-1])
        lead = int(official)
        blocks = torch.cat([projected[:, :lead], own, projected[:, lead:]], dim=1)
        entries = (offset + torch.cat(entries, dim=1)).view(len(budgets), -1)
        counts_kept = [n_b if k is None else k for k, n_b in zip(budgets, ctx.n_current, strict=True)]
        width = ctx.visual_slots.shape[1]
        full = all(k is not None for k in budgets) and all(
            k and h == lead and d == top and t == zipped.merged.shape[1]
            for k, h, d, t in zip(grid.budgets, leads, dominant_n, zipped.target_counts, strict=True))
        order, where = compact(entries, torch.cat(real, dim=1).view(len(budgets), -1), max(counts_kept), width, full)
        hidden = blocks.view(len(budgets), -1, blocks.shape[-1])
        order, hidden = keep_all(order, hidden if where is None else gather_rows(hidden, where), ctx, budgets)
        return BatchSelection(order, counts_kept, width, hidden, [0] * len(budgets))

    def _packed_signals(self, ctx: StageContext, budgets: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen-VL: the last vision block's received attention and head-mean keys per visual token, [B, N] and
        [B, N, D] float32 in `visual_slots` order, for every image and video of the cut samples at once."""
        layer = ctx.vision_layers[-1]
        official = ctx.protocol == "official"
        width = ctx.visual_slots.shape[1]
        segments, bases = [], []
        for b, k in enumerate(budgets):
            if k is None:
                continue
            inputs = ctx.vision_inputs(b, -1)
            counts = token_counts(ctx, b, inputs)
            if sum(counts) != ctx.n_current[b]:
                raise RuntimeError(f"sample {b}: its vision encoder gave {sum(counts)} tokens but it has "
                                   f"{ctx.n_current[b]} visual tokens")
            grids = ctx.grids(b)
            if official and (len(grids) > 1 or grids[0][0] > 1):
                announce_joint_selection()
            segments += inputs
            bases += [b * width + sum(counts[:i]) for i in range(len(counts))]
        rows = dataclasses.replace(segments[0], hidden=torch.cat([s.hidden for s in segments]),
                                   cos=torch.cat([s.cos for s in segments]), sin=torch.cat([s.sin for s in segments]),
                                   blocks=[n for s in segments for n in s.blocks],
                                   token=torch.cat([s.token for s in segments]))
        dtype = rows.hidden.dtype if official else torch.float32
        queries, keys = ctx.encoder_queries_keys(layer, rows)
        sizes = [len(s.hidden) for s in segments]
        base, size = device_ints(bases + sizes, rows.token.device).view(2, -1)
        token = rows.token + base.repeat_interleave(size, output_size=len(rows.hidden))
        tokens = len(budgets) * width
        received = received_attention(queries, keys, rows.blocks, dtype)
        per_row = torch.cat([received[:, None], keys.to(dtype).float().transpose(0, 1).flatten(1)], dim=1)
        means = per_token(per_row, token, tokens).view(len(budgets), width, -1)  # one pass for both
        device = ctx.hidden.device  # device_map: the tower may sit elsewhere
        return means[..., 0].to(device), means[..., 1:].unflatten(-1, (keys.shape[0], -1)).mean(dim=2).to(device)

    def _select_packed(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Qwen-VL: every image (and video) of a sample scored by the last vision block, selected jointly; all
        samples at once."""
        official = ctx.protocol == "official"
        score, metric = self._packed_signals(ctx, budgets)
        splits = []
        for k, n in zip(budgets, ctx.n_current, strict=True):
            if k is None:
                contextual = 0
            elif self.options.contextual_share is None:
                contextual = min(k, max(int(QWEN_CONTEXTUAL * n), 1))
            else:
                contextual = split_counts(k, self.options.contextual_share)[1]
            splits.append((0 if k is None else k - contextual, contextual))
        top = max(d for d, _ in splits)
        device = score.device
        valid = ctx.visual_valid
        ranked = score.masked_fill(~valid, float("-inf")).topk(top, dim=1).indices
        dominant_ok = torch.arange(top, device=device) < device_ints([d for d, _ in splits], device)[:, None]
        width = score.shape[1]
        dominant = torch.where(dominant_ok, ranked, width)
        chosen = torch.zeros(len(budgets), width + 1, dtype=torch.bool, device=device)
        chosen = chosen.scatter_(1, dominant, True)[:, :width]
        current = ctx.visual_hidden()
        features = current if official else current.float()
        counts = [(n - d if k is not None else 0, c)
                  for k, n, (d, c) in zip(budgets, ctx.n_current, splits, strict=True)]
        zipped = merge_contextual(chosen, valid, metric, features, counts)
        rows = torch.cat([gather_rows(features, ranked), zipped.merged], dim=1)
        kept = [n if k is None else d + c for k, n, (d, c) in zip(budgets, ctx.n_current, splits, strict=True)]
        full = all(k is not None and d == top and t == zipped.merged.shape[1]
                   for k, (d, _), t in zip(budgets, splits, zipped.target_counts, strict=True))
        order, where = compact(torch.cat([dominant, zipped.targets], dim=1),
                               torch.cat([dominant_ok, zipped.target_ok], dim=1), max(kept), width, full)
        rows = rows if where is None else gather_rows(rows, where)
        order, hidden = keep_all(order, rows.to(current.dtype), ctx, budgets)
        return BatchSelection(order, kept, width, hidden, [0] * len(budgets))
