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

Budget: a sample keeps k = round(keep * N) tokens, split evenly over its images; per image of k tokens,
contextual = round(k * contextual_share) and dominant = k - contextual. The default share 5/32 reproduces
every published split (SPLITS). Our LLM sequence has no [CLS] slot (transformers' LLaVA drops it), so under
`official` the projected [CLS] is carried in one kept slot: the slot of the merged-away patch the [CLS]
attends to most (that patch still lives in its contextual token); the trace lists that slot's index.
`uniform` keeps original positions and exactly k patch slots: no [CLS] (`dominant` patches instead of
dominant - 1), contextual tokens at their target's position, float32. The features are the captured input
of the last CLIP layer, i.e. LLaVA-1.5's vision_feature_layer = -2. The official Qwen2.5-VL variant
(Qwen2_5_VL/qwen2_5vl_visionzip.py, upstream commit 68993a3, read in the fork jsilvcast/VisionZip) is not
implemented: the Qwen adapters do not expose their vision encoder.
"""

from __future__ import annotations

import dataclasses

import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import Layers, MethodOptions, ModelFacts, PruningMethod, Rules, Selection
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.signals import StageContext

# (dominant incl. [CLS], contextual) per LLaVA-1.5 budget: 54 + 10 is in the code (VZ:README.md:127-128); 162 + 30
# and 108 + 20 are the paper's (its Tables 8-9, quoted in docs/baselines.md section 4(c); not in the repository).
SPLITS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
CONTEXTUAL_SHARE = 5 / 32  # 30 / 192 = 20 / 128 = 10 / 64
CLIP_FAMILIES = ("llava",)  # families whose CLIP encoder (with its [CLS] token) the engine exposes


def require_clip_encoder(method: str, facts: ModelFacts, layers: Layers) -> None:
    """The CLIP-attention methods run at the LLM input and need a CLIP encoder with a [CLS] token."""
    if facts.family not in CLIP_FAMILIES:
        raise ConfigError(f"prune={method} reads the CLIP encoder's [CLS] attention; model family "
                          f"{facts.family!r} is not supported (supported: {', '.join(CLIP_FAMILIES)})")
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


def cls_attention_and_keys(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP `layer`'s attention from [CLS] to each patch, summed over heads [n], and its keys averaged over
    heads [1 + n, head_dim], recomputed from the layer's input x [1 + n, C] (VZ:visionzip/utils.py:19-61,89)."""
    attn = layer.self_attn
    hidden = layer.layer_norm1(x)
    heads = attn.num_heads
    query = (attn.q_proj(hidden[:1]) * attn.scale).view(heads, -1).to(dtype)
    keys = attn.k_proj(hidden).view(hidden.shape[0], heads, -1).to(dtype)
    probs = torch.softmax(torch.einsum("hd,thd->ht", query, keys), dim=-1)
    return probs[:, 1:].sum(dim=0), keys.mean(dim=1)


class VisionZip(PruningMethod):
    name = "visionzip"

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "visionzip"
        contextual_share: float = CONTEXTUAL_SHARE  # contextual tokens / kept tokens

    def validate(self) -> None:
        share = self.options.contextual_share
        if not 0.0 < share < 1.0:
            raise ConfigError(f"prune.contextual_share={share} must lie in (0, 1) (the published splits use "
                              f"{CONTEXTUAL_SHARE})")

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        require_clip_encoder(self.name, facts, layers)

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    def vision_layers(self) -> tuple[int, ...]:
        """Layer -2's input (its attention and keys) and layer -1's input (layer -2's output: the features)."""
        return (-2, -1)

    def select(self, ctx: StageContext, b: int, k: int) -> Selection:
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
        """One image's k tokens: (1 if a [CLS] row leads else 0, dominant patches ascending, the slots of the
        [CLS] and contextual tokens, their CLIP features [head + contextual, C])."""
        dtype = x.dtype if official else torch.float32  # official: the tower's own precision
        score, metric = cls_attention_and_keys(layer, x, dtype)
        dominant_count, contextual = split_counts(k, self.options.contextual_share)
        head = int(official and dominant_count > 0)
        dominant = score.topk(dominant_count - head).indices.sort().values
        remaining = torch.ones_like(score, dtype=torch.bool).index_fill_(0, dominant, False).nonzero().flatten()
        is_target = torch.zeros(len(remaining), dtype=torch.bool, device=score.device)
        step = max(1, len(remaining) // contextual)
        is_target[torch.arange(0, len(remaining), step, device=score.device)[:contextual]] = True
        targets, members = remaining[is_target], remaining[~is_target]
        unit = metric[1:][remaining]
        unit = unit / unit.norm(dim=-1, keepdim=True)
        assign = (unit[~is_target] @ unit[is_target].T).argmax(dim=1)
        patches = features[1:].to(dtype)
        sums = torch.zeros(contextual, patches.shape[1], dtype=dtype, device=patches.device)
        sums.index_add_(0, assign, patches[members])
        counts = torch.bincount(assign, minlength=contextual).clamp(min=1)
        merged = patches[targets] + sums / counts[:, None].to(dtype)
        if not head:
            return head, dominant, targets, merged
        slot = members[score[members].argmax()][None]  # the [CLS] row's slot: see the module docstring
        return head, dominant, torch.cat([slot, targets]), torch.cat([features[:1].to(dtype), merged])
