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
import logging

import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import Layers, MethodOptions, ModelFacts, PruningMethod, Rules, Selection
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import positions_of

# (dominant incl. [CLS], contextual) per LLaVA-1.5 budget: 54 + 10 is in the code (VZ:README.md:127-128); 162 + 30
# and 108 + 20 are the paper's (its Tables 8-9, quoted in docs/baselines.md section 4(c); not in the repository).
SPLITS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
CONTEXTUAL_SHARE = 5 / 32  # 30 / 192 = 20 / 128 = 10 / 64
QWEN_CONTEXTUAL = 0.05  # contextual tokens per visual token on Qwen2.5-VL (VZQ:1917)
CLIP_FAMILIES = ("llava",)  # families whose CLIP encoder (with its [CLS] token) the engine exposes
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # packed towers whose last block VisionZip reads
QUERY_CHUNK = 1024  # query rows per softmax block when recomputing a vision block's attention
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


def cls_attention_per_head(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP `layer`'s attention from [CLS] to each patch per head [heads, n] (softmax over all 1 + n keys in
    `dtype`) and its keys [1 + n, heads, head_dim], recomputed from the layer's input x [1 + n, C] as
    transformers 4.37.2's eager CLIPAttention computes them (query scaled before the product)."""
    attn = layer.self_attn
    hidden = layer.layer_norm1(x)
    heads = attn.num_heads
    query = (attn.q_proj(hidden[:1]) * attn.scale).view(heads, -1).to(dtype)
    keys = attn.k_proj(hidden).view(hidden.shape[0], heads, -1).to(dtype)
    return torch.softmax(torch.einsum("hd,thd->ht", query, keys), dim=-1)[:, 1:], keys


