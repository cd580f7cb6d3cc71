"""VisPruner (Zhang et al., ICCV 2025): a few important tokens by CLIP [CLS] attention, then diverse tokens
from the rest by repeatedly dropping near-duplicates, before the projector; nothing is merged.

Official code (Theia-4869/VisPruner@aefa01a, cited VP:<file>:<lines>), LLaVA-1.5:
- Signals: `hidden_states[-2]` and `attentions[-2]` of the CLIP tower (mm_vision_select_layer = -2), i.e. the
  attention of the penultimate layer and that layer's output as features; [CLS] row, patch columns, softmax
  over all keys in the tower's dtype (eager CLIPAttention of transformers 4.37.2), [CLS] dropped from the
  features (VP:llava/model/multimodal_encoder/clip_encoder.py:36-52,64-68).
- Counts: T = visual_token_num per image (`--visual_token_num`); important = int(T * important_ratio)
  (default 0.5, the README's MME example 0.75), diverse = T - important (VP:llava/model/llava_arch.py:148-151;
  llava/eval/model_vqa_loader.py:151-152; README.md:68-76).
- Important: the head MEAN of the [CLS] attention, patches ranked by argsort descending; the first
  `important` are kept and the others, in that ranked order, are the residual list (llava_arch.py:154-157).
- Diverse (llava_arch.py:160-176): features L2-normalised (layer -2's output, the tower's dtype). While the
  residual list holds R > diverse tokens: r = min(8, R - diverse); split the list into its even and odd
  entries (A, B); score each A token by its largest cosine to any B token; drop the r A tokens of highest
  score; the list becomes [surviving A in descending score order, then all of B]. The order matters: the next
  round's A/B split is read from it.
- Output: a mask over the patches (important + final residual), so the kept tokens go through the projector
  in their ORIGINAL order and are fed as a shorter sequence, contiguous positions (llava_arch.py:178-186,272;
  the sequence is rebuilt with arange positions, 370-377). Several images of one prompt each keep T
  (the concatenated images are one batch, 198-212).

Departures (documented, not silent):
- The official code indexes the surviving A entries with a batch index expanded to R // 2 - r columns, one
  fewer than the ceil(R / 2) - r survivors when R is odd: the shapes do not broadcast and it raises an
  IndexError (llava_arch.py:174). R keeps its parity between rounds but the last, so this happens exactly
  when N - important is odd (and exceeds diverse; on a tiny residual, R // 2 - r <= 1, it broadcasts
  instead), e.g. T = 127 or 63 of N = 576 at ratio 0.5; its published budgets (64/128/192 at 0.5, 64 at
  0.75) are even. We take the evident rule there, every surviving A entry, and log it once per process.
- Ties in either argsort resolve to the lower index (stable sort); the official argsort is unstable.
- Budget: a sample keeps k = round(keep * N) tokens split evenly over its images (the earlier images take
  the remainder when it does not divide), i.e. T per image as the official flag sets it.
`uniform` keeps the same rule and exactly k tokens, at their original positions, computed in float32.
Other families: the official repository also patches LLaVA-NeXT (its any-resolution tiles), which the
engine exposes under no family; they are refused before any weights load.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import Layers, MethodOptions, ModelFacts, PruningMethod, Rules
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.methods.visionzip import cls_attention_per_head, per_image, require_clip_encoder, split_budget
from clse_exp.pruning.signals import StageContext

DROP_PER_ROUND = 8  # near-duplicates removed per round at most (VP:llava_arch.py:163)
log = logging.getLogger(__name__)


def important_count(k: int, ratio: float) -> int:
    """Important tokens among an image's k kept ones: int(k * ratio), the official truncation (VP:150)."""
    return int(k * ratio)


def cls_attention(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n] CLIP `layer`'s attention from [CLS] to each patch, softmax over all 1 + n keys in `dtype`, averaged
    over heads; recomputed from the layer's input x [1 + n, C] as transformers 4.37.2's eager CLIPAttention
    computes it (query scaled before the product, softmax in the input dtype)."""
    return cls_attention_per_head(layer, x, dtype)[0].mean(dim=0)


@functools.cache
def announce_odd_residual() -> None:
    """Say once per process that a budget reached the case where the official code raises."""
    log.warning("prune=vispruner protocol=official: an odd number of residual tokens, where the official code "
                "(aefa01a) raises an IndexError; every surviving even-position token is kept (its evident rule)")


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, count: int) -> torch.Tensor:
    """VisPruner's diverse tokens: from `residual` (patch indices, ranked) keep `count`, dropping per round up
    to DROP_PER_ROUND even-position entries whose best cosine to an odd-position entry is highest. `unit`
    [n, C] holds the normalised features. Returns the final residual list (its order carries no meaning)."""
    while True:
        drop = min(DROP_PER_ROUND, len(residual) - count)
        if drop <= 0:
            return residual
        evens, odds = residual[0::2], residual[1::2]
        redundancy = (unit[evens] @ unit[odds].T).max(dim=1).values
        survivors = redundancy.argsort(descending=True, stable=True)[drop:]
        residual = torch.cat([evens[survivors], odds])


class VisPruner(PruningMethod):
    name = "vispruner"

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "vispruner"
        important_ratio: float = 0.5  # share of the kept tokens chosen by [CLS] attention (the rest: diverse)

    def validate(self) -> None:
        ratio = self.options.important_ratio
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"prune.important_ratio={ratio} must lie in [0, 1] (official default 0.5: half "
                              "the kept tokens by [CLS] attention, half diverse)")

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        require_clip_encoder(self.name, facts, layers)

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """Layer -2's input (its [CLS] attention is recomputed) and layer -1's input (layer -2's output: the
        features LLaVA-1.5 feeds, vision_feature_layer = -2)."""
        return (-2, -1)

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        layer = ctx.vision_layers[-2]
        official = ctx.protocol == "official"
        images = per_image(ctx, b, -2)
        features = [x for _, x in per_image(ctx, b, -1)]
        kept = []
        for (offset, x), feats, count in zip(images, features, split_budget(k, len(images)), strict=True):
            if count > 0:
                dtype = x.dtype if official else torch.float32  # official: the tower's own precision
                kept.append(offset + self._one_image(layer, x, feats[1:].to(dtype), count, dtype, official))
        return torch.cat(kept).to(ctx.hidden.device)

    def _one_image(self, layer: torch.nn.Module, x: torch.Tensor, features: torch.Tensor, k: int,
                   dtype: torch.dtype, official: bool) -> torch.Tensor:
        """One image's k kept patch indices (important first, then diverse; the engine sorts them)."""
        ranked = cls_attention(layer, x, dtype).argsort(descending=True, stable=True)
        important = important_count(k, self.options.important_ratio)
        diverse = k - important
        if diverse == 0:
            return ranked[:important]
        if official and (len(ranked) - important) % 2 and len(ranked) - important > diverse:
            announce_odd_residual()
        unit = features / features.norm(dim=-1, keepdim=True)
        return torch.cat([ranked[:important], remove_duplicates(unit, ranked[important:], diverse)])
