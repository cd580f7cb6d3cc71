"""VidCom2 (Liu et al., EMNLP 2025): per-frame token budgets from frame uniqueness, then per frame the tokens most
distinct from both the video and the frame, before the LLM; nothing is merged.

Official code (xuyang-liu16/VidCom2@944a17d14f4848ad080a65eab2b0711a760fa154, branch main; the `qwen` and `llava`
branches carry byte-identical token_compressor/vidcom2/ files), cited VC:<file>:<lines> with `vidcom2.py` =
token_compressor/vidcom2/vidcom2.py and `models/` = token_compressor/vidcom2/models/:
- Signal: one video's LLM input embeddings flattened to [F * P, C]: LLaVA-OneVision's projected, 2x2-pooled frames
  before the one newline token is appended (models/llava.py:152-168, `one_token` newline, `unpad` merge type);
  Qwen2-VL's merger output (models/qwen2_vl.py:32-43), Qwen2.5-VL's and Qwen3-VL's get_video_features output split
  per video (models/qwen2_5_vl.py:132-151, models/qwen3_vl.py:134-160). P = 196 on LLaVA-OneVision-7B
  (vidcom2.py:8, its pooled 14 x 14 grid), h * w / merge^2 per temporal patch on Qwen (models/qwen2_5_vl.py:24-25).
- Channels (vidcom2.py:38-43): variance of every channel over all F * P tokens (biased); the int(C * 0.5) channels
  of LOWEST variance (topk largest=False) are kept, in topk order.
- Scores (vidcom2.py:45-62): tokens L2-normalised on those channels, [F, P, c]; video centre = mean of all tokens,
  frame centre = mean of the frame's tokens; similarity to a centre = sum over alpha in 2^-3..2^1 of
  exp(-||x - centre||^2 / (2 alpha)). vid_score and frame_score are [F, P].
- Frame budgets (vidcom2.py:31-32, 64-68, 72): frame uniqueness u = -mean_p vid_score; probs = softmax((u - max u)
  / 0.01) over frames; scale_f = R (1 + probs_f - mean probs), clamped at 1; k_f = round(scale_f * P) (half to
  even), at least 1. R = R_RATIO (default 0.25, README "Env knobs").
- Tokens (vidcom2.py:33, 70-78): per frame the k_f tokens of LOWEST vid_score + frame_score (the outliers), sorted;
  frame offsets f * P added (vidcom2.py:89-90, 99-103), so the kept tokens stay in original order.
- Positions: LLaVA-OneVision feeds the shorter sequence, arange positions (models/llava.py:340-353): compact
  prefill, decode from the cache length. Qwen2/2.5/3-VL slice the position ids get_rope_index computed for the
  unpruned prompt (models/qwen2_vl.py:126-156, models/qwen2_5_vl.py:89-118, 171-175, qwen3_vl.py:190) and decode
  from its rope deltas: original M-RoPE positions at prefill and decode (pre_llm_rules). Qwen3-VL's DeepStack rows
  are cut at the same tokens (models/qwen3_vl.py:156-165; the engine does so for every kept set).
- Only videos are compressed; images pass untouched (models/llava.py:174-236, the image branches;
  models/qwen2_5_vl.py:120-125, pixel_values_videos only).

Here: a cut at layer 0 on the layer-0 input (the embeddings above); R = keep (a pre-LLM cut: average = final);
`official` reproduces the count rule, so a sample keeps sum_f k_f tokens, which departs from round(keep * N) by the
per-frame rounding and the floor/clamp (the run says so once; a sample keeping fewer is flagged budget_unreachable).
`uniform`: the same scores in float32 and exactly k = round(keep * N) tokens at their original positions: k is
shared over the sample's clips in proportion to their size (cumulative rounding), and within a clip apportioned to
the frames in proportion to w_f = 1 + probs_f - mean probs (the official scale over R) by Webster's method, i.e. the
k smallest (rank_f(token) + 1/2) / w_f, rank by the official outlier score (ties to the earlier frame); a frame
cannot give more than its P tokens, so the clamp at 1 is built in. Where the official per-frame counts sum to k,
the two protocols keep the same tokens. Knobs: `channel_ratio` (select_low_var_channels' ratio, 0.5) and
`temperature` (compute_scales' temp, 0.01), the official functions' own parameters.

Departures (documented, not silent):
- A grid of one frame is compressed as a one-frame clip (scale = R): the stage context does not tell an image from a
  one-frame video, and the official code leaves images whole (so a prompt mixing images and a video keeps fewer
  image tokens here). Datasets without any video are refused.
- Qwen3-VL lays a video out as one (1, h, w) segment per temporal patch (timestamps between them): a sample's
  consecutive one-frame grids of the same size are taken as one video, so two same-size videos (or images) side by
  side in one Qwen3-VL prompt would be scored as one clip.
- Qwen2-VL: the official code places the video at a hard-coded sequence offset 15 (models/qwen2_vl.py:100-105) and
  scores all videos of the batch as one tensor; here each video's own tokens are scored on their own.
- Batches: the Qwen2.5-VL / Qwen3-VL ports switch compression OFF for a batch of more than one prompt
  (models/qwen2_5_vl.py:127-130, models/qwen3_vl.py:129-132); here every sample is compressed, as alone.
- LLaVA-OneVision's P: the video's own pooled grid (3 x 3 on the tiny model), the official constant 196 on the 7B.
- Ties in the per-frame ranking resolve to the lower index (stable sort); the official topk is unordered.
- The official count needs one host read per batch (the kept total of every sample, after all the scoring);
  `uniform` reads nothing back. The batch's clips of one shape (and, under `uniform`, one share of the budget)
  are scored as one tensor, so the work grows with the number of clip shapes in a batch, not with its size.
Other families (LLaVA-1.5, Video-LLaVA, InternVL: no official port) are refused before any weights load; the
official LLaVA-Video path (grid newlines, vidcom2.py:9, 93-96, 105-115) has no family in the engine.
"""

