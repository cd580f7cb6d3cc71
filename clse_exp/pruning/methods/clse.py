"""CLSE (Chen et al., ECCV 2026): keep the visual tokens whose spatial high-frequency content evolves most
between a reference layer L and the pruning layer K (first stage); later stages use attention only, as the
official code does, because a partial token set no longer forms a grid."""

from __future__ import annotations

import dataclasses

import torch

from clse_exp.pruning.methods.base import PruningMethod, choice
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.spectral import clse_scores

SCORE_TYPES = ("clse_attn", "clse", "attn")
SPECTRAL = ("frame2d", "3d")
FILTERS = ("gaussian_highpass", "ideal_highpass", "butterworth_highpass", "gaussian_lowpass", "bandpass")


class CLSE(PruningMethod):
    name = "clse"

    @dataclasses.dataclass
    class Options:
        score_type: str = "clse_attn"  # first stage: clse_attn (official) | clse | attn
        cutoff_ratio: float = 0.1  # sigma = min(H//2, W//2) * cutoff_ratio; 0 = all-pass
        temperature: float = 0.1
        spectral: str = "frame2d"  # per-frame 2-D FFT | joint 3-D FFT over (T, H, W)
        filter: str = "gaussian_highpass"
        band: list[float] | None = None  # [low, high] for filter=bandpass, fractions of min(H//2, W//2)
        order: int = 2  # butterworth order

    def validate(self) -> None:
        choice("prune.score_type", self.options.score_type, SCORE_TYPES)
        choice("prune.spectral", self.options.spectral, SPECTRAL)
        choice("prune.filter", self.options.filter, FILTERS)

    def scores(self, ctx: StageContext, b: int) -> torch.Tensor:
        if ctx.stage_index > 0:
            return ctx.attention(b)
        opts = self.options
        needs_attention = opts.score_type in ("clse_attn", "attn")
        spectral_needed = opts.score_type != "attn"
        score = clse_scores(
            ctx.reference_hidden_states(b)[None] if spectral_needed else None,
            ctx.hidden_states(b)[None] if spectral_needed else None,
            ctx.grids(b),
            attn=ctx.attention(b)[None] if needs_attention else None,
            score_type=opts.score_type,
            cutoff_ratio=opts.cutoff_ratio,
            temperature=opts.temperature,
            spectral=opts.spectral,
            filter=opts.filter,
            band=tuple(opts.band) if opts.band is not None else None,
            order=opts.order,
        )
        return score[0]
