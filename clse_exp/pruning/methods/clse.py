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

The official code hard-codes those layers and tables whatever the model's depth, so `prune.transfer=official`
(what `auto` picks for these families when the layers exist in the model) keeps them on every depth, and says
once per run when the depth is not the published one. `prune.transfer=scaled` places the Qwen2-VL stages at
the same fractions of the depth (1/28, 10/28, 19/28; one stage after layer 0 below 8 layers) and meets `keep`
with the planner's exact counts: the transfer `auto` takes for families without official code and for models
too shallow for the official layers.
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
TRANSFERS = ("auto", "official", "scaled")
IMAGE_ONLY_FAMILIES = ("llava",)  # every grid has one frame, so a joint (T, H, W) spectrum has radius 0
SPECTRAL_KNOBS = ("cutoff_ratio", "temperature", "spectral", "filter", "band", "order")


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
        # how the official stages carry over to a model: auto | official (the official code's layers and tables
        # on any depth) | scaled (the stages at the same fractions of the depth, the planner's exact counts)
        transfer: str = "auto"

    def validate(self) -> None:
        opts = self.options
        choose_one("prune.score_type", opts.score_type, SCORE_TYPES)
        choose_one("prune.spectral", opts.spectral, SPECTRA)
        choose_one("prune.filter", opts.filter, FILTERS)
        choose_one("prune.transfer", opts.transfer, TRANSFERS)
        if opts.temperature <= 0:
            raise ConfigError(f"prune.temperature={opts.temperature} must be > 0")
        if opts.cutoff_ratio < 0:
            raise ConfigError(f"prune.cutoff_ratio={opts.cutoff_ratio} must be >= 0 (a fraction of the radius)")
        if opts.filter == "bandpass" and (opts.band is None or len(opts.band) != 2 or not 0 <= opts.band[0] <
                                           opts.band[1]):
            raise ConfigError(f"prune.band={opts.band}: filter=bandpass needs band=[low, high] with 0 <= low < high")
        if opts.filter == "butterworth_highpass" and opts.order < 1:
            raise ConfigError(f"prune.order={opts.order} must be >= 1 (the butterworth filter's order)")
        if opts.filter == "gaussian_lowpass" and opts.cutoff_ratio == 0:
            raise ConfigError("prune.cutoff_ratio=0 with filter=gaussian_lowpass removes every frequency; give a "
                              "cutoff_ratio > 0 (the Gaussian's width is radius * cutoff_ratio)")
        self._refuse_unread_knobs()

    def _refuse_unread_knobs(self) -> None:
        """A spectral knob changed from its default where the score never reads it is refused: such a run would
        keep the default's tokens under another label."""
        opts, defaults = self.options, type(self.options)()
        changed = [knob for knob in SPECTRAL_KNOBS if getattr(opts, knob) != getattr(defaults, knob)]
        unread = {}
        if opts.score_type == "attn":  # attention only: no spectrum, no evolution
            unread.update({knob: "score_type=attn reads no spectrum (attention only)" for knob in SPECTRAL_KNOBS})
        if opts.score_type == "clse":  # a sigmoid of the standardised change is monotone in it: same ranking
            unread["temperature"] = ("score_type=clse ranks by the evolution alone, and the sigmoid is monotone, so "
                                     "its temperature cannot change the ranking (it matters with clse_attn)")
        if opts.filter == "bandpass":
            unread["cutoff_ratio"] = "filter=bandpass reads band=[low, high], not cutoff_ratio"
        else:
            unread["band"] = f"filter={opts.filter} reads no band (only filter=bandpass does)"
        if opts.filter != "butterworth_highpass":
            unread["order"] = f"filter={opts.filter} has no order (only filter=butterworth_highpass does)"
        for knob in changed:
            if knob in unread:
                default = getattr(defaults, knob)
                raise ConfigError(f"prune.{knob}={getattr(opts, knob)!r} has no effect: {unread[knob]}; leave it at "
                                  f"its default {'null' if default is None else repr(default)}")

    def unread_reference_layer(self) -> str | None:
        if self.options.score_type == "attn":
            return "prune=clse with prune.score_type=attn reads no reference layer (attention only: no spectrum)"
        return None

    def check_inputs(self, videos: bool) -> None:
        if self.options.spectral == "3d" and not videos:
            raise ConfigError("prune.spectral=3d takes a joint (T, H, W) spectrum, which needs frames: an image has "
                              "T=1 (spectral radius 0); this dataset has no videos, so use prune.spectral=frame2d")

    # ------------------------------------------------------------------------------ knowledge
    def _transfer(self, facts: ModelFacts) -> str:
        """`official` or `scaled` for this model: `auto` is official where the family has official code whose
        stage layers exist in the model."""
        asked = self.options.transfer
        depth, reference, stages = OFFICIAL_LAYERS.get(facts.family, (None, 0, ()))
        fits = depth is not None and max(stages) < facts.num_layers
        if asked == "official" and not fits:
            where = (f"model family {facts.family!r} has no official CLSE code" if depth is None else
                     f"the official layers {list(stages)} do not exist in a {facts.num_layers}-layer model")
            raise ConfigError(f"prune.transfer=official: {where}; use prune.transfer=scaled (or auto)")
        if asked == "auto":
            asked = "official" if fits else "scaled"
        return asked

    def _check_transfer(self, layers: Layers, facts: ModelFacts) -> None:
        """Refuse a transfer that layers given by hand leave unread (they fix the layers, and the table applies
        only at the official ones)."""
        transfer = self._transfer(facts)
        _, reference, stages = OFFICIAL_LAYERS.get(facts.family, (None, 0, ()))
        own = layers.prune_layers == self.default_layers(facts).prune_layers
        at_table_layers = facts.family in RATIO_FAMILIES + COUNT_FAMILIES and layers == Layers(reference, stages)
        if self.options.transfer != "auto" and not own and not (transfer == "scaled" and at_table_layers):
            raise ConfigError(f"prune.transfer={self.options.transfer} has no effect with layers.prune_layers="
                              f"{list(layers.prune_layers)} given: it chooses the default layers and whether the "
                              "official table applies at the official ones; leave prune.transfer=auto")

    def run_notice(self, layers: Layers, facts: ModelFacts) -> str | None:
        """Said once per run: the official layers used at a depth other than the published one, or not usable."""
        depth, _, stages = OFFICIAL_LAYERS.get(facts.family, (None, 0, ()))
        if depth is None or layers.prune_layers != self.default_layers(facts).prune_layers:
            return None
        transfer = self._transfer(facts)
        if transfer == "official" and facts.num_layers != depth:
            return (f"prune=clse transfer=official: the official {facts.family} layers {list(stages)} and their count "
                    f"rule, published for {depth} layers, are used as the official code hard-codes them on this "
                    f"{facts.num_layers}-layer model (prune.transfer=scaled scales them to the depth)")
        if transfer == "scaled" and self.options.transfer == "auto":
            return (f"prune=clse: the official {facts.family} layers {list(stages)} do not exist in a "
                    f"{facts.num_layers}-layer model; using the depth-scaled transfer, layers "
                    f"{list(layers.prune_layers)} with the planner's exact counts")
        return None

    def default_layers(self, facts: ModelFacts) -> Layers:
        """transfer=official: the official code's stages, on any depth. scaled: a shallow toy (< 8 layers) one
        stage after layer 0; other depths the Qwen2-VL stages scaled (1/28, 10/28, 19/28 of the depth)."""
        if self._transfer(facts) == "official":
            _, reference, stages = OFFICIAL_LAYERS[facts.family]
            return Layers(reference, stages)
        if facts.num_layers < 8:
            return Layers(0, (1,))
        scaled = sorted({max(1, round(f * facts.num_layers / 28)) for f in (1, 10, 19)})
        return Layers(0, tuple(scaled))

    def default_shape(self, n_stages: int) -> list[float] | None:
        return list(SHAPE) if n_stages == 3 else None

    def _table_family(self, layers: Layers, facts: ModelFacts) -> str | None:
        """The family whose official table applies: under transfer=official, at the official stage layers (the
        official code applies it whatever the depth); elsewhere the planner meets the budget exactly."""
        if facts.family not in RATIO_FAMILIES + COUNT_FAMILIES or self.options.transfer == "scaled":
            return None
        _, reference, stages = OFFICIAL_LAYERS[facts.family]
        official = max(stages) < facts.num_layers and layers == Layers(reference, stages)
        return facts.family if official else None

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        self._check_transfer(layers, facts)
        if self.options.spectral == "3d" and facts.family in IMAGE_ONLY_FAMILIES:
            raise ConfigError(f"prune.spectral=3d takes a joint (T, H, W) spectrum, but model family {facts.family!r} "
                              "sees images only (T=1: spectral radius 0); use prune.spectral=frame2d")
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
    def batch_scores(self, ctx: StageContext) -> torch.Tensor:
        """The first stage's spectral evolution (times attention) for the whole batch, one spectrum call per
        distinct grid layout; later stages rank by attention, as the official code does."""
        if ctx.stage_index > 0:
            return ctx.attention_batch()
        opts = self.options
        attention = ctx.attention_batch() if opts.score_type in ("clse_attn", "attn") else None
        if opts.score_type == "attn":
            return attention
        current, reference = ctx.visual_hidden(), ctx.visual_hidden(ctx.reference_layer)
        groups: dict[tuple, list[int]] = {}
        for b, n in enumerate(ctx.n_current):
            if n:
                groups.setdefault((tuple(map(tuple, ctx.grids(b))), n), []).append(b)
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(ctx.n_current):
            (grids, n), = groups
            score = self._spectral(ctx, reference[:, :n], current[:, :n], grids,
                                   None if attention is None else attention[:, :n])
            return torch.nn.functional.pad(score, (0, current.shape[1] - n))
        out = current.new_zeros(current.shape[:2], dtype=torch.float32)
        for (grids, n), rows in groups.items():  # samples with different images: one call per layout
            def pick(values: torch.Tensor, rows: list[int] = rows, n: int = n) -> torch.Tensor:
                return torch.stack([values[b, :n] for b in rows])
            score = self._spectral(ctx, pick(reference), pick(current), grids,
                                   None if attention is None else pick(attention))
            for row, b in enumerate(rows):
                out[b, :n] = score[row]
        return out

    def _spectral(self, ctx: StageContext, reference: torch.Tensor, current: torch.Tensor, grids: tuple,
                  attention: torch.Tensor | None) -> torch.Tensor:
        opts = self.options
        official_video = ctx.protocol == "official" and ctx.family == "video_llava"
        return clse_scores(
            reference, current, list(grids), attn=attention, score_type=opts.score_type,
            cutoff_ratio=opts.cutoff_ratio, temperature=opts.temperature, spectral=opts.spectral, filter=opts.filter,
            band=tuple(opts.band) if opts.band is not None else None, order=opts.order,
            gaussian_eps=VIDEO_GAUSSIAN_EPS if official_video else 0.0,
        )