from __future__ import annotations

import dataclasses

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
from clse_exp.pruning.ragged import assemble, windows
from clse_exp.pruning.signals import StageContext

FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # the official ports (VC:README.md table)
ALPHAS = tuple(2.0**e for e in range(-3, 2))  # Gaussian kernel widths (VC:vidcom2.py:54)
MAX_SCALE = 1.0  # a frame keeps at most all its tokens (VC:vidcom2.py:68)


# ---------------------------------------------------------------------------------------------- scoring
# Every function takes a leading group dimension [G, ...]: the batch's clips of one shape are scored together.
def low_variance_channels(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[G, N, c]: per clip, the int(C * ratio) channels of x [G, N, C] with the lowest biased variance over its
    tokens, in topk order."""
    variance = x.var(dim=1, unbiased=False)
    picked = variance.topk(int(x.shape[-1] * ratio), dim=-1, largest=False).indices
    return x.gather(2, picked[:, None, :].expand(-1, x.shape[1], -1))


def kernel_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Sum of Gaussian kernels exp(-d^2 / (2 alpha)) over ALPHAS of each token of x to `centre` (broadcast)."""
    distance = ((x - centre) ** 2).sum(dim=-1)
    total = torch.zeros_like(distance)
    for alpha in ALPHAS:
        total = total + torch.exp(-distance / (2 * alpha))
    return total


def clip_scores(features: torch.Tensor, frames: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(video similarity, frame similarity), each [G, F, P], of clips' tokens [G, F * P, C]: L2-normalised
    low-variance channels compared with the clip's mean token and with their frame's mean token."""
    selected = low_variance_channels(features, ratio)
    unit = F.normalize(selected.reshape(len(selected), frames, -1, selected.shape[-1]), dim=-1)
    video = kernel_similarity(unit, unit.mean(dim=(1, 2), keepdim=True))
    frame = kernel_similarity(unit, unit.mean(dim=2, keepdim=True))
    return video, frame


def frame_weights(video: torch.Tensor, temperature: float) -> torch.Tensor:
    """[G, F] 1 + p_f - mean(p): p is the softmax over a clip's frames of their uniqueness (-mean video
    similarity) at `temperature`; the official scale is keep times this, clamped at 1."""
    uniqueness = -video.mean(dim=-1)
    probs = torch.softmax((uniqueness - uniqueness.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    return 1 + probs - probs.mean(dim=-1, keepdim=True)


def official_frame_counts(weights: torch.Tensor, keep: float, per_frame: int) -> torch.Tensor:
    """[..., F] long: round(min(keep * w_f, 1) * P), at least 1, on the device (half to even, as torch.round)."""
    scale = (keep * weights).clamp(max=MAX_SCALE)
    return (scale * per_frame).round().long().clamp(min=1)


def within_frame_rank(outlier: torch.Tensor) -> torch.Tensor:
    """[..., F, P] long: each token's rank in its frame by ascending outlier score (0 = most distinct; ties to the
    lower index)."""
    order = outlier.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def webster_mask(rank: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """[..., F, P] bool: per clip exactly k tokens, apportioned to frames in proportion to `weights` [..., F] by
    Webster's method (the k smallest (rank + 1/2) / w_f; ties to the earlier frame), each frame's own lowest ranks
    first."""
    priority = ((rank.double() + 0.5) / weights.double()[..., None]).flatten(-2)
    picked = priority.argsort(dim=-1, stable=True)[..., :k]
    mask = torch.zeros_like(priority, dtype=torch.bool)
    return mask.scatter_(-1, picked, True).view_as(rank)


def shares(k: int, sizes: list[int]) -> list[int]:
    """k over parts of `sizes` tokens in proportion to their size, by cumulative rounding (sums to k)."""
    total, out, done, seen = sum(sizes), [], 0, 0
    for size in sizes:
        seen += size
        upto = round(k * seen / total) if total else 0
        out.append(upto - done)
        done = upto
    return out


def clips_of(grids: list[tuple[int, int, int]], family: str) -> list[tuple[int, int, int]]:
    """(frames, tokens per frame, first token offset) per clip of a sample's grids; on Qwen3-VL consecutive
    one-frame grids of one size are one video's temporal patches (its timestamps split them into segments)."""
    clips: list[list[int]] = []
    offset, previous = 0, None
    for t, h, w in grids:
        if family == "qwen3_vl" and t == 1 and previous == (h, w) and clips:
            clips[-1][0] += 1
        else:
            clips.append([t, h * w, offset])
        previous = (h, w) if t == 1 else None
        offset += t * h * w
    return [(t, p, at) for t, p, at in clips]


