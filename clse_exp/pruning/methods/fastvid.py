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
- The batch is selected at once (signals per clip shape, one read of the DySeg flags, padded top-k, density and
  merges for every frame and anchor of the batch). Each top-k keeps its own k (tied scores are ordered by k), and
  the jitter is drawn per sample in the per-sample order. The merges' products run over padded rows, which BLAS
  may round in the last bit unlike a product of the exact size, so a merged row can differ from the per-merge
  computation by float ulps (and a member nearly equidistant from two targets, to ~1e-7, can join the other).
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
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from clse_exp.efficiency.counts import host_side, upload
from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import (
    BatchSelection,
    Layers,
    MethodOptions,
    ModelFacts,
    PruningMethod,
    Rules,
)
from clse_exp.pruning.methods.vidcom2 import clips_of
from clse_exp.pruning.methods.visionzip import per_token
from clse_exp.pruning.ragged import CDIST_BY_PRODUCTS_ABOVE, alone_cdist, assemble, device_ints, windows
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
    """(global features [..., F, C], salience [..., F, P]) of clips' embeddings [..., F, P, C]: the frame mean,
    and the softmax over the frame of each token's product with that mean / sqrt(C) (see the module docstring)."""
    mean = frames.mean(dim=-2)
    logits = torch.einsum("...pc,...c->...p", frames, mean) / frames.shape[-1] ** 0.5
    return mean, torch.softmax(logits, dim=-1)


def cut_flags(features: torch.Tensor, c: int, tau: float, ignore: float) -> torch.Tensor:
    """DySeg (OV:912-919, QW:1899-1905) of clips' features [G, F, C]: [G, 2, F-1] bool on the device: row 0 cuts
    after each of the min(c-1, F-1) least similar adjacent frame pairs and after every pair of cosine below tau;
    row 1 marks the pairs below `ignore` (the Qwen port's sub-segments, QW:1937-1938)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = (unit[:, :-1] * unit[:, 1:]).sum(dim=-1)
    cut = similarity < tau
    lowest = min(c - 1, similarity.shape[-1])
    if lowest > 0:
        cut = cut.scatter(-1, similarity.topk(lowest, dim=-1, largest=False).indices, True)
    return torch.stack([cut, similarity < ignore], dim=-2)


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


def density_scores(tokens: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor, sizes: list[int]
                   ) -> torch.Tensor:
    """DPC score of frames' candidate tokens [U, M, C] (OV:975-987), parent distance x local density; `valid`
    [U, M] marks each frame's real candidates (padding scores -inf), `sizes` their counts. The distances are
    those torch.cdist gives each frame alone (ragged.alone_cdist), so padding does not switch a frame's formula."""
    x = tokens.float()
    fewest = min(sizes)
    dist = alone_cdist(x, sizes) / tokens.shape[-1] ** 0.5
    columns = valid[:, None, :]
    nearest = dist.masked_fill(~columns, math.inf).topk(min(NEIGHBOURS, dist.shape[-1]), dim=-1, largest=False)
    squares = nearest.values**2
    if fewest >= NEIGHBOURS:
        mean_square = squares.mean(dim=-1)
    else:  # fewer than 4 candidates: the mean of all of them
        count = valid.sum(dim=-1, keepdim=True).clamp(max=NEIGHBOURS)
        used = torch.arange(squares.shape[-1], device=x.device) < count
        mean_square = squares.masked_fill(~used, 0).sum(dim=-1) / count
    density = (-mean_square).exp() + noise.to(dist.dtype)
    denser = (density[:, None, :] > density[:, :, None]) & columns
    farthest = dist.masked_fill(~(columns & valid[:, :, None]), -math.inf).amax(dim=(1, 2))
    parent = torch.where(denser, dist, farthest[:, None, None]).masked_fill(~columns, math.inf).amin(dim=-1)
    return (parent * density).masked_fill(~valid, -math.inf)


