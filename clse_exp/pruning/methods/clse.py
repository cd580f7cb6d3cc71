"""CLSE (Chen et al., ECCV 2026): keep the visual tokens whose spatial high-frequency content evolves most
between a reference layer L and the pruning layer K (first stage); later stages use attention only, as the
official code does, because a partial token set no longer forms a grid.

Official code (zjubinchen/CLSE, main@cfc9710 and video@09a2984), the rules reproduced under
`protocol=official`:
- Qwen2-VL (Qwen2VL/clse_qwen2vl_model.py:29-30, 122-149): L=0, K=[1, 10, 19]; `keep` is RETAIN_RATIO:
  0.334/0.223/0.112 map to per-stage fractions of the ORIGINAL count, other ratios to keep * [1.71, 1.08,
  0.294]; count max(1, int(n * fraction)); a stage that would not reduce the count is skipped; ragged cache.
- LLaVA-1.5 (LLaVA1.5/llava/model/language_model/clse_model.py:30-32, 109-176): L=0, K=[1, 11, 21];
  `keep * n` is RETAIN_TOKEN: 192/128/64 map to per-stage counts [330, 210, 62] / [220, 140, 41] /
  [110, 70, 20] (other budgets crash there; here they use the comment's factors [1.72, 1.09, 0.32]);
  after prefill every earlier layer's cache is cut to the final survivors (crop); positions original.
- Video-LLaVA (video branch, videollava/model/language_model/clse_model.py:28-30): one stage, L=2, K=3,
  per-frame 2-D spectrum whose Gaussian adds 1e-6 to 2 sigma^2; ragged cache; the count is KEEP_TOKEN
  (194 of 2048 in the paper), i.e. the planner's count.
Attention rows are the last prompt token's in layer K-1, softmax in float32, head mean in the model dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from clse_exp.errors import ConfigError, choose_one
from clse_exp.pruning.methods.base import Layers, MethodOptions, ModelFacts, PruningMethod, Rules
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.spectral import FILTERS, SCORE_TYPES, SPECTRA, clse_scores

SHAPE = (1.71, 1.08, 0.294)
OFFICIAL_LAYERS = {  # family -> (depth the official stages were published for, reference layer, stage layers)
    "qwen2_vl": (28, 0, (1, 10, 19)),
    "qwen2_5_vl": (28, 0, (1, 10, 19)),  # Qwen2-VL's stages on the same 28-layer decoder
    "llava": (32, 0, (1, 11, 21)),
    "video_llava": (32, 2, (3,)),
}
QWEN2VL_TABLE = {0.334: (0.57, 0.36, 0.098), 0.223: (0.38, 0.24, 0.066), 0.112: (0.19, 0.12, 0.034)}
QWEN2VL_FACTORS = (1.71, 1.08, 0.294)
LLAVA_TABLE = {192: (330, 210, 62), 128: (220, 140, 41), 64: (110, 70, 20)}
LLAVA_FACTORS = (1.72, 1.09, 0.32)
LLAVA_TOKENS = 576  # the LLaVA table holds counts for a 24 x 24 grid
TABLE_TOLERANCE = 1e-6
RATIO_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # official budgets are ratios of the visual count
COUNT_FAMILIES = ("llava",)  # official budgets are average token counts
VIDEO_GAUSSIAN_EPS = 1e-6


class CLSE(PruningMethod):
    name = "clse"
    has_official_counts = True

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "clse"
        score_type: str = "clse_attn"  # first stage: clse_attn (official) | clse | attn
        cutoff_ratio: float = 0.1  # sigma = min(H//2, W//2) * cutoff_ratio; 0 = all-pass
        temperature: float = 0.1
        spectral: str = "frame2d"  # per-frame 2-D FFT | joint 3-D FFT over (T, H, W)
        filter: str = "gaussian_highpass"
        band: list[float] | None = None  # [low, high] for filter=bandpass, fractions of min(H//2, W//2)
        order: int = 2  # butterworth order

    def validate(self) -> None:
        opts = self.options
        choose_one("prune.score_type", opts.score_type, SCORE_TYPES)
        choose_one("prune.spectral", opts.spectral, SPECTRA)
        choose_one("prune.filter", opts.filter, FILTERS)
        if opts.temperature <= 0:
            raise ConfigError(f"prune.temperature={opts.temperature} must be > 0")
        if opts.cutoff_ratio < 0:
            raise ConfigError(f"prune.cutoff_ratio={opts.cutoff_ratio} must be >= 0 (a fraction of the radius)")
        if opts.filter == "bandpass" and (opts.band is None or len(opts.band) != 2 or not 0 <= opts.band[0] <
                                           opts.band[1]):
            raise ConfigError(f"prune.band={opts.band}: filter=bandpass needs band=[low, high] with 0 <= low < high")

    # ------------------------------------------------------------------------------ knowledge
    def default_layers(self, facts: ModelFacts) -> Layers:
        """The official stages on the depth they were published for; a shallow toy (< 8 layers) one stage
        after layer 0; other depths the Qwen2-VL stages scaled (1/28, 10/28, 19/28 of the depth)."""
        depth, reference, stages = OFFICIAL_LAYERS.get(facts.family, (None, 0, ()))
        if facts.num_layers == depth:
            return Layers(reference, stages)
        if facts.num_layers < 8:
            return Layers(0, (1,))
        scaled = sorted({max(1, round(f * facts.num_layers / 28)) for f in (1, 10, 19)})
        return Layers(0, tuple(scaled))

    def default_shape(self, n_stages: int) -> list[float] | None:
        return list(SHAPE) if n_stages == 3 else None

    def _table_family(self, layers: Layers, facts: ModelFacts) -> str | None:
        """The family whose official table applies: only at the official stage layers on the published depth
        (elsewhere the table's counts mean nothing, and the planner meets the budget exactly)."""
        if facts.family not in RATIO_FAMILIES + COUNT_FAMILIES:
            return None
        depth, reference, stages = OFFICIAL_LAYERS[facts.family]
        official = facts.num_layers == depth and layers == Layers(reference, stages)
        return facts.family if official else None

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        if official and budget == "final" and self._table_family(layers, facts):
            raise ConfigError("prune=clse under protocol=official (or schedule=paper) reads keep as the official "
                              "average budget of its per-stage tables; budget=final needs protocol=uniform")

    def official_counts(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> list[int] | None:
        family = self._table_family(layers, facts)
        if family in RATIO_FAMILIES:
            ratios = next((r for key, r in QWEN2VL_TABLE.items() if abs(keep - key) <= TABLE_TOLERANCE), None)
            ratios = ratios or [keep * factor for factor in QWEN2VL_FACTORS]
            return [max(1, int(n_visual * ratio)) for ratio in ratios]  # int() truncation, float error included
        if family in COUNT_FAMILIES:
            average = round(keep * n_visual)
            if n_visual == LLAVA_TOKENS and average in LLAVA_TABLE:
                return list(LLAVA_TABLE[average])
            return [max(1, int(average * factor)) for factor in LLAVA_FACTORS]
        return None

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        if protocol == "official" and facts.family == "llava":
            return Rules(kv_policy="crop")
        return Rules()

    def capture_layers(self, layers: Layers) -> set[int]:
        return super().capture_layers(layers) | {layers.reference_layer}

    # ------------------------------------------------------------------------------ selection
    def scores(self, ctx: StageContext, b: int) -> torch.Tensor:
        if ctx.stage_index > 0:
            return ctx.attention(b)
        opts = self.options
        needs_attention = opts.score_type in ("clse_attn", "attn")
        spectral_needed = opts.score_type != "attn"
        official_video = ctx.protocol == "official" and ctx.family == "video_llava"
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
            gaussian_eps=VIDEO_GAUSSIAN_EPS if official_video else 0.0,
        )
        return score[0]