# ---------------------------------------------------------------------------------------------- method
class VidCom2(PruningMethod):
    name = "vidcom2"
    ratio: float = 0.25  # the run's keep (the official R_RATIO), set when the pruner binds (check_budget)
    official: bool = True  # whether the official count rule applies, set there too

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "vidcom2"
        channel_ratio: float = 0.5  # share of channels (lowest variance) the scores read (VC:vidcom2.py:38)
        temperature: float = 0.01  # softmax temperature of the frame uniqueness (VC:vidcom2.py:64)

    def validate(self) -> None:
        o = self.options
        if not 0.0 < o.channel_ratio <= 1.0:
            raise ConfigError(f"prune.channel_ratio={o.channel_ratio} must lie in (0, 1] (official 0.5: the "
                              "lowest-variance half of the channels)")
        if not o.temperature > 0.0:
            raise ConfigError(f"prune.temperature={o.temperature} must be > 0 (official 0.01)")

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        if facts.family not in FAMILIES:
            raise ConfigError(f"prune=vidcom2 compresses the video tokens of its official ports; model family "
                              f"{facts.family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if tuple(layers.prune_layers) != (0,):
            raise ConfigError(f"prune=vidcom2 compresses the video before the LLM: layers.prune_layers="
                              f"{list(layers.prune_layers)} must be [0]")
        self.ratio, self.official = keep, official

    def check_inputs(self, videos: bool) -> None:
        if not videos:
            raise ConfigError("prune=vidcom2 compresses videos only and this dataset holds none; choose a video "
                              "dataset (e.g. dataset=synthetic dataset.variant=video)")

    def run_notice(self, layers: Layers, facts: ModelFacts) -> str | None:
        if not self.official:
            return None
        return ("prune=vidcom2 protocol=official keeps the official per-frame counts round(min(keep (1 + p_f - "
                "mean p), 1) P), at least 1, whose sum can depart from round(keep * N) by the per-frame rounding "
                "(a sample keeping fewer is flagged budget_unreachable; protocol=uniform keeps exactly "
                "round(keep * N))")

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    # ------------------------------------------------------------------------------ selection
    def keep_masks(self, ctx: StageContext, budgets: list[int | None]) -> torch.Tensor:
        """[B, width] bool over each sample's visual tokens: the official per-frame counts (`official`) or exactly
        budgets[b] (`uniform`; None keeps them all), every clip scored on its own. The batch's clips of one shape
        (and, under `uniform`, one share of the budget) are scored together, so the kernels grow with the number
        of clip shapes, not with the batch; nothing is read back."""
        official = ctx.protocol == "official"
        features = ctx.visual_hidden()
        if not official:
            features = features.float()
        groups: dict[tuple[int, int, int | None], list[tuple[int, int]]] = {}  # clip plan -> (sample, offset)
        units: list[list[tuple[tuple[int, int, int | None], int]]] = []  # per sample: (plan, index in its group)
        for b, k in enumerate(budgets):
            units.append([])
            if k is None:
                continue
            clips = clips_of(ctx.grids(b), ctx.family)
            for (frames, per_frame, offset), share in zip(clips, shares(k, [t * p for t, p, _ in clips]), strict=True):
                plan = (frames, per_frame, None if official else share)
                members = groups.setdefault(plan, [])
                units[b].append((plan, len(members)))
                members.append((b, offset))
        masks = {}
        for plan, places in groups.items():
            frames, per_frame, share = plan
            video, frame = clip_scores(windows(features, places, frames * per_frame), frames,
                                       self.options.channel_ratio)
            weights = frame_weights(video, self.options.temperature)
            rank = within_frame_rank(video + frame)
            if official:
                mask = rank < official_frame_counts(weights, self.ratio, per_frame)[..., None]
            else:
                mask = webster_mask(rank, weights, share)
            masks[plan] = mask.flatten(1)
        valid = ctx.visual_valid
        rows = [[valid[b]] if k is None else [masks[plan][i] for plan, i in units[b]] for b, k in enumerate(budgets)]
        return assemble(rows, valid.shape[1], False)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Every sample's mask on the device, the kept positions by one sort; the official counts are read back
        once for the batch (uniform: they are the budgets)."""
        mask = self.keep_masks(ctx, budgets)
        width = mask.shape[1]
        if ctx.protocol == "official":
            counts = mask.sum(dim=1).tolist()  # the one host read: the official totals are data-dependent
        else:
            counts = [n if k is None else k for k, n in zip(budgets, ctx.n_current, strict=True)]
        keep = max(counts, default=0)
        index = torch.arange(width, device=mask.device).expand_as(mask)
        order = torch.where(mask, index, width).sort(dim=1).values[:, :keep]
        return BatchSelection(order, counts, width)