def merge_in_samples(work: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, pool: torch.Tensor,
                     beta: float, qwen: bool) -> torch.Tensor:
    """DTM (OV:996-1008, QW:2050-2074) for S merges per sample at once, in each sample's own layout: the tokens of
    work [B, N, C] that pool [B, S, N] marks for a merge join its target (positions targets [B, S, c], real where
    `valid`) of highest cosine; each target becomes w * target + (1 - w) * mean(members), w = max(1 / (members +
    1), beta). Returns [B * S, c, C]. A merge's member sum is a product over all N tokens with zero weight off its
    pool (its members in token order, as in the per-merge product, though BLAS may round a product of another
    length differently in the last bit); the OV and Qwen codes round the mean in different orders."""
    batch, tokens, channels = work.shape
    merges, width = targets.shape[1:]
    unit = work / work.norm(dim=-1, keepdim=True)
    index = targets.view(batch, merges * width, 1).expand(-1, -1, channels)
    rows = work.gather(1, index)
    similarity = (unit @ unit.gather(1, index).transpose(1, 2)).view(batch, tokens, merges, width)
    similarity = similarity.masked_fill(~valid[:, None], -math.inf)
    assign = torch.zeros_like(similarity).scatter_(3, similarity.argmax(dim=3, keepdim=True), 1)
    assign = assign.masked_fill(~pool.transpose(1, 2)[..., None], 0).view(batch, tokens, merges * width)
    members = assign.sum(dim=1)[..., None]
    weight = (1 / (members + 1)).clamp(min=beta)
    total = assign.transpose(1, 2) @ work
    if qwen:
        merged = weight * rows + (1 - weight) * (total / members.clamp(min=1))
    else:
        merged = weight * rows + (1 - weight) * total / members.clamp(min=1)
    return merged.view(batch * merges, width, channels)


def top_runs(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[sum(counts)] the indices of each row's counts[i] top `scores` [R, M], row after row (rows of one count
    adjacent): one top-k per count, written in place, so no row's k is another's."""
    out = torch.empty(sum(counts), dtype=torch.long, device=scores.device)
    values = scores.new_empty(sum(counts))
    row = at = 0
    for count, group in itertools.groupby(counts):
        size = len(list(group))
        if count:
            shape = (size, count)
            torch.topk(scores[row : row + size], count, dim=-1,
                       out=(values[at : at + size * count].view(shape), out[at : at + size * count].view(shape)))
        row, at = row + size, at + size * count
    return out


def runs_of(values: list[int], counts: torch.Tensor, total: int) -> torch.Tensor:
    """[total] each host value repeated its count times (`counts` on the device, summing to `total`), on the
    device without a read back."""
    return torch.repeat_interleave(device_ints(values, counts.device), counts, output_size=total)


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


@dataclasses.dataclass(frozen=True)
class Frame:
    """One frame of the batch's plan: its sample, its first token among the sample's visual tokens, its size,
    its row among the batch's frames of that size (the stacked saliences), and its counts."""

    sample: int
    start: int
    tokens: int
    row: int
    plan: FramePlan


