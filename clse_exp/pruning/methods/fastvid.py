"""FastVID (Shen et al., NeurIPS 2025): cut a video into segments of similar frames (DySeg), then keep per frame
the most salient tokens plus, on a few anchor frames per segment, density-peak tokens into which the rest of
the segment is merged (STPrune = ATS + DTM), before the LLM.

Official code (LunarShen/FastVID@a40a109, cited FV:<file>:<lines>; the LLaVA-OneVision port is
fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py, cited OV:<lines>; the Qwen2.5-VL
port fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py, cited QW:<lines>; LLaVA-Video
runs the OV rule in fastvid_llavavideo, a model the engine has no family for).

LLaVA-OneVision (OV):
- Where: at the LLM input, on the input embeddings (post-projector, post 2x2 bilinear pooling) of the one
  video's F x P tokens (P = 196 on LLaVA-OV-7B), once per prefill (`seq_length > 1`, OV:900-1075). The video's
  trailing newline token is outside `video_token_len` (FV:.../llava_arch.py:368-377) and always kept.
- Signals (FV:.../llava_arch.py:221-225,188-199,309-310; .../siglip_encoder.py:622-655): the ORIGINAL SigLIP
  checkpoint's post-layernorm and attention-pooling head run on each frame's vision-tower output; the pooled
  vector is the frame's global feature, the probe's head-mean attention (bilinearly pooled like the tokens)
  its salience.
- DySeg (OV:912-922): cosine of adjacent frames' global features; cuts after the c-1 least similar pairs
  (topk, c = DySeg_c = 8) and after every pair below tau (DySeg_tau = 0.9); segments run between cuts.
- Counts (OV:932-952): per frame R = int(P * ratio), salient S = R - int(R * d) (d = STPrune_d = 0.4),
  context Cn = R - S. A segment of L frames has ceil(L / p) anchor frames (p = DTM_p = 4), counted from its
  LAST frame (frames L-1, L-1-p, ...), each with Cn * L // ceil(L / p) context tokens; other frames none.
- ATS (OV:955-962): every frame keeps its S tokens of highest salience (own embeddings).
- Density (OV:965-989), over each frame's P - S other tokens (ascending index): D = cdist(float32) / sqrt(C);
  density = exp(-mean of the 4 smallest D^2 in its row, self included) + U(0, 1) * 1e-6; parent distance = the
  smallest D to a denser token (the frame's largest D if none); score = parent distance * density.
- DTM (OV:991-1061): a frame whose context count equals Cn (a one-frame segment) takes its Cn top-score tokens
  and merges its own other tokens into them; an anchor (count > Cn) takes its top-score tokens and merges every
  non-salient token of its whole SEGMENT into them (each anchor independently). Merge: each token joins the
  target of highest cosine (targets included, so a target joins itself); a target becomes
  w * target + (1 - w) * mean(members), w = max(1 / (members + 1), beta) (DTM_beta = 0.6).
- Positions and cache (OV:1063-1074): the kept tokens in original order with their ORIGINAL positions
  (position_ids = keep_indexs, gaps and all); only they enter every layer and the cache; decoding continues
  from the unpruned length (generate's own positions): Rules() (original, original).
- Defaults (FV:fastvid_llavaonevision/scripts/eval.sh:6-11; lmms_eval/models/llava_onevision.py:88-93):
  ratio 0.10, c 8, tau 0.9, d 0.4, p 4, beta 0.6. `keep` is the ratio.

Qwen2.5-VL (QW), another rule on the same ideas:
- Signals: global feature = mean of the frame's LLM input embeddings (post-merger, QW:1836); salience = the
  LAST vision block's attention, each frame's mean post-RoPE query over the frame's merged tokens (keys the
  mean of each token's 4 rows), softmax in float32 cast back, head mean, out of window order (QW:193-203,
  583-594). A "frame" is a temporal patch (2 input frames).
- DySeg as OV, tau 0.84 (QW:1899-1910; scripts/eval.sh:7-13: ratio 0.27, c 8, tau 0.84, ignore 0.95, d 0.4,
  p 4, beta 0.6).
- Counts per segment of L frames (QW:1920-1989): L * int(P * ratio) tokens, context max(int(. * d), 1), the rest
  salient. L = 1: that frame takes both. L > 1: sub-segments split where adjacent cosine < DySeg_ignore; only the
  LAST frame of each of the V sub-segments keeps tokens: salient spread over them (remainder first), context
  over ceil(V / p) anchors (remainder first, each at most P // 2), the anchor list reversed (every p-th
  sub-segment from the end), a frame's salient capped at P minus its context.
- Per frame (QW:1994-2043): its salient top-k, then density peaks among its other tokens (as OV, jitter drawn
  frame by frame). Merge (QW:2050-2074): for EACH frame's context set, the segment's tokens that are neither
  salient nor in that set join its most similar target (targets are not their own members); same weights.
- Positions (QW:2093-2099): the kept tokens at their original M-RoPE positions, mask sliced; decode continues
  from the unpruned rope deltas: Rules() (original, original).

Departures (documented, not silent):
- OV signals: transformers' LLaVA-OneVision carries no SigLIP head (vision_use_head=False; the official code
  loads it from the separate google/siglip-so400m-patch14-384 checkpoint) and the engine exposes no
  LLaVA-OneVision vision-tower states, so the global feature of a frame is the MEAN of its input embeddings
  (the official Qwen port's own global feature, FV:...modeling_qwen2_5_vl.py:1836) and its salience is that
  mean vector used as the probe: softmax over the frame's tokens of <token, mean> / sqrt(C) (a one-query
  probe, as the official head's; the Qwen port also probes with the frame-mean query, :198-203).
- The density jitter is drawn from the run's seeded generator (ctx.generator), not the global RNG, so a sample
  keeps the same tokens alone or in a batch.
- Where the official code would raise, the evident rule runs: fewer frames than c (topk of c-1 of F-1 pairs)
  takes min(c-1, F-1) cuts; fewer than 4 candidates take the nearest min(4, m); an OV anchor asked for more
  context tokens than its frame has candidates (high ratios: Cn * p > P - S) takes all of them; a Qwen
  segment whose salient count would be negative (int(P * ratio) = 0) keeps none. Such samples keep other
  counts than the rule's and the engine's retention check flags them.
- Both ports handle one video per prompt (batch 1); several clips in one sample (videos, or images: any T=1
  grid is a one-frame clip) are each pruned as their own video.
`uniform`: exactly k = round(keep * N) kept-or-merged tokens, at their original positions, float32: the k
tokens are spread over the frames in proportion to their size (cumulative rounding), each frame's share split
k_f - int(k_f d) salient and int(k_f d) context; a segment's context shares are pooled on its anchors (evenly,
the remainder to the later anchors), capped at each anchor's candidates, any excess kept as extra salient
tokens of the segment's frames in order (the OV rule on every family; Qwen families read the vision-block
salience). Families: official llava_onevision and qwen2_5_vl; uniform also qwen2_vl and qwen3_vl; others refused
(official on a ported family in one line that names the port).
Qwen3-VL (uniform port): its vision blocks are Qwen2.5-VL's without windows (every block attends within a
temporal patch), so the salience is read the same way from the last block's input (16-px patches: each merged
token is its 4 rows of 16 x 16 pixels); the signal and the cut are on the LLM-input embeddings (the final
merger's output), before the DeepStack features are added after layers 0.. (the engine adds them to the kept
tokens only; the DeepStack mergers' own features are not read). A video is laid out as one (1, h, w) segment
per temporal patch, so consecutive one-frame grids of one size are joined back into one clip, as VidCom2 does.
`keep` is the official ratio (R = int(P * keep)), so official retention departs from keep by the rule's floors;
the run says so once and the engine flags such samples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import (
    BatchSelection,
    Layers,
    MethodOptions,
    ModelFacts,
    PruningMethod,
    Rules,
    Selection,
    pack,
)
from clse_exp.pruning.methods.vidcom2 import clips_of
from clse_exp.pruning.methods.visionzip import per_token
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import positions_of

if TYPE_CHECKING:  # the models package imports the methods
    from clse_exp.models.base import EncoderRows

OFFICIAL_FAMILIES = ("llava_onevision", "qwen2_5_vl")  # the families whose official code is reproduced
UNIFORM_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # video grids the rule runs on
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # salience from the last vision block (the Qwen port's signal)
TAU = {"llava_onevision": 0.9}  # DySeg_tau per family (OV eval.sh:8); Qwen 0.84 (QW eval.sh:9)
QWEN_TAU = 0.84
QWEN_IGNORE = 0.95  # DySeg_ignore, the Qwen port's sub-segment threshold (QW eval.sh:10)
NEIGHBOURS = 4  # nearest entries (self included) in the density (OV:977)
DENSITY_NOISE = 1e-6  # tie-breaking jitter on the density (OV:979-980)


def frame_signals(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global features [F, C], salience [F, P]) of a clip's embeddings [F, P, C]: the frame mean, and the
    softmax over the frame of each token's product with that mean / sqrt(C) (see the module docstring)."""
    mean = frames.mean(dim=1)
    logits = torch.einsum("fpc,fc->fp", frames, mean) / frames.shape[-1] ** 0.5
    return mean, torch.softmax(logits, dim=-1)


