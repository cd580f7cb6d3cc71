"""DART (Wen et al., 2025): keep pivots plus the tokens least similar to them (duplication-aware)."""

from __future__ import annotations

import dataclasses
import math

import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import PruningMethod
from clse_exp.pruning.signals import StageContext


class DART(PruningMethod):
    """Pivots: the visual and the post-image text tokens with the largest L1 key norm in layer K-1.

    Each pivot in turn takes the remaining visual tokens with the LOWEST cosine similarity to it in
    the final-norm feature space, until the budget k is filled exactly (the official code's
    4 + 8 x ceil(.) overshoots the nominal budget; we report and meet k).
    """

    name = "dart"

    @dataclasses.dataclass
    class Options:
        visual_pivots: int = 4
        text_pivots: int = 4

    def validate(self) -> None:
        if self.options.visual_pivots < 1 or self.options.text_pivots < 0:
            raise ConfigError(
                f"prune.visual_pivots={self.options.visual_pivots} / prune.text_pivots={self.options.text_pivots}: "
                "need visual_pivots >= 1 and text_pivots >= 0"
            )

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        visual = ctx.visual_positions(b)
        text_after = ctx.text_positions(b)
        text_after = text_after[text_after > visual.max()]
        n_visual_pivots = min(self.options.visual_pivots, k)
        visual_pivots = ctx.keys(b).float().abs().sum(-1).topk(n_visual_pivots).indices
        text_pivots = torch.empty(0, dtype=torch.long, device=visual.device)
        if len(text_after) and self.options.text_pivots:
            text_norms = ctx.keys(b, text_after).float().abs().sum(-1)
            text_pivots = text_after[text_norms.topk(min(self.options.text_pivots, len(text_after))).indices]
        features = torch.nn.functional.normalize(ctx.normed_hidden(b).float(), dim=-1)
        pivot_features = torch.cat([features[visual_pivots],
                                    torch.nn.functional.normalize(ctx.normed_hidden(b, text_pivots).float(), dim=-1)])
        available = torch.ones(len(visual), dtype=torch.bool, device=visual.device)
        available[visual_pivots] = False
        chosen = [visual_pivots]
        remaining = k - n_visual_pivots
        per_pivot = math.ceil(remaining / len(pivot_features)) if remaining > 0 else 0
        for pivot in pivot_features:
            take = min(per_pivot, remaining, int(available.sum()))
            if take <= 0:
                break
            similarity = (features @ pivot).masked_fill(~available, float("inf"))
            picks = similarity.topk(take, largest=False).indices
            available[picks] = False
            chosen.append(picks)
            remaining -= take
        return torch.cat(chosen)