@dataclasses.dataclass(frozen=True)
class Unit:
    """One merge: a frame with context tokens and the window of its sample's tokens whose pool it merges (its
    own frame, or its segment), as (first token, length)."""

    frame: Frame
    start: int
    length: int


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

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Every clip of the batch at once: signals and DySeg flags per clip shape, the flags read to the host ONCE
        (segment sizes set the counts), then the salient top-k of all frames, the density peaks of all context
        frames and the merges of all anchors, each as one padded batch; the jitter is drawn per sample on the host
        as the per-sample code draws it and uploaded once."""
        official = ctx.protocol == "official"
        qwen = official and ctx.family in QWEN_FAMILIES
        work = ctx.visual_hidden() if official else ctx.visual_hidden().float()
        batch, width, channels = work.shape
        groups, clips = self.clip_groups(ctx, budgets)
        salience, cuts = self.signals(ctx, work, groups, official)
        frames, clip_frames, units, pieces = self.plan_batch(ctx, budgets, groups, clips, cuts, official)
        counts = [n if k is None else sum(count for _, _, count in pieces[b])
                  for b, (k, n) in enumerate(zip(budgets, ctx.n_current, strict=True))]
        keep = max(counts, default=0)
        if keep == 0:
            return BatchSelection(work.new_zeros(batch, 0, dtype=torch.long), counts, width,
                                  ctx.hidden.new_zeros(batch, 0, channels), [0] * batch)
        device = work.device
        salient, sal_order, sal_source, sal_runs = self.salient_tokens(salience, frames, width, batch, device)
        if units:
            merged, tgt_order, tgt_source, tgt_runs = self.merged_rows(ctx, work, salient, clip_frames, units, qwen)
        else:
            merged, tgt_order, tgt_source, tgt_runs = work.new_zeros(0, 0, channels), work.new_zeros(0), None, []
        source = torch.cat([work.flatten(0, 1), merged.flatten(0, 1), work.new_zeros(1, channels)])
        arange = torch.arange(width, device=device)
        flat = torch.arange(batch * width, device=device).view(batch, width)
        order_rows: list[list[torch.Tensor]] = []
        source_rows: list[list[torch.Tensor]] = []
        for b, k in enumerate(budgets):
            if k is None:
                order_rows.append([arange[: ctx.n_current[b]]])
                source_rows.append([flat[b, : ctx.n_current[b]]])
                continue
            order_rows.append([])
            source_rows.append([])
            for kind, what, count in pieces[b]:
                if kind == "salient":
                    at = sal_runs[what.tokens][what.row]
                    order_rows[b].append(sal_order[what.tokens][at : at + count])
                    source_rows[b].append(sal_source[what.tokens][at : at + count])
                else:
                    at = tgt_runs[what]
                    order_rows[b].append(tgt_order[at : at + count])
                    source_rows[b].append(tgt_source[at : at + count])
        order = assemble(order_rows, keep, width)
        hidden = source[assemble(source_rows, keep, len(source) - 1)].to(ctx.hidden.dtype)
        return BatchSelection(order, counts, width, hidden, [0] * batch)

    def clip_groups(self, ctx: StageContext, budgets: list[int | None]
                    ) -> tuple[dict[tuple[int, int], list[tuple[int, int, int]]], dict[int, list]]:
        """The batch's clips by shape (frames, tokens per frame): per shape its (sample, first token, clip index)
        places; per sample its clips as (shape, index in the shape's group, first token)."""
        groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        clips: dict[int, list] = {}
        for b, k in enumerate(budgets):
            if k is None:
                continue
            clips[b], end = [], 0
            for c, (frames, tokens, offset) in enumerate(clips_of(ctx.grids(b), ctx.family)):
                members = groups.setdefault((frames, tokens), [])
                clips[b].append(((frames, tokens), len(members), offset))
                members.append((b, offset, c))
                end = offset + frames * tokens
            if end != ctx.n_current[b]:
                raise RuntimeError(f"sample {b}: its grids hold {end} tokens but it has {ctx.n_current[b]} visual "
                                   "tokens")
        return groups, clips

    def signals(self, ctx: StageContext, work: torch.Tensor, groups: dict, official: bool
                ) -> tuple[dict[tuple[int, int], torch.Tensor], dict[tuple[tuple[int, int], int], list[bool]]]:
        """Per clip shape the salience [G, F, P] of its clips, and per clip its host DySeg flags (cuts, then the
        Qwen sub-segment marks), read in ONE transfer for the batch."""
        ignore = QWEN_IGNORE if self.options.dyseg_ignore is None else self.options.dyseg_ignore
        encoded = self.encoder_saliences(ctx, groups, official) if ctx.family in QWEN_FAMILIES else None
        salience, flags = {}, []
        for shape, places in groups.items():
            frames, tokens = shape
            clip = windows(work, [(b, offset) for b, offset, _ in places], frames * tokens)
            features, salience[shape] = frame_signals(clip.view(len(places), frames, tokens, -1))
            if encoded is not None:
                salience[shape] = encoded[shape].to(work.device)
            flags.append(cut_flags(features, self.options.dyseg_c, self.tau(), ignore).flatten())
        host = torch.cat(flags).tolist() if any(f.numel() for f in flags) else []
        cuts, at = {}, 0
        for (frames, tokens), places in groups.items():
            for i in range(len(places)):
                cuts[(frames, tokens), i] = host[at : at + 2 * (frames - 1)]
                at += 2 * (frames - 1)
        return salience, cuts

    def encoder_saliences(self, ctx: StageContext, groups: dict, official: bool) -> dict[tuple[int, int], torch.Tensor]:
        """Per clip shape the Qwen salience [G, F, P] of its clips from the last vision block: the encoded segments
        they span (one per video, or one per temporal patch on Qwen3-VL) packed into one row set, so the block's
        queries and keys and the probe run once per shape."""
        spans: dict[tuple[int, int], list] = {}  # (sample, clip) -> its encoded segments with their frame counts
        for b in sorted({b for places in groups.values() for b, _, _ in places}):
            vision, grids, segment = ctx.vision_inputs(b, -1), ctx.grids(b), 0
            for c, (frames, _, _) in enumerate(clips_of(grids, ctx.family)):
                span = range(segment, segment + frames // grids[segment][0])
                spans[b, c] = [(vision[s], grids[s][0]) for s in span]
                segment = span.stop
        out = {}
        for (frames, tokens), places in groups.items():
            encoded = [item for b, _, c in places for item in spans[b, c]]
            dtype = encoded[0][0].hidden.dtype if official else torch.float32
            if len({(t, len(rows.hidden)) for rows, t in encoded}) > 1:  # segments of several shapes: one by one
                out[frames, tokens] = torch.cat([self.encoder_salience(ctx, rows, t, tokens, dtype)
                                                 for rows, t in encoded]).view(len(places), frames, tokens)
                continue
            first, t = encoded[0]
            count = len(encoded)
            shift = torch.arange(count, device=first.token.device)[:, None] * (t * tokens)
            packed = dataclasses.replace(
                first, hidden=torch.cat([rows.hidden for rows, _ in encoded]),
                cos=torch.cat([rows.cos for rows, _ in encoded]), sin=torch.cat([rows.sin for rows, _ in encoded]),
                token=(torch.stack([rows.token for rows, _ in encoded]) + shift).flatten(), blocks=[])
            salience = self.encoder_salience(ctx, packed, count * t, tokens, dtype)
            out[frames, tokens] = salience.view(len(places), frames, tokens)
        return out

    @staticmethod
    def encoder_salience(ctx: StageContext, rows: EncoderRows, frames: int, tokens: int, dtype: torch.dtype
                         ) -> torch.Tensor:
        """[frames, tokens] the Qwen salience of encoded rows (one segment, or several packed), from the last
        vision block's input."""
        queries, keys = ctx.encoder_queries_keys(ctx.vision_layers[-1], rows)
        return vision_salience(queries, keys, rows.token, frames, tokens, dtype)

    def plan_batch(self, ctx: StageContext, budgets: list[int | None], groups: dict, clips: dict, cuts: dict,
                   official: bool) -> tuple[dict[int, list[Frame]], dict[int, list[list[Frame]]], list[Unit], dict]:
        """The host plan of the batch: per frame size its frames in the row order of the stacked saliences, per
        sample its clips' frames, the merge units (one per frame with context tokens, with its window of the
        sample's tokens), and per sample its kept pieces in order: ('salient', frame, count) and ('target', unit,
        count)."""
        qwen = official and ctx.family in QWEN_FAMILIES
        bases: dict[tuple[int, int], int] = {}
        sizes: dict[int, int] = {}
        for (length, tokens), places in groups.items():
            bases[length, tokens] = sizes.get(tokens, 0)
            sizes[tokens] = bases[length, tokens] + len(places) * length
        frames: dict[int, list[Frame]] = {}
        clip_frames: dict[int, list[list[Frame]]] = {}
        units: list[Unit] = []
        pieces: dict[int, list] = {}
        for b, k in enumerate(budgets):
            if k is None:
                continue
            shares = spread(k, [shape[0] * shape[1] for shape, _, _ in clips[b] for _ in range(shape[0])])
            first, pieces[b], clip_frames[b] = 0, [], []
            for (length, tokens), i, offset in clips[b]:
                flags = cuts[(length, tokens), i]
                segments = segment_sizes(flags[: length - 1])
                if qwen:
                    plans = self.qwen_plan(segments, flags[length - 1 :], tokens, self.ratio)
                elif official:
                    plans = self.official_plan(segments, tokens, self.ratio)
                else:
                    plans = self.uniform_plan(segments, tokens, shares[first : first + length])
                first += length
                row = bases[length, tokens] + i * length
                clip = [Frame(b, offset + f * tokens, tokens, row + f, plan) for f, plan in enumerate(plans)]
                frames.setdefault(tokens, []).extend(clip)
                clip_frames[b].append(clip)
                salient, targets, start = [], [], 0
                for size in segments:
                    segment = clip[start : start + size]
                    segment_salient = [("salient", frame, frame.plan.salient) for frame in segment]
                    segment_targets = []
                    for frame in segment:
                        if frame.plan.context:
                            own = frame.plan.merge == "frame"
                            window = (frame.start, tokens) if own else (offset + start * tokens, size * tokens)
                            segment_targets.append(("target", len(units), frame.plan.context))
                            units.append(Unit(frame, *window))
                    if qwen:  # per segment: its salient tokens, then each context set (QW:2043-2089)
                        pieces[b] += segment_salient + segment_targets
                    else:  # the whole clip's salient tokens, then its context sets (OV:1063)
                        salient += segment_salient
                        targets += segment_targets
                    start += size
                pieces[b] += salient + targets
        return {t: sorted(rows, key=lambda frame: frame.row) for t, rows in frames.items()}, clip_frames, units, pieces

    def salient_tokens(self, salience: dict, frames: dict[int, list[Frame]], width: int, batch: int,
                       device: torch.device) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor],
                                                      dict[int, dict[int, int]]]:
        """Every frame's salient top-k, one top-k per frame size and salient count (a top-k orders tied scores by
        its k, so each frame keeps its own k), written back to back: the [B, width] mask of the salient tokens,
        per size the kept positions (into each sample's tokens) and rows of the flattened [B * width] tokens of
        all its frames in a row, and where each frame's run starts there."""
        mask = torch.zeros(batch * width, dtype=torch.bool, device=device)
        order, source, where = {}, {}, {}
        for tokens, rows in frames.items():
            scores = torch.cat([s.flatten(0, 1) for shape, s in salience.items() if shape[1] == tokens])
            ranked = sorted(rows, key=lambda frame: frame.plan.salient)  # stable: row order within a count
            if any(frame.row != i for i, frame in enumerate(ranked)):
                scores = scores[device_ints([frame.row for frame in ranked], device)]
            counts = [frame.plan.salient for frame in ranked]
            top, where[tokens] = top_runs(scores, counts), {}
            for frame, at in zip(ranked, itertools.accumulate([0, *counts]), strict=False):
                where[tokens][frame.row] = at
            repeats, total = device_ints(counts, device), sum(counts)
            starts = runs_of([frame.start for frame in ranked], repeats, total)
            bases = runs_of([frame.sample * width + frame.start for frame in ranked], repeats, total)
            order[tokens], source[tokens] = starts + top, bases + top
            mask.scatter_(0, source[tokens], True)
        return mask.view(batch, width), order, source, where

    def merged_rows(self, ctx: StageContext, work: torch.Tensor, salient: torch.Tensor,
                    clip_frames: dict[int, list[list[Frame]]], units: list[Unit], qwen: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Every merge unit at once: the [B * S, c, C] merged rows (S the most units of a sample), and for all
        units' targets back to back their positions into the sample's tokens and their rows of
        [B * width tokens, merged rows], with where each unit's run starts. Each unit's frame picks its density
        peaks among its non-salient tokens (padded, per frame size and torch.cdist path; one top-k per context
        count), then every unit merges its window's pool into them, in the samples' own layout."""
        batch, width, channels = work.shape
        device = work.device
        sets: dict[tuple[int, bool], list[int]] = {}  # (frame size, cdist by products) -> units
        for u, unit in enumerate(units):
            candidates = unit.frame.tokens - unit.frame.plan.salient
            sets.setdefault((unit.frame.tokens, candidates > CDIST_BY_PRODUCTS_ABOVE), []).append(u)
        for members in sets.values():  # by context count (stable), so each count's top-k runs on a slice
            members.sort(key=lambda u: units[u].frame.plan.context)
        rank = [u for members in sets.values() for u in members]
        ranked = [units[u] for u in rank]
        noise = self.jitter(ctx, clip_frames, [unit.frame for unit in ranked], qwen, device)
        flat = work.flatten(0, 1)
        picks, at = [], 0
        for (tokens, _), members in sets.items():
            rows = [units[u].frame for u in members]
            candidates = [tokens - frame.plan.salient for frame in rows]
            breadth = max(candidates)
            own = windows(salient, [(frame.sample, frame.start) for frame in rows], tokens)
            rest = positions_of(~own, breadth)
            bases = device_ints([frame.sample * width + frame.start for frame in rows], device)[:, None]
            valid = torch.arange(breadth, device=device) < device_ints(candidates, device)[:, None]
            scores = density_scores(flat[bases + rest], valid, noise[at : at + len(rows), :breadth], candidates)
            counts = [frame.plan.context for frame in rows]
            chosen = top_runs(scores, counts)
            rows_of = runs_of([i * breadth for i in range(len(rows))], device_ints(counts, device), sum(counts))
            picks.append(rest.flatten()[rows_of + chosen])
            at += len(rows)
        chosen = torch.cat(picks) if len(picks) > 1 else picks[0]  # frame positions, unit after unit
        counts = [unit.frame.plan.context for unit in ranked]
        repeats, total = device_ints(counts, device), sum(counts)
        positions = runs_of([unit.frame.start for unit in ranked], repeats, total) + chosen
        # merges, in the sample's own layout: slot j of sample b holds its j-th unit
        per_sample = max(sum(unit.frame.sample == b for unit in ranked) for b in range(batch))
        slots, taken = [], [0] * batch
        for unit in ranked:
            slots.append(unit.frame.sample * per_sample + taken[unit.frame.sample])
            taken[unit.frame.sample] += 1
        count, most = batch * per_sample, max(counts)
        entry = torch.arange(len(chosen), device=device)
        firsts = list(itertools.accumulate([0, *counts]))[:-1]
        slot_of = runs_of([slot * most for slot in slots], repeats, total) + entry - runs_of(firsts, repeats, total)
        targets = positions.new_zeros(count * most).scatter_(0, slot_of, positions).view(count, most)
        at_slot: list[Unit | None] = [None] * count
        for slot, unit in zip(slots, ranked, strict=True):
            at_slot[slot] = unit

        def per_slot(value: Callable[[Unit], int]) -> torch.Tensor:
            return device_ints([0 if unit is None else value(unit) for unit in at_slot], device)

        valid = torch.arange(most, device=device) < per_slot(lambda unit: unit.frame.plan.context)[:, None]
        spans = torch.arange(width, device=device)
        starts = per_slot(lambda unit: unit.start).view(batch, per_sample, 1)
        ends = per_slot(lambda unit: unit.start + unit.length).view(batch, per_sample, 1)
        pool = (spans >= starts) & (spans < ends) & ~salient[:, None, :]
        if qwen:  # a context set's own targets are not its members (QW:2052-2053)
            own = torch.zeros(count, width + 1, dtype=torch.bool, device=device)
            own.scatter_(1, targets.masked_fill(~valid, width), True)
            pool &= ~own[:, :width].view(batch, per_sample, width)
        merged = merge_in_samples(work, targets.view(batch, per_sample, most), valid.view(batch, per_sample, most),
                                  pool, self.options.dtm_beta, qwen)
        runs = [0] * len(units)
        for u, first in zip(rank, firsts, strict=True):
            runs[u] = first
        return merged, positions, batch * width + slot_of, runs

    def jitter(self, ctx: StageContext, clip_frames: dict[int, list[list[Frame]]], frames: list[Frame], qwen: bool,
               device: torch.device) -> torch.Tensor:
        """[len(frames), M] the density jitter of `frames`, drawn on the host from each sample's generator in the
        per-sample code's order (OV: one draw per clip over every frame's candidates, OV:979; Qwen: one per
        context frame), padded with zeros and uploaded once."""
        drawn: dict[tuple[int, int], torch.Tensor] = {}
        with host_side():
            for b, clips in clip_frames.items():
                generator = ctx.generator(b)
                for clip in clips:
                    candidates = [frame.tokens - frame.plan.salient for frame in clip]
                    if qwen:
                        for frame, count in zip(clip, candidates, strict=True):
                            if frame.plan.context:
                                drawn[b, frame.start] = torch.rand(count, generator=generator) * DENSITY_NOISE
                        continue
                    draws = (torch.rand(sum(candidates), generator=generator) * DENSITY_NOISE).split(candidates)
                    drawn.update(((b, frame.start), draw) for frame, draw in zip(clip, draws, strict=True))
            table = torch.zeros(len(frames), max(frame.tokens - frame.plan.salient for frame in frames))
            for row, frame in enumerate(frames):
                draw = drawn[frame.sample, frame.start]
                table[row, : len(draw)] = draw
        return upload(table, device)

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