def cls_attention_and_keys(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The [CLS] attention summed over heads [n] and the keys averaged over heads [1 + n, head_dim]
    (VZ:visionzip/utils.py:19-61,89)."""
    probs, keys = cls_attention_per_head(layer, x, dtype)
    return probs.sum(dim=0), keys.mean(dim=1)


def merge_contextual(dominant: torch.Tensor, metric: torch.Tensor, features: torch.Tensor, contextual: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens (VZ:clip_encoder.py:60-80, VZQ:1922-1960): of the tokens left after
    `dominant` (ascending), every (R // contextual)-th is a target; every other one joins the target with the
    most similar key (cosine; first on ties), and a contextual token is its target + the MEAN of its members.
    Returns (targets, members, merged rows [contextual, C]) in `features`' dtype."""
    n = metric.shape[0]
    left = torch.ones(n, dtype=torch.bool, device=metric.device).index_fill_(0, dominant, False)
    count = n - len(dominant)  # the topk's picks are distinct: every count here is known on the host
    remaining = positions_of(left[None], count)[0]
    step = max(1, count // contextual)
    target = torch.arange(0, count, step, device=metric.device)[:contextual]
    is_target = torch.zeros(count, dtype=torch.bool, device=metric.device).index_fill_(0, target, True)
    member = positions_of(~is_target[None], count - len(target))[0]
    targets, members = remaining[target], remaining[member]
    unit = metric[remaining]
    unit = unit / unit.norm(dim=-1, keepdim=True)
    assign = (unit[member] @ unit[target].T).argmax(dim=1)
    return targets, members, features[targets] + per_token(features[members], assign, len(targets))


def received_attention(queries: torch.Tensor, keys: torch.Tensor, blocks: list[int], dtype: torch.dtype
                       ) -> torch.Tensor:
    """[rows] float32: the attention each row receives ([heads, rows, D] queries and keys, softmax within each
    block, probabilities cast to `dtype` as the official eager code does), summed over queries, head-averaged.
    Query rows go in chunks, so no [heads, rows, rows] tensor is ever held."""
    heads, rows, dim = keys.shape
    received = torch.zeros(rows, dtype=torch.float32, device=keys.device)
    start = 0
    for length in blocks:
        block = slice(start, start + length)
        for head in range(heads):
            k = keys[head, block].to(dtype)
            for first in range(start, start + length, QUERY_CHUNK):
                q = queries[head, first : min(first + QUERY_CHUNK, start + length)].to(dtype)
                probs = torch.softmax((q @ k.T) / dim**0.5, dim=-1, dtype=torch.float32).to(dtype)
                received[block] += probs.float().sum(dim=0)
        start += length
    return received / heads


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

    def select(self, ctx: StageContext, b: int, k: int) -> Selection:
        if ctx.family in QWEN_FAMILIES:
            return self._select_packed(ctx, b, k)
        layer = ctx.vision_layers[-2]
        images = per_image(ctx, b, -2)
        features = [image for _, image in per_image(ctx, b, -1)]
        current = ctx.hidden_states(b)
        orders, rows = [], []
        for (offset, x), feats, count in zip(images, features, split_budget(k, len(images)), strict=True):
            if count == 0:
                continue
            head, dominant, slots, merged = self._one_image(layer, x, feats, count, ctx.protocol == "official")
            projected = ctx.projector(merged.to(x.dtype)).to(current.dtype)
            orders.append(offset + torch.cat([slots[:head], dominant, slots[head:]]))
            rows.append(torch.cat([projected[:head], current[offset + dominant], projected[head:]]))
        return Selection(torch.cat(orders), torch.cat(rows))

    def _one_image(self, layer: torch.nn.Module, x: torch.Tensor, features: torch.Tensor, k: int, official: bool
                   ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One CLIP image's k tokens: (1 if a [CLS] row leads else 0, dominant patches ascending, the slots of
        the [CLS] and contextual tokens, their CLIP features [head + contextual, C])."""
        dtype = x.dtype if official else torch.float32  # official: the tower's own precision
        score, metric = cls_attention_and_keys(layer, x, dtype)
        share = CONTEXTUAL_SHARE if self.options.contextual_share is None else self.options.contextual_share
        dominant_count, contextual = split_counts(k, share)
        head = int(official and dominant_count > 0)
        dominant = score.topk(dominant_count - head).indices.sort().values
        targets, members, merged = merge_contextual(dominant, metric[1:], features[1:].to(dtype), contextual)
        if not head:
            return head, dominant, targets, merged
        slot = members[score[members].argmax()][None]  # the [CLS] row's slot: see the module docstring
        return head, dominant, torch.cat([slot, targets]), torch.cat([features[:1].to(dtype), merged])

    def _select_packed(self, ctx: StageContext, b: int, k: int) -> Selection:
        """Qwen-VL: every image (and video) of the sample scored by the last vision block, selected jointly."""
        layer = ctx.vision_layers[-1]
        current = ctx.hidden_states(b)
        official = ctx.protocol == "official"
        scores, metrics = [], []
        inputs = ctx.vision_inputs(b, -1)
        for rows, tokens in zip(inputs, token_counts(ctx, b, inputs), strict=True):
            dtype = rows.hidden.dtype if official else torch.float32
            queries, keys = ctx.encoder_queries_keys(layer, rows)
            scores.append(per_token(received_attention(queries, keys, rows.blocks, dtype), rows.token, tokens))
            metrics.append(per_token(keys.to(dtype).float().transpose(0, 1), rows.token, tokens).mean(dim=1))
        score, metric = torch.cat(scores).to(current.device), torch.cat(metrics).to(current.device)  # device_map
        grids = ctx.grids(b)
        if official and (len(grids) > 1 or grids[0][0] > 1):
            announce_joint_selection()
        if len(score) != len(current):
            raise RuntimeError(f"sample {b}: its vision encoder gave {len(score)} tokens but it has {len(current)} "
                               "visual tokens")
        if self.options.contextual_share is None:
            contextual = min(k, max(int(QWEN_CONTEXTUAL * len(score)), 1))
        else:
            contextual = split_counts(k, self.options.contextual_share)[1]
        dominant = score.topk(k - contextual).indices
        features = current if official else current.float()
        targets, _, merged = merge_contextual(dominant, metric, features, contextual)
        return Selection(torch.cat([dominant, targets]), torch.cat([features[dominant], merged]).to(current.dtype))