def cut_flags(features: torch.Tensor, c: int, tau: float, ignore: float) -> torch.Tensor:
    """DySeg (OV:912-919, QW:1899-1905): [2, F-1] bool on the device: row 0 cuts after each of the min(c-1, F-1)
    least similar adjacent frame pairs and after every pair of cosine below tau; row 1 marks the pairs below
    `ignore` (the Qwen port's sub-segments, QW:1937-1938)."""
    unit = features / features.norm(dim=1, keepdim=True)
    similarity = (unit[:-1] * unit[1:]).sum(dim=1)
    cut = similarity < tau
    lowest = min(c - 1, len(similarity))
    if lowest > 0:
        cut = cut.index_fill(0, similarity.topk(lowest, largest=False).indices, True)
    return torch.stack([cut, similarity < ignore])


def vision_salience(queries: torch.Tensor, keys: torch.Tensor, token: torch.Tensor, frames: int, tokens: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """[F, P] the Qwen port's salience (QW:193-203, 589-594): per frame the MEAN post-RoPE query of its rows
    attends the merged tokens' keys (each the mean of its rows' keys), softmax over the frame in float32 cast to
    `dtype`, mean over heads; from the last vision block's [heads, rows, D] queries and keys, `token` the merged
    token (grid order) of each row."""
    heads, rows, dim = queries.shape
    frame = token // tokens
    query = queries.new_zeros(heads, frames, dim).index_add_(1, frame, queries) / (rows // frames)
    key = per_token(keys.transpose(0, 1), token, frames * tokens).view(frames, tokens, heads, dim)
    logits = torch.einsum("hfd,fphd->hfp", query.to(dtype), key.to(dtype)) / dim**0.5
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype).mean(dim=0)


def segment_sizes(flags: list[bool]) -> list[int]:
    """Frame counts of the segments between the cuts (OV:920-922), from the host's copy of the flags."""
    ends = [i for i, flag in enumerate(flags) if flag] + [len(flags)]
    return [end - start for start, end in zip([-1, *ends[:-1]], ends, strict=True)]


def anchor_offsets(length: int, p: int) -> list[int]:
    """Frames of a segment that carry its context tokens: the last, then every p-th before it (OV:948-951)."""
    return [j for j in range(length) if (length - 1 - j) % p == 0]


def density_scores(tokens: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DPC score of each of a frame's candidate tokens [m, C] (OV:975-987): parent distance x local density."""
    dist = torch.cdist(tokens.float()[None], tokens.float()[None])[0] / tokens.shape[-1] ** 0.5
    nearest = dist.topk(min(NEIGHBOURS, len(tokens)), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.to(dist.dtype)
    denser = (density[None, :] > density[:, None]).to(dist.dtype)
    parent = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values
    return parent * density


def merge_into(pool: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """DTM (OV:996-1008): every row of `pool` [m, C] joins the target [c, C] of highest cosine; each target
    becomes w * target + (1 - w) * mean(members), w = max(1 / (members + 1), beta)."""
    unit = pool / pool.norm(dim=-1, keepdim=True)
    similarity = unit @ (targets / targets.norm(dim=-1, keepdim=True)).T
    assign = torch.zeros_like(similarity).scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
    members = assign.sum(dim=0)[:, None]
    weight = (1 / (members + 1)).clamp(min=beta)
    return weight * targets + (1 - weight) * (assign.T @ pool) / members.clamp(min=1)


def spread(total: int, sizes: list[int]) -> list[int]:
    """`total` over parts of `sizes`, proportionally, by cumulative rounding (exact sum)."""
    whole = sum(sizes)
    marks, run = [0], 0
    for size in sizes:
        run += size
        marks.append(math.floor(total * run / whole + 0.5))
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


@dataclasses.dataclass(frozen=True)
class FramePlan:
    """One frame's counts: salient tokens, context tokens, and how its context tokens merge ('frame': its own
    tokens; 'segment': its whole segment's; 'qwen': the Qwen port's segment merge; '': none)."""

    salient: int
    context: int
    merge: str


class FastVID(PruningMethod):
    name = "fastvid"
    ratio: float = 1.0  # the run's keep, set when the pruner binds (check_budget)
    official: bool = True  # whether the official count rule applies, set there too
    family: str = "llava_onevision"  # the bound model's family, set there too

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "fastvid"
        dyseg_c: int = 8  # segments: cut after the c-1 least similar adjacent frames (DySeg_c)
        dyseg_tau: float | None = None  # ... and after every pair of cosine below tau (null: 0.9 OV, 0.84 Qwen)
        dyseg_ignore: float | None = None  # Qwen official: sub-segments at cosine below it (null: 0.95)
        stprune_d: float = 0.4  # share of each frame's kept tokens chosen by density (the rest by salience)
        dtm_p: int = 4  # one anchor frame per p frames of a segment, counted from its end (DTM_p)
        dtm_beta: float = 0.6  # least weight of an anchor token in its merge (DTM_beta)

    def validate(self) -> None:
        o = self.options
        checks = [
            ("dyseg_c", o.dyseg_c, isinstance(o.dyseg_c, int) and o.dyseg_c >= 1, "an integer >= 1 (official 8)"),
            ("dyseg_tau", o.dyseg_tau, o.dyseg_tau is None or -1.0 <= o.dyseg_tau <= 1.0,
             "a cosine in [-1, 1] or null (official 0.9 on LLaVA-OneVision, 0.84 on Qwen2.5-VL)"),
            ("dyseg_ignore", o.dyseg_ignore, o.dyseg_ignore is None or -1.0 <= o.dyseg_ignore <= 1.0,
             "a cosine in [-1, 1] or null (official 0.95)"),
            ("stprune_d", o.stprune_d, 0.0 <= o.stprune_d <= 1.0, "in [0, 1] (official 0.4)"),
            ("dtm_p", o.dtm_p, isinstance(o.dtm_p, int) and o.dtm_p >= 1, "an integer >= 1 (official 4)"),
            ("dtm_beta", o.dtm_beta, 0.0 <= o.dtm_beta <= 1.0, "in [0, 1] (official 0.6)"),
        ]
        for key, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"prune.{key}={value} is invalid: it must be {valid}")

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        families = OFFICIAL_FAMILIES if official else UNIFORM_FAMILIES
        if facts.family not in families:
            ported = [f for f in UNIFORM_FAMILIES if f not in OFFICIAL_FAMILIES]
            extra = f"; protocol=uniform runs the port on {', '.join(ported)}" if facts.family in ported else ""
            raise ConfigError(f"prune=fastvid protocol={'official' if official else 'uniform'}: model family "
                              f"{facts.family!r} is not supported (supported: {', '.join(families)}){extra}")
        if self.options.dyseg_ignore is not None and not (official and facts.family == "qwen2_5_vl"):
            raise ConfigError(f"prune.dyseg_ignore={self.options.dyseg_ignore} has no effect: only the official "
                              "Qwen2.5-VL rule (protocol=official, model family qwen2_5_vl) reads it; leave it null")
        if tuple(layers.prune_layers) != (0,):
            raise ConfigError(f"prune=fastvid prunes the video before the LLM: layers.prune_layers="
                              f"{list(layers.prune_layers)} must be [0]")
        self.ratio = keep  # the official retention ratio (its count rule reads it, not the planner's k)
        self.official = official
        self.family = facts.family

    def tau(self) -> float:
        """DySeg_tau: the option, else the family's official value."""
        if self.options.dyseg_tau is not None:
            return self.options.dyseg_tau
        return QWEN_TAU if self.family in QWEN_FAMILIES else TAU[self.family]

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """Qwen: the last vision block's input (its queries and keys give the salience, QW:583-584)."""
        return (-1,) if facts.family in QWEN_FAMILIES else ()

    def run_notice(self, layers: Layers, facts: ModelFacts) -> str | None:
        if not self.official:
            return None
        notice = (f"prune=fastvid protocol=official keeps the official counts: int(P * keep) tokens per frame of P "
                  f"(salient + context, floored and capped as its code does), keep={self.ratio}, whatever "
                  "round(keep * N) asks; retention can depart from keep (e.g. 8 of 36 tokens, 0.222, for keep=0.25 "
                  "on 3 x 3 frames)")
        if facts.family not in QWEN_FAMILIES:
            notice += ("; on llava_onevision the frame features and salience come from the input embeddings "
                       "(mean feature, mean-query probe), not from the SigLIP pooling head the official code "
                       "loads from a separate checkpoint")
        return notice

    def check_inputs(self, videos: bool) -> None:
        if not videos:
            raise ConfigError("prune=fastvid prunes videos only and this dataset holds none; choose a video "
                              "dataset (e.g. dataset=synthetic dataset.variant=video)")

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        """Official and uniform alike: original positions at prefill and decode (OV:1072-1074)."""
        return Rules()

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    # ------------------------------------------------------------------------------ counts
    def official_plan(self, sizes: list[int], tokens: int, ratio: float) -> list[FramePlan]:
        """OV:932-952 for a clip of frames of `tokens` tokens: the context count of an anchor is capped at its
        candidates (the official topk would raise)."""
        o = self.options
        retain = int(tokens * ratio)
        salient = retain - int(retain * o.stprune_d)
        context = retain - salient
        counts = []
        for length in sizes:
            per_anchor = context * length // ((length + o.dtm_p - 1) // o.dtm_p)
            anchors = set(anchor_offsets(length, o.dtm_p))
            counts += [per_anchor if j in anchors else 0 for j in range(length)]
        plans = []
        for count in counts:  # OV:1010 and 1026 compare each frame's count with Cn
            merge = "frame" if count == context and context > 0 else "segment" if count > context else ""
            plans.append(FramePlan(salient, min(count, tokens - salient) if merge else 0, merge))
        return plans

    def uniform_plan(self, sizes: list[int], tokens: int, budgets: list[int]) -> list[FramePlan]:
        """Exact counts: each frame's share split by d, a segment's context pooled on its anchors."""
        d, plans, start = self.options.stprune_d, [], 0
        for length in sizes:
            shares = budgets[start : start + length]
            salient = [k - int(k * d) for k in shares]
            if length == 1:
                plans.append(FramePlan(salient[0], shares[0] - salient[0], "frame" if shares[0] > salient[0] else ""))
                start += 1
                continue
            anchors = anchor_offsets(length, self.options.dtm_p)
            total = sum(shares) - sum(salient)
            context = [0] * length
            for i, j in enumerate(anchors):  # evenly, the remainder to the later anchors
                context[j] = total // len(anchors) + (1 if i >= len(anchors) - total % len(anchors) else 0)
            excess = 0
            for j in anchors:
                over = max(0, context[j] - (tokens - salient[j]))
                context[j] -= over
                excess += over
            for j in range(length):
                extra = min(excess, tokens - salient[j] - context[j])
                salient[j] += extra
                excess -= extra
            plans += [FramePlan(salient[j], context[j], "segment" if context[j] else "") for j in range(length)]
            start += length
        return plans

    # ------------------------------------------------------------------------------ selection
    def select(self, ctx: StageContext, b: int, k: int) -> Selection:
        return self.selections(ctx, [None if i != b else k for i in range(len(ctx.n_current))])[b]

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        return pack(self.selections(ctx, budgets), ctx)

    def selections(self, ctx: StageContext, budgets: list[int | None]) -> list[Selection | None]:
        """Every sample's clips: signals and DySeg flags on the device, the flags read to the host ONCE for the
        batch (segment sizes set the counts), then each sample's selection (`_select`)."""
        official = ctx.protocol == "official"
        ignore = QWEN_IGNORE if self.options.dyseg_ignore is None else self.options.dyseg_ignore
        clips: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for b, k in enumerate(budgets):
            if k is None:
                continue
            current = ctx.hidden_states(b)
            work = current if official else current.float()
            vision = ctx.vision_inputs(b, -1) if ctx.family in QWEN_FAMILIES else None
            grids = ctx.grids(b)
            clips[b], offset, segment = [], 0, 0
            for frames, tokens, _ in clips_of(grids, ctx.family):  # Qwen3-VL: a video's (1, h, w) segments joined
                clip = work[offset : offset + frames * tokens].view(frames, tokens, -1)
                features, salience = frame_signals(clip)
                span = range(segment, segment + frames // grids[segment][0])  # the grids (encoder inputs) it spans
                if vision is not None:
                    dtype = vision[segment].hidden.dtype if official else torch.float32
                    salience = torch.cat([self.encoder_salience(ctx, vision[s], grids[s][0], tokens, dtype)
                                          for s in span]).to(clip.device)
                flags = cut_flags(features, self.options.dyseg_c, self.tau(), ignore)
                clips[b].append((clip, salience, flags))
                offset += frames * tokens
                segment = span.stop
            if offset != len(current):
                raise RuntimeError(f"sample {b}: its grids hold {offset} tokens but it has {len(current)} visual "
                                   "tokens")
        flags = [flag.flatten() for items in clips.values() for _, _, flag in items]
        host = iter(torch.cat(flags).tolist() if any(len(f) for f in flags) else [])
        selections: list[Selection | None] = []
        for b, k in enumerate(budgets):
            if k is None:
                selections.append(None)
                continue
            cuts = [[next(host) for _ in range(flag.numel())] for _, _, flag in clips[b]]
            selections.append(self._select(ctx, b, k, clips[b], cuts, official))
        return selections

    @staticmethod
    def encoder_salience(ctx: StageContext, rows: EncoderRows, frames: int, tokens: int, dtype: torch.dtype
                         ) -> torch.Tensor:
        """[frames, tokens] the Qwen salience of one encoded segment, from the last vision block's input rows."""
        queries, keys = ctx.encoder_queries_keys(ctx.vision_layers[-1], rows)
        return vision_salience(queries, keys, rows.token, frames, tokens, dtype)

    def _select(self, ctx: StageContext, b: int, k: int, clips: list, cuts: list[list[bool]], official: bool
                ) -> Selection:
        """Sample b's kept tokens and rows, clip by clip (positions into its current visual tokens); `cuts` holds
        each clip's two host flag rows (DySeg cuts, then the Qwen sub-segment marks), flattened."""
        generator = ctx.generator(b)
        frame_budgets = spread(k, [len(clip) * clip.shape[1] for clip, _, _ in clips for _ in range(len(clip))])
        orders, rows, offset, frame = [], [], 0, 0
        for (clip, salience, _), flags in zip(clips, cuts, strict=True):
            frames, tokens = clip.shape[:2]
            segments = segment_sizes(flags[: frames - 1])
            if official and ctx.family in QWEN_FAMILIES:
                plans = self.qwen_plan(segments, flags[frames - 1 :], tokens, self.ratio)
                order, merged = self.clip_qwen(clip, salience, segments, plans, generator)
            else:
                if official:
                    plans = self.official_plan(segments, tokens, self.ratio)
                else:
                    plans = self.uniform_plan(segments, tokens, frame_budgets[frame : frame + frames])
                order, merged = self.clip(clip, salience, segments, plans, generator)
            orders.append(offset + order)
            rows.append(merged)
            offset += frames * tokens
            frame += frames
        return Selection(torch.cat(orders), torch.cat(rows).to(ctx.hidden.dtype))

    def qwen_plan(self, sizes: list[int], ignore: list[bool], tokens: int, ratio: float) -> list[FramePlan]:
        """QW:1920-1989: per segment of L frames, L * int(P * ratio) tokens, context max(int(. * d), 1); in a
        multi-frame segment only the LAST frame of each sub-segment (adjacent cosine >= DySeg_ignore) keeps
        tokens: salient shares spread over the V sub-segments (remainder first), context over ceil(V / p)
        anchors (remainder first, each at most P // 2) placed every p-th sub-segment from the END."""
        o, plans, start = self.options, [], 0
        retain = int(tokens * ratio)
        for length in sizes:
            context = max(int(retain * length * o.stprune_d), 1)
            salient = max(retain * length - context, 0)  # the official topk of a negative count would raise
            if length == 1:
                plans.append(FramePlan(salient, min(context, tokens - salient), "qwen"))
                start += 1
                continue
            subs = segment_sizes(ignore[start : start + length - 1])
            count = len(subs)
            shares = [salient // count + (1 if i < salient % count else 0) for i in range(count)]
            anchors = (count + o.dtm_p - 1) // o.dtm_p
            pooled = [context // anchors + (1 if i < context % anchors else 0) for i in range(anchors)]
            contexts = [min(pooled[i // o.dtm_p], tokens // 2) if i % o.dtm_p == 0 else 0 for i in range(count)]
            contexts.reverse()
            for size, share, ctx_count in zip(subs, shares, contexts, strict=True):
                plans += [FramePlan(0, 0, "qwen")] * (size - 1)
                ctx_count = min(ctx_count, tokens // 2)
                plans.append(FramePlan(min(share, tokens - ctx_count), ctx_count, "qwen"))
            start += length
        return plans

    def clip_qwen(self, clip: torch.Tensor, salience: torch.Tensor, sizes: list[int], plans: list[FramePlan],
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """QW:1991-2089 for one clip [F, P, C]: per frame its salient tokens and density-peak context tokens
        (jitter drawn frame by frame); per segment, each frame's context tokens absorb the segment's tokens that
        are neither salient nor in that frame's context set (each set independently)."""
        tokens = clip.shape[1]
        order, rows, start = [], [], 0
        for length in sizes:
            flat = clip[start : start + length].reshape(length * tokens, -1)
            salient_all, contexts = [], []
            for f in range(length):
                plan = plans[start + f]
                salient = salience[start + f].topk(plan.salient).indices
                if plan.context:
                    rest = torch.ones(tokens, dtype=torch.bool, device=clip.device).index_fill_(0, salient, False)
                    rest = positions_of(rest[None], tokens - plan.salient)[0]
                    noise = (torch.rand(len(rest), generator=generator) * DENSITY_NOISE).to(clip.device)
                    picks = density_scores(clip[start + f, rest], noise).topk(plan.context).indices
                    contexts.append(f * tokens + rest[picks])
                salient_all.append(f * tokens + salient)
            salient_all = torch.cat(salient_all)
            unit = flat / flat.norm(dim=-1, keepdim=True)
            order.append(start * tokens + salient_all)
            rows.append(flat[salient_all])
            for targets in contexts:
                outside = torch.ones(length * tokens, dtype=torch.bool, device=clip.device)
                outside.index_fill_(0, torch.cat([salient_all, targets]), False)
                pool = positions_of(outside[None], length * tokens - len(salient_all) - len(targets))[0]
                similarity = unit[pool] @ unit[targets].T
                assign = torch.zeros_like(similarity).scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
                members = assign.sum(dim=0)[:, None]
                weight = (1 / (members + 1)).clamp(min=self.options.dtm_beta)
                merged = (assign.T @ flat[pool]) / members.clamp(min=1)
                order.append(start * tokens + targets)
                rows.append(weight * flat[targets] + (1 - weight) * merged)
            start += length
        return torch.cat(order), torch.cat(rows)

    def clip(self, clip: torch.Tensor, salience: torch.Tensor, sizes: list[int], plans: list[FramePlan],
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip [F, P, C]: (kept positions within the clip, their rows), salient then context per frame."""
        frames, tokens, _ = clip.shape
        candidates = [tokens - plan.salient for plan in plans]
        noise = torch.rand(sum(candidates), generator=generator) * DENSITY_NOISE  # one draw per clip (OV:979)
        noise = noise.to(clip.device).split(candidates)
        order, rows, pools, scores = [], [], [], []
        for f, plan in enumerate(plans):
            salient = salience[f].topk(plan.salient).indices
            rest = torch.ones(tokens, dtype=torch.bool, device=clip.device).index_fill_(0, salient, False)
            rest = positions_of(rest[None], candidates[f])[0]
            order.append(f * tokens + salient)
            rows.append(clip[f, salient])
            pools.append((rest, clip[f, rest]))
            scores.append(density_scores(clip[f, rest], noise[f]) if plan.context and candidates[f] else None)
        start = 0
        for length in sizes:
            segment = range(start, start + length)
            pool = torch.cat([pools[f][1] for f in segment])
            for f in segment:
                plan = plans[f]
                if not plan.context:
                    continue
                picks = scores[f].topk(plan.context).indices
                rest, candidates_f = pools[f]
                targets = candidates_f[picks]
                members = candidates_f if plan.merge == "frame" else pool
                order.append(f * tokens + rest[picks])
                rows.append(merge_into(members, targets, self.options.dtm_beta))
            start += length
        return torch.cat(order), torch.cat(rows)
