"""HoliTom (Shao et al., NeurIPS 2025): holistic token merging for video LLMs. Before the LLM, a dynamic program cuts
the video into windows that maximise the tokens static across a window, each window's static tokens are averaged
and clustered, its other (dynamic) tokens kept by attention per frame; inside the LLM, at layer K, the tokens the last
prompt token attends to least are each averaged into their most similar kept token.

Official code (cokeshao/HoliTom@e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0, cited HT:<file>:<lines>; `llava_arch.py`
is holitom/llava_arch.py, `modeling_qwen2.py` holitom/modeling_qwen2.py, `siglip` LLaVA-NeXT/llava/model/
multimodal_encoder/siglip_encoder.py), LLaVA-OneVision (SigLIP + Qwen2):
- Features: the projected, 2x2 bilinearly pooled frame tokens [F, P, C] (P = 196 on the 7B model), i.e. the LLM
  input embeddings of the video (llava_arch.py:370). Attention: the last kept SigLIP layer's attention (the tower
  drops its final layer, siglip:595, so it is the layer that produces the features), averaged over heads and then
  over queries, one weight per patch (siglip:618-622), pooled like the features (llava_arch.py:371-373). It is
  recomputed in eager form (as the official tower runs it) from that layer's input, which the LLaVA-OneVision
  adapter exposes per video ([frames, patches, C], `ctx.vision_inputs`; `siglip_attention`); a family whose
  adapter does not expose its encoder is refused (check_budget, one line naming it).
- Temporal windows (llava_arch.py:377-384, 53-98): cosine of each pooled token with the same token of the next frame
  (features L2-normalised first). A token is static over frames s..e when every adjacent cosine in between exceeds
  tau (T, default 0.8; the scripts use 0.65 at RETAIN_RATIO 0.10, scripts/eval_ov-7b_holitom.sh:2). A window s..e
  saves (e - s) x its static count; the DP over frames maximises the total saved (ties keep the shorter window:
  windows are tried from size 2 up, a later one replaces only a strictly better value), windows of at most
  MAX_WINDOW_SIZE (1024) frames.
- Counts (llava_arch.py:388-391): the retain ratio R (RETAIN_RATIO) becomes R' = min(R / ((FP - saved) / FP), 1), so
  the tokens left after the static merge are cut back to about R x FP. Per window of W frames and S static tokens:
  ceil((P - S) R') dynamic tokens per frame, of which round(. x (1 - D)) by attention (D, default 0) and the rest by
  clustering (llava_arch.py:152-155); round(S R') static clusters (llava_arch.py:201). One-frame windows have S = 0.
- Static tokens (llava_arch.py:294-303, 199-213): the window's static tokens averaged over its frames, then DPC-kNN
  (cluster_dpc_knn, llava_arch.py:29-51: distance L2 / sqrt(C) in float32, density exp(-mean squared distance to
  the k = min(K, clusters) nearest, self included) + U(0, 1) x 1e-6, parent distance to the nearest denser token
  (the largest distance if none), centres = top density x parent distance, K = 7), centres sorted; each other
  token joins its nearest centre, a centre becomes beta x centre + (1 - beta) x mean(members) or stays itself
  (merge_tokens_by_clustering, llava_arch.py:100-150; NO_BETA unset, beta = BETA = 0.6).
- Dynamic tokens (llava_arch.py:157-185): per frame the top attention tokens in ascending position; with D > 0 the
  frame's remaining tokens are clustered the same way into the contextual tokens.
- Sequence (llava_arch.py:253-254, mm_newline_position one_token): per window its static clusters, then frame by
  frame its dominant then contextual tokens; the video's one newline after all of it (llava_arch.py:454-462); fed
  as a shorter sequence, so positions are contiguous (llava_arch.py:672-678).
- Inside the LLM (modeling_qwen2.py:144-208; HOLITOM_k = 18, HOLITOM_r = 0.5 in every script, the code default 3):
  layer K-1's eager attention, head mean, last prompt row, over the image tokens; the round(L (1 - r)) highest are
  kept; each other image token, in ascending order, finds its kept token of highest cosine, which becomes the mean
  of itself and that token (sequentially, so a later member weighs more); the kept tokens keep their positions
  (position_ids = keep_indexs, with gaps) and layers before K keep every token in their cache; decoding (no cut,
  modeling_qwen2.py:146) continues every layer from the outer-merged prompt's length.

Budget: `keep` is the framework's (averaged over all decoder layers by default): R = keep x depth / (K + (depth - K)
(1 - r)) with the inner merge before layer K (R = keep without it; budget=final: R = keep / (1 - r)). The paper's
RETAIN_RATIO 0.25 / 0.20 / 0.15 / 0.10 with the inner merge at 18 of 28 layers is keep = 0.205 / 0.164 / 0.123 /
0.082; a sample whose data-dependent counts depart from keep is flagged by the engine. `layers.prune_layers=[0]` is
"HoliTom (w/o M)"; `layers.prune_layers=[0, 3]` the code's default K.

Departures (documented, not silent):
- D > 0: the official code gathers the contextual positions with a mask of the wrong rank and raises
  (llava_arch.py:174); its evident rule (the non-dominant tokens' own positions) runs.
- Inner merge: the newline token belongs to no grid, so it is never cut nor merged (official: one of the L image
  tokens); the count is round(n (1 - r)) of the n visual tokens. The engine keeps one position rule per run, so
  after the inner cut positions are renumbered too (official: gaps there), and each layer decodes from its own
  cache length (official: every layer from the outer-merged prompt's length).
- The density jitter is drawn from the run's seeded per-sample generator (official: the global RNG), in the
  official order (per window: the dynamic clustering, then the static), so a sample draws alike in any batch.
- Several videos in one sample: each starts from R (the official loop divides the already-adjusted ratio again
  for the second video, llava_arch.py:389); an image grid is a one-frame clip.
`uniform`: the same windows, signals and merges in float32, at original positions, with exactly the planner's
count at each stage (its default shape [1, 1 - r]: the outer count and (1 - r) times it inside the LLM, whose
layer average is keep; with layers.prune_layers=[0] and budget=final, round(keep N)). The outer count is spread
over the static groups (one per window) and the dynamic groups (one per frame) in proportion to their sizes
(cumulative rounding), each dynamic share split by D as above; if it exceeds what the static merge leaves, no
window merges. A merged static token sits at its centre's position in its window's first frame. schedule=paper
gives the uniform protocol the nominal official counts, round(R N) and round(round(R N) (1 - r)).

Port to Qwen2-VL, Qwen2.5-VL and Qwen3-VL (`uniform` only; no official code exists for them, so protocol=official
is refused there in one line): the uniform rule above, unchanged, with these stand-ins.
- Frames: a video's temporal grid steps (2 input frames each, after the temporal patch), P = its merged h x w
  tokens; features are their LLM input embeddings (the 2x2 merger's output), as LLaVA-OneVision's pooled,
  projected frame tokens are. On Qwen3-VL, which lays a video out as one (1, h, w) segment per step, consecutive
  one-frame grids of one size are one clip (two same-size videos or images side by side would join, as in VidCom2).
- Attention: the official signal is already [CLS]-free (SigLIP's head and query mean over a frame's patches from
  the layer that produces the features). Qwen2-VL / Qwen2.5-VL: the same rule on the LAST vision block (the one
  that produces the merger's input), recomputed in float32 from its captured input with its post-RoPE queries
  and keys, softmax over the step's own rows (the block's own attention: Qwen2-VL attends per step, and
  Qwen2.5-VL's last block is one of its full-attention blocks), then each token the mean of its 2x2 rows
  (LLaVA-OneVision's 2x2 bilinear pooling is the mean of each 2x2 block). Qwen3-VL: the engine cannot pair
  its tower's per-video rows with its per-step segments, so the stand-in reads the embeddings: per step
  softmax(x x^T / sqrt(C)) over its tokens, averaged over queries (the same rule with identity projections).
- Positions: original M-RoPE positions at prefill and decode (Rules()): a merged static token takes its centre's
  (t, h, w) in the window's first step; after the inner merge the kept tokens keep theirs, which is the official
  inner rule (position_ids = keep_indexs) in three dimensions, so the inner merge runs on Qwen too.
- Qwen3-VL's DeepStack features follow the kept tokens (the engine adds each kept token's own rows): a merged
  token gets its representative's (centre's or kept token's) features, not merged ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from clse_exp.efficiency.counts import host_side, upload
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

FAMILIES = ("llava_onevision",)  # the families whose official code this reproduces
PORTED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # protocol=uniform only: the port (see the module docstring)
VISION_BLOCK = ("qwen2_vl", "qwen2_5_vl")  # ports whose attention is the last vision block's
ATTENTION_CHUNK = 1 << 26  # most probabilities one step of the vision-block signal holds (real towers)
OFFICIAL_DEPTH = 28  # LLaVA-OneVision-Qwen2-7B
OFFICIAL_LLM_LAYER = 18  # HOLITOM_k in every script (HT:scripts/eval_ov-7b_holitom.sh:2)
DENSITY_NOISE = 1e-6  # tie-breaking jitter on the DPC density (HT:llava_arch.py:39-40)


# ---------------------------------------------------------------------------------------------- signals
def siglip_attention(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[F, p] the official signal (HT:siglip:618-622): SigLIP `layer`'s eager attention recomputed from its input
    x [F, p, C], float32 softmax cast back, averaged over heads, then over queries."""
    attn = layer.self_attn
    hidden = layer.layer_norm1(x)
    frames, rows, _ = hidden.shape
    heads = attn.num_heads
    q = attn.q_proj(hidden).view(frames, rows, heads, -1).transpose(1, 2)
    k = attn.k_proj(hidden).view(frames, rows, heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(2, 3) * attn.scale, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs.mean(dim=1).mean(dim=1)


def vision_block_attention(queries: torch.Tensor, keys: torch.Tensor, token: torch.Tensor, frames: int,
                           tokens: int) -> torch.Tensor:
    """[F, P] float32: the SigLIP signal's rule on a Qwen vision block (queries and keys [heads, rows, D], post
    RoPE): per temporal step the softmax attention among its own rows, averaged over heads and then queries, then
    over the rows the 2x2 merger turns into each token (`token`: its grid-order token). A step's rows are
    contiguous in every Qwen tower (Qwen2.5-VL's windows lie within a step)."""
    heads, rows, dim = queries.shape
    step = rows // frames
    q = queries.float().view(heads, frames, step, dim)
    k = keys.float().view(heads, frames, step, dim)
    chunk = max(1, ATTENTION_CHUNK // (heads * step * step))
    received = []
    for first in range(0, frames, chunk):
        part = slice(first, first + chunk)
        probs = torch.softmax(q[:, part] @ k[:, part].transpose(2, 3) / dim**0.5, dim=-1)
        received.append(probs.mean(dim=0).mean(dim=1))
    return per_token(torch.cat(received).flatten(), token, frames * tokens).view(frames, tokens)


def embedding_attention(frames: torch.Tensor) -> torch.Tensor:
    """[F, P]: the SigLIP signal's rule on a clip's LLM input embeddings [F, P, C] (one head, no projections):
    per frame softmax(x x^T / sqrt(C)) over its tokens, averaged over queries."""
    probs = torch.softmax(frames @ frames.transpose(1, 2) / frames.shape[-1] ** 0.5, dim=-1)
    return probs.mean(dim=1)


def pool_like_frames(weights: torch.Tensor) -> torch.Tensor:
    """[F, p] per-patch weights pooled as LLaVA-OneVision pools the frame tokens (2x2 bilinear, ceil): [F, P]."""
    side = math.isqrt(weights.shape[1])
    grid = weights.view(weights.shape[0], 1, side, side)
    pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    return pooled.flatten(1)


# ---------------------------------------------------------------------------------------------- windows
def static_runs(frames: torch.Tensor, tau: float) -> torch.Tensor:
    """[F, P] long: for frame s and token n, how many adjacent-frame cosines from s on exceed tau in a row
    (HT:llava_arch.py:377-380: features normalised, then the cosine with the same token of the next frame)."""
    unit = F.normalize(frames, p=2, dim=-1)
    above = F.cosine_similarity(unit[:-1], unit[1:], dim=-1) > tau
    runs = torch.zeros(frames.shape[:2], dtype=torch.long, device=frames.device)
    for s in range(frames.shape[0] - 2, -1, -1):
        runs[s] = (runs[s + 1] + 1) * above[s]
    return runs


def static_counts(runs: torch.Tensor) -> torch.Tensor:
    """[F, F - 1] on the device: [s, w - 1] = tokens static over frames s..s+w."""
    widths = torch.arange(1, runs.shape[0], device=runs.device)
    return (runs[:, :, None] >= widths).sum(1)


def select_windows(counts: list[list[int]], max_window: int) -> tuple[list[tuple[int, int]], int]:
    """The official DP (HT:llava_arch.py:53-98) on host integers: windows (start, end) and the tokens saved."""
    frames = len(counts)

    def saved(start: int, end: int) -> int:
        return counts[start][end - start - 1] * (end - start) if end > start else 0

    best, prev = [0] * frames, [0] * frames
    for i in range(frames):
        value, start = (best[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            candidate = (best[j] if j >= 0 else 0) + saved(j + 1, i)
            if candidate > value:
                value, start = candidate, j + 1
        best[i], prev[i] = value, start
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], best[-1]


def spread(total: int, sizes: list[int]) -> list[int]:
    """`total` over parts of `sizes`, proportionally, by cumulative rounding (exact sum, none above its size)."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    marks, run = [0], 0
    for size in sizes:
        run += size
        marks.append(math.floor(total * run / whole + 0.5))
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


# ---------------------------------------------------------------------------------------------- DPC-kNN
def dpc_centres(x: torch.Tensor, clusters: int, k: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cluster_dpc_knn (HT:llava_arch.py:29-51) on x [B, n, C]: (centres [B, clusters], sorted, distances)."""
    dist = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.to(dist.device, dist.dtype)
    denser = (density[:, None, :] > density[:, :, None]).to(dist.dtype)
    far = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = (dist * denser + far * (1 - denser)).min(dim=-1).values
    centres = (parent * density).topk(clusters, dim=-1).indices
    return centres.sort(dim=-1).values, dist


def merge_clusters(x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float) -> torch.Tensor:
    """merge_tokens_by_clustering (HT:llava_arch.py:100-150): every non-centre joins its nearest centre; a centre
    with members becomes beta x centre + (1 - beta) x mean(members). x [B, n, C] -> [B, clusters, C]."""
    batch, n, _ = x.shape
    clusters = centres.shape[1]
    to_centres = dist.gather(2, centres[:, None, :].expand(batch, n, clusters))
    assign = F.one_hot(to_centres.argmin(dim=-1), clusters).to(x.dtype)  # [B, n, clusters]
    assign.scatter_(1, centres[:, :, None].expand(batch, clusters, clusters), 0)  # centres are no members
    members = assign.sum(dim=1)[:, :, None]  # [B, clusters, 1]
    own = x.gather(1, centres[:, :, None].expand(-1, -1, x.shape[-1]))
    mean = assign.transpose(1, 2) @ x / members.clamp(min=1)
    return torch.where(members > 0, beta * own + (1 - beta) * mean, own)


def sequential_average(kept: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each pruned row, in order, averaged into kept row `target[i]` (h <- (h + p) / 2, HT:modeling_qwen2.py:177-181),
    in closed form: with m members after it, a pruned row weighs 2^-(m+1) and the kept row 2^-(its members)."""
    assign = F.one_hot(target, kept.shape[0]).to(kept.dtype)  # [m, k]
    later = assign.flip(0).cumsum(0).flip(0)  # members of the same target from this row on (itself included)
    weight = torch.pow(0.5, (later * assign).sum(1))  # [m]
    own = torch.pow(0.5, assign.sum(0))[:, None]  # [k, 1]
    return own * kept + assign.T @ (weight[:, None] * pruned)


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """One window's counts: static tokens and clusters; per frame dynamic tokens, dominant and contextual."""

    start: int
    end: int
    static: int
    clusters: int
    dominant: list[int]
    contextual: list[int]


def jitter_size(plan: WindowPlan, tokens: int) -> int:
    """Jitter values a window's clusterings draw: its dynamic frames' contextual pools, then its static tokens."""
    static = plan.static if plan.end > plan.start and plan.clusters > 0 else 0
    pools = [tokens - plan.static - m for m, c in zip(plan.dominant, plan.contextual, strict=True) if c > 0]
    return sum(pools) + static


@dataclasses.dataclass
class Clip:
    """One video (or image) of a sample: its frames [F, P, C], attention [F, P], static runs, and budget (None:
    the official counts)."""

    sample: int
    offset: int
    frames: torch.Tensor
    weights: torch.Tensor
    runs: torch.Tensor
    budget: int | None


class Jitter:
    """A sample's uploaded density jitter, handed out in draw order."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.at = values, 0

    def take(self, rows: int, cols: int) -> torch.Tensor:
        piece = self.values[self.at : self.at + rows * cols].view(rows, cols)
        self.at += rows * cols
        return piece


class HoliTom(PruningMethod):
    name = "holitom"
    has_official_counts = True
    retain: float = 0.1  # R, the official RETAIN_RATIO this run's keep stands for (set when the pruner binds)

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "holitom"
        tau: float = 0.8  # T: a token is static across frames whose adjacent cosines all exceed it
        beta: float = 0.6  # BETA: weight of a cluster centre against the mean of its members
        d: float = 0.0  # D: share of each frame's dynamic tokens formed by clustering (0: attention top-k only)
        k: int = 7  # K: DPC-kNN neighbours for the density
        max_window_size: int = 1024  # MAX_WINDOW_SIZE: longest temporal window, in frames
        llm_ratio: float = 0.5  # HOLITOM_r: share of the visual tokens merged away inside the LLM

    # ------------------------------------------------------------------------------ knowledge
    def validate(self) -> None:
        o = self.options
        checks = [
            ("tau", o.tau, -1.0 <= o.tau <= 1.0, "a cosine in [-1, 1] (official 0.8)"),
            ("beta", o.beta, 0.0 <= o.beta <= 1.0, "in [0, 1] (official 0.6)"),
            ("d", o.d, 0.0 <= o.d <= 1.0, "in [0, 1] (official 0)"),
            ("k", o.k, isinstance(o.k, int) and o.k >= 1, "an integer >= 1 (official 7)"),
            ("max_window_size", o.max_window_size, isinstance(o.max_window_size, int) and o.max_window_size >= 1,
             "an integer >= 1 (official 1024)"),
            ("llm_ratio", o.llm_ratio, 0.0 <= o.llm_ratio < 1.0, "in [0, 1) (official 0.5)"),
        ]
        for key, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"prune.{key}={value} is invalid: it must be {valid}")

    def default_layers(self, facts: ModelFacts) -> Layers:
        """The outer stage at the LLM input, the inner merge before layer 18 of 28 (other depths scaled)."""
        if facts.num_layers < 2:
            return Layers(0, (0,))
        inner = min(facts.num_layers - 1, max(1, round(OFFICIAL_LLM_LAYER * facts.num_layers / OFFICIAL_DEPTH)))
        return Layers(0, (0, inner))

    def default_shape(self, n_stages: int) -> list[float] | None:
        return [1.0, 1.0 - self.options.llm_ratio] if n_stages == 2 else None

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        if official and facts.family not in FAMILIES:
            raise ConfigError(f"prune=holitom protocol=official: model family {facts.family!r} is not supported "
                              f"(supported: {', '.join(FAMILIES)}); protocol=uniform runs the port on "
                              f"{', '.join(PORTED)}")
        if facts.family not in FAMILIES + PORTED:
            raise ConfigError(f"prune=holitom protocol=uniform: model family {facts.family!r} is not supported "
                              f"(supported: {', '.join(FAMILIES + PORTED)})")
        stages = tuple(layers.prune_layers)
        if stages[0] != 0 or len(stages) > 2:
            raise ConfigError(f"prune=holitom merges at the LLM input and optionally once inside it: "
                              f"layers.prune_layers={list(stages)} must be [0] or [0, K]")
        self.retain = self.retain_ratio(keep, budget, stages, facts.num_layers)

    def retain_ratio(self, keep: float, budget: str, stages: tuple[int, ...], depth: int) -> float:
        """The official RETAIN_RATIO R that `keep` stands for (see the module docstring)."""
        if len(stages) == 1:
            return keep
        left = 1.0 - self.options.llm_ratio
        if budget == "final":
            return keep / left
        return keep * depth / (stages[1] + (depth - stages[1]) * left)

    def official_counts(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> list[int | None] | None:
        """Nominal counts (the outer one is data-dependent; the stages compute their own): round(R n), then
        round(. x (1 - r))."""
        retain = min(1.0, self.retain_ratio(keep, budget, tuple(layers.prune_layers), facts.num_layers))
        outer = min(n_visual, max(1, round(retain * n_visual)))
        if len(layers.prune_layers) == 1:
            return [outer]
        return [outer, max(1, round(outer * (1.0 - self.options.llm_ratio)))]

    def check_inputs(self, videos: bool) -> None:
        if not videos:
            raise ConfigError("prune=holitom merges videos only and this dataset holds none; choose a video dataset "
                              "(e.g. dataset=synthetic dataset.variant=video)")

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        if protocol == "official" and not facts.mrope:
            return Rules(prefill="compact", decode="cache_length")
        return Rules()

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """The last encoder layer's input: its attention is the token signal (HT:siglip:618-622); Qwen3-VL's
        stand-in reads the LLM input embeddings instead (see the module docstring)."""
        return (-1,) if facts.family in FAMILIES + VISION_BLOCK else ()

    def run_notice(self, layers: Layers, facts: ModelFacts) -> str | None:
        if facts.family not in PORTED:
            return None
        signal = ("the last vision block's head- and query-mean attention within each temporal step"
                  if facts.family in VISION_BLOCK else "a query-mean softmax of the video's LLM input embeddings "
                  "within each temporal step (the engine does not pair Qwen3-VL's vision rows with its frames)")
        return (f"prune=holitom on {facts.family} runs the uniform port: frames are the video's temporal grid "
                f"steps, and {signal} stands in for the official SigLIP attention")

    # ------------------------------------------------------------------------------ selection
    def select(self, ctx: StageContext, b: int, k: int) -> Selection:
        if ctx.layer == 0:
            return self.outer(ctx, {b: k})[b]
        return self.inner(ctx, b, k)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """The outer stage for the whole batch with one read of the device (every clip's static counts) and one
        upload (every sample's density jitter); the inner stage per sample (nothing read back)."""
        if ctx.layer != 0:
            return super().select_batch(ctx, budgets)
        chosen = self.outer(ctx, {b: k for b, k in enumerate(budgets) if k is not None})
        return pack([chosen.get(b) for b in range(len(budgets))], ctx)

    def inner(self, ctx: StageContext, b: int, k: int) -> Selection:
        """HT:modeling_qwen2.py:146-208: top attention tokens kept, each other one averaged into its most similar
        kept token (ascending order, one at a time); the kept tokens in their current order."""
        n = ctx.n_current[b]
        official = ctx.protocol == "official"
        count = max(1, round(n * (1 - self.options.llm_ratio))) if official else k  # official: 0 drops them all
        hidden = ctx.hidden_states(b)
        work = hidden if official else hidden.float()
        top = ctx.attention(b).topk(count).indices
        rest = torch.ones(n, dtype=torch.bool, device=hidden.device).index_fill_(0, top, False)
        rest = positions_of(rest[None], n - count)[0]
        kept, pruned = work[top], work[rest]
        similarity = (pruned @ kept.T) / (pruned.norm(dim=-1, keepdim=True) * kept.norm(dim=-1, keepdim=True).T)
        merged = sequential_average(kept, pruned, similarity.argmax(dim=-1)) if n > count else kept
        order = top.sort()
        return Selection(order.values, merged[order.indices].to(hidden.dtype))

    def outer(self, ctx: StageContext, budgets: dict[int, int]) -> dict[int, Selection]:
        """HT:llava_arch.py:370-407 for every clip (a video, or an image as one frame) of the samples in `budgets`."""
        official = ctx.protocol == "official"
        clips: list[Clip] = []
        for b, k in budgets.items():
            current = ctx.hidden_states(b)
            work = current if official else current.float()
            grids = clips_of(ctx.grids(b), ctx.family)
            encoded = ctx.vision_inputs(b, -1) if ctx.family in FAMILIES + VISION_BLOCK else [None] * len(grids)
            offset = 0
            for (t, p, _), item, budget in zip(grids, encoded, spread(k, [t * p for t, p, _ in grids]), strict=True):
                frames = work[offset : offset + t * p].view(t, p, -1)
                weights = self.weights(ctx, frames, item).to(work.dtype)
                clips.append(Clip(b, offset, frames, weights, static_runs(frames, self.options.tau),
                                  None if official else budget))
                offset += t * p
            if offset != len(current):
                raise RuntimeError(f"sample {b}: its grids hold {offset} tokens but it has {len(current)} visual "
                                   "tokens")
        counts = [static_counts(c.runs) for c in clips]
        flat = torch.cat([c.flatten() for c in counts]).tolist() if clips else []  # the stage's one read
        plans, at = [], 0
        for clip, count in zip(clips, counts, strict=True):
            width = count.shape[1]
            rows = [flat[at + f * width : at + (f + 1) * width] for f in range(count.shape[0])]
            at += count.numel()
            plans.append(self.plan(rows, clip.frames.shape[1], clip.budget))
        noise = self._jitter(ctx, clips, plans)
        orders: dict[int, list[torch.Tensor]] = {b: [] for b in budgets}
        rows_out: dict[int, list[torch.Tensor]] = {b: [] for b in budgets}
        for clip, plan in zip(clips, plans, strict=True):
            order, merged = self.clip(clip.frames, clip.weights, clip.runs, plan, noise[clip.sample])
            orders[clip.sample].append(clip.offset + order)
            rows_out[clip.sample].append(merged)
        return {b: Selection(torch.cat(orders[b]), torch.cat(rows_out[b]).to(ctx.hidden.dtype)) for b in budgets}

    def weights(self, ctx: StageContext, frames: torch.Tensor, item: Any) -> torch.Tensor:
        """[F, P] token attention of a clip [F, P, C]: the official SigLIP signal (LLaVA-OneVision, `item` its
        frames' encoder rows) or the port's stand-in (Qwen: `item` the video's vision-block rows, or None)."""
        if ctx.family in FAMILIES:
            return pool_like_frames(siglip_attention(ctx.vision_layers[-1], item))
        if item is None:
            return embedding_attention(frames)
        queries, keys = ctx.encoder_queries_keys(ctx.vision_layers[-1], item)
        return vision_block_attention(queries, keys, item.token, *frames.shape[:2]).to(frames.device)

    def _jitter(self, ctx: StageContext, clips: list[Clip], plans: list[list[WindowPlan]]) -> dict[int, Jitter]:
        """Each sample's density jitter, drawn on the host from its own generator (as many values as its
        clusterings take, in their order: one draw equals consecutive draws) and uploaded once for the batch."""
        sizes: dict[int, int] = {}
        for clip, plan in zip(clips, plans, strict=True):
            sizes[clip.sample] = sizes.get(clip.sample, 0) + sum(jitter_size(w, clip.frames.shape[1]) for w in plan)
        drawn = [b for b, size in sizes.items() if size]
        with host_side():
            draws = [torch.rand(sizes[b], generator=ctx.generator(b)) * DENSITY_NOISE for b in drawn]
        uploaded = upload(torch.cat(draws), ctx.hidden.device).split([sizes[b] for b in drawn]) if drawn else []
        streams = {b: Jitter(values) for b, values in zip(drawn, uploaded, strict=True)}
        return {b: streams.get(b, Jitter(ctx.hidden.new_zeros(0))) for b in sizes}

    def plan(self, counts: list[list[int]], tokens: int, budget: int | None) -> list[WindowPlan]:
        """Windows and counts: the official rule (budget None, HT:llava_arch.py:382-391, 152-155, 201) or exactly
        `budget` tokens spread over the static and dynamic groups (uniform)."""
        o = self.options
        frames = len(counts)
        windows, saved = select_windows(counts, o.max_window_size)
        total = frames * tokens
        if budget is not None and budget > total - saved:  # the static merge alone would leave too few
            windows, saved = [(f, f) for f in range(frames)], 0
        statics = [counts[s][e - s - 1] if e > s else 0 for s, e in windows]
        if budget is None:
            retain = min(self.retain / ((total - saved) / total), 1)
            shares = []
            for (s, e), static in zip(windows, statics, strict=True):
                shares += [round(static * retain) if e > s else 0]
                shares += [math.ceil((tokens - static) * retain)] * (e - s + 1)
        else:
            sizes = []
            for (s, e), static in zip(windows, statics, strict=True):
                sizes += [static if e > s else 0] + [tokens - static] * (e - s + 1)
            shares = spread(budget, sizes)
        plans, i = [], 0
        for (s, e), static in zip(windows, statics, strict=True):
            dynamic = shares[i + 1 : i + 2 + e - s]
            dominant = [round(c * (1 - o.d)) for c in dynamic]
            plans.append(WindowPlan(s, e, static, shares[i], dominant,
                                    [c - m for c, m in zip(dynamic, dominant, strict=True)]))
            i += 2 + e - s
        return plans

    def clip(self, frames: torch.Tensor, weights: torch.Tensor, runs: torch.Tensor, plans: list[WindowPlan],
             noise: Jitter) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip [F, P, C] with its attention [F, P]: (kept positions within the clip, their rows), in the
        official sequence order (per window: static clusters, then per frame dominant and contextual tokens)."""
        o = self.options
        tokens = frames.shape[1]
        order, rows = [], []
        for plan in plans:
            size = plan.end - plan.start + 1
            window = frames[plan.start : plan.end + 1]
            if size > 1:
                static_mask = runs[plan.start] >= size - 1
                static = positions_of(static_mask[None], plan.static)[0]
                dynamic = positions_of(~static_mask[None], tokens - plan.static)[0]
            else:
                static = dynamic = torch.arange(tokens, device=frames.device)
            # dynamic first: the official draws its jitter for them before the static clusters (HT:llava_arch.py:251)
            dyn_order, dyn_rows = self.dynamic(window[:, dynamic], weights[plan.start : plan.end + 1, dynamic], plan,
                                               noise)
            if size > 1 and plan.clusters > 0:
                mean = window[:, static].mean(dim=0)
                jitter = noise.take(1, plan.static)
                centres, dist = dpc_centres(mean[None], plan.clusters, min(o.k, plan.clusters), jitter)
                order.append(plan.start * tokens + static[centres[0]])
                rows.append(merge_clusters(mean[None], centres, dist, o.beta)[0])
            for f in range(size):
                order.append((plan.start + f) * tokens + dynamic[dyn_order[f]])
                rows.append(dyn_rows[f])
        return torch.cat(order), torch.cat(rows)

    def dynamic(self, feats: torch.Tensor, weights: torch.Tensor, plan: WindowPlan, noise: Jitter
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per frame of a window (feats [W, n, C], weights [W, n]): kept positions within `n` and their rows,
        dominant (top attention, ascending) then contextual (DPC-kNN of the rest, centres ascending). Frames of
        equal counts (always, officially) go as one batch, as the official code runs them (one jitter draw)."""
        size = feats.shape[0]
        if len(set(plan.dominant)) == 1 and len(set(plan.contextual)) == 1:
            return self._frames(feats, weights, plan.dominant[0], plan.contextual[0], noise)
        orders, rows = [], []
        for f in range(size):
            order, row = self._frames(feats[f : f + 1], weights[f : f + 1], plan.dominant[f], plan.contextual[f],
                                      noise)
            orders += order
            rows += row
        return orders, rows

    def _frames(self, feats: torch.Tensor, weights: torch.Tensor, dominant: int, contextual: int,
                noise: Jitter) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """merge_tokens_by_attention_density (HT:llava_arch.py:152-197) for frames [W, n, C] of equal counts."""
        size, n, channels = feats.shape
        top = weights.topk(dominant, dim=1).indices.sort(dim=1).values
        kept = feats.gather(1, top[:, :, None].expand(-1, -1, channels))
        if contextual == 0:
            return list(top), list(kept)
        rest = torch.ones(size, n, dtype=torch.bool, device=feats.device).scatter_(1, top, False)
        rest = positions_of(rest, n - dominant)
        pool = feats.gather(1, rest[:, :, None].expand(-1, -1, channels))
        centres, dist = dpc_centres(pool, contextual, min(self.options.k, contextual), noise.take(size, n - dominant))
        merged = merge_clusters(pool, centres, dist, self.options.beta)
        return list(torch.cat([top, rest.gather(1, centres)], dim=1)), list(torch.cat([kept, merged], dim=1))
