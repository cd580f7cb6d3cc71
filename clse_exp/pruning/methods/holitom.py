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
- Equal scores (top attention tokens, DPC centres) go to the lower index (a stable sort; torch.topk's order
  among equal scores depends on the row's length); a cluster's members are summed in ascending order in float32.
  Both hold whatever the padding, so a sample picks and merges alike alone and in a batch (below).

Batching: the whole batch is one pass per stage. The outer stage gathers the batch's clips of one shape with one
gather, computes their signals and static runs together, reads every clip's static counts back once (the plans are
data-dependent), uploads every sample's jitter once, then runs every frame's dominant and contextual selection and
every window's static merge of those clips at once, padded where the plans differ; the inner stage ranks, merges
and reorders every sample at once. Kernels grow with the number of clip shapes, not with the batch.
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
)
from clse_exp.pruning.methods.vidcom2 import clips_of
from clse_exp.pruning.methods.visionzip import per_token
from clse_exp.pruning.ragged import alone_cdist, assemble, device_ints, windows
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import gather_rows, positions_of

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
    """[..., F, P] long: for clips' frames [..., F, P, C], for frame s and token n, how many adjacent-frame cosines
    from s on exceed tau in a row (HT:llava_arch.py:377-380: features normalised, then the cosine with the same
    token of the next frame)."""
    unit = F.normalize(frames, p=2, dim=-1)
    above = F.cosine_similarity(unit[..., :-1, :, :], unit[..., 1:, :, :], dim=-1) > tau
    runs = torch.zeros(frames.shape[:-1], dtype=torch.long, device=frames.device)
    for s in range(frames.shape[-3] - 2, -1, -1):
        runs[..., s, :] = (runs[..., s + 1, :] + 1) * above[..., s, :]
    return runs


def static_counts(runs: torch.Tensor) -> torch.Tensor:
    """[..., F, F - 1] on the device: [s, w - 1] = tokens static over frames s..s+w."""
    widths = torch.arange(1, runs.shape[-2], device=runs.device)
    return (runs[..., None] >= widths).sum(-2)


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
def ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest `scores` along the last dim, highest first, equal scores in index order: a
    stable sort, so a padded row picks what the unpadded row picks (torch.topk breaks ties by row length)."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :k]


def cluster(x: torch.Tensor, sizes: list[int], clusters: list[int], near: list[int], noise: torch.Tensor,
            beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cluster_dpc_knn then merge_tokens_by_clustering (HT:llava_arch.py:29-51, 100-150) on units x [U, n, C],
    unit u its first sizes[u] rows, clusters[u] centres from its near[u] nearest, noise [U, n] the density jitter:
    (centres [U, max clusters], ascending, filler n past a unit's count; their rows [U, max clusters, C]). Every
    other real row joins its nearest centre; a centre with members becomes beta x centre + (1 - beta) x
    mean(members), the members summed in ascending order in float32. Padding takes no part in anything."""
    units, n, channels = x.shape
    device = x.device
    dist = alone_cdist(x, sizes) / channels**0.5
    size, count, k = device_ints([*sizes, *clusters, *near], device).view(3, units, 1)
    widest, slots = max(near, default=1), max(clusters, default=1)
    steps = torch.arange(max(n, widest, slots, units), device=device)
    invalid = steps[:n] >= size
    nearest = dist.masked_fill(invalid[:, None, :], float("inf")).topk(widest, dim=-1, largest=False).values
    nearest = nearest.masked_fill(steps[:widest] >= k[:, :, None], 0)
    density = (-((nearest**2).sum(dim=-1) / k)).exp() + noise.to(device, dist.dtype)
    density = density.masked_fill(invalid, float("-inf"))
    denser = density[:, None, :] > density[:, :, None]
    far = dist.masked_fill(invalid[:, :, None] | invalid[:, None, :], 0).flatten(1).max(dim=-1).values
    parent = torch.where(denser, dist, far[:, None, None]).min(dim=-1).values
    top = ranked((parent * density).masked_fill(invalid, float("-inf")), slots)
    spare = steps[:slots] >= count  # a unit's unused centre slots: its last ones once sorted (filler n)
    centres = top.masked_fill(spare, n).sort(dim=-1).values
    safe = centres.clamp(max=n - 1)
    to_centres = dist.gather(2, safe[:, None, :].expand(units, n, slots)).masked_fill(spare[:, None, :], float("inf"))
    centre_rows = torch.zeros(units, n + 1, dtype=torch.bool, device=device).scatter_(1, centres, True)[:, :n]
    outside = invalid | centre_rows  # centres are no members
    slot = to_centres.argmin(dim=-1).masked_fill(outside, slots)
    member = ~outside
    slot = (slot + steps[:units, None] * (slots + 1)).flatten()
    sums = x.new_zeros(units * (slots + 1), channels, dtype=torch.float32).index_add_(0, slot, x.flatten(0, 1).float())
    members = x.new_zeros(units * (slots + 1), dtype=torch.float32).index_add_(0, slot, member.flatten().float())
    sums = sums.view(units, slots + 1, channels)[:, :slots].to(x.dtype)
    members = members.view(units, slots + 1, 1)[:, :slots].to(x.dtype)
    own = x.gather(1, safe[:, :, None].expand(-1, -1, channels))
    return centres, torch.where(members > 0, beta * own + (1 - beta) * (sums / members.clamp(min=1)), own)


def sequential_average(kept: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each pruned row, in order, averaged into kept row `target[i]` (h <- (h + p) / 2, HT:modeling_qwen2.py:177-181),
    in closed form: with m members after it, a pruned row weighs 2^-(m+1) and the kept row 2^-(its members). Any
    leading dims are a batch (kept [..., k, C], pruned [..., m, C], target [..., m]); a target of k or more
    marks a padding row. The weighted members are summed in ascending order in float32, whatever the padding."""
    slots, channels = kept.shape[-2], kept.shape[-1]
    target = target.clamp(max=slots)
    assign = F.one_hot(target, slots + 1)[..., :slots].to(kept.dtype)  # [..., m, k]
    later = assign.flip(-2).cumsum(-2).flip(-2)  # members of the same target from this row on (itself included)
    weight = torch.pow(0.5, (later * assign).sum(-1))  # [..., m]
    own = torch.pow(0.5, assign.sum(-2))[..., None]  # [..., k, 1]
    batch = math.prod(kept.shape[:-2])
    base = torch.arange(batch, device=kept.device).view(*kept.shape[:-2], 1) * (slots + 1)
    sums = kept.new_zeros(batch * (slots + 1), channels, dtype=torch.float32)
    sums.index_add_(0, (target + base).flatten(), (weight[..., None] * pruned).reshape(-1, channels).float())
    return own * kept + sums.view(*kept.shape[:-2], slots + 1, channels)[..., :slots, :].to(kept.dtype)


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """One window's counts: static tokens and clusters; per frame dynamic tokens, dominant and contextual."""

    start: int
    end: int
    static: int
    clusters: int
    dominant: list[int]
    contextual: list[int]


@dataclasses.dataclass
class Clip:
    """One video (or image, one frame) of a sample: its first token among the sample's visual tokens, its frames
    and tokens per frame, its budget (None: the official counts) and its encoder rows (None: the embeddings)."""

    sample: int
    offset: int
    frames: int
    tokens: int
    budget: int | None
    item: Any


@dataclasses.dataclass
class Pieces:
    """The stage's results as one table of (position, row) entries and, per sample, the (start, length) runs of
    entries it keeps, in sequence order."""

    positions: list[torch.Tensor] = dataclasses.field(default_factory=list)
    rows: list[torch.Tensor] = dataclasses.field(default_factory=list)
    size: int = 0

    def add(self, positions: torch.Tensor, rows: torch.Tensor) -> int:
        """Appends units' padded results (positions [U, w], rows [U, w, C]); returns where they start."""
        start = self.size
        self.positions.append(positions.flatten())
        self.rows.append(rows.flatten(0, 1))
        self.size += positions.numel()
        return start


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

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """The whole batch at once: the outer stage with one read of the device (every clip's static counts) and
        one upload (every sample's density jitter), the inner stage with nothing read back."""
        return self.outer(ctx, budgets) if ctx.layer == 0 else self.inner(ctx, budgets)

    def inner(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """HT:modeling_qwen2.py:146-208 for every sample: top attention tokens kept, each other one averaged into
        its most similar kept token (ascending order, one at a time); the kept tokens in their current order. A
        sample without a budget keeps every token as it is."""
        official = ctx.protocol == "official"
        r = self.options.llm_ratio
        counts = [n if k is None else max(1, round(n * (1 - r))) if official else k  # official: 0 drops them all
                  for k, n in zip(budgets, ctx.n_current, strict=True)]
        spares = [n - c for n, c in zip(ctx.n_current, counts, strict=True)]
        width, keep, spare = ctx.visual_slots.shape[1], max(counts), max(spares)
        hidden = ctx.visual_hidden()
        work = hidden if official else hidden.float()
        device = work.device
        limit, left = device_ints(counts + spares, device).view(2, -1, 1)
        top = ranked(ctx.attention_batch().masked_fill(~ctx.visual_valid, float("-inf")), keep)
        unpicked = torch.arange(keep, device=device) >= limit
        top = top.masked_fill(unpicked, width)
        kept = gather_rows(work, top.clamp(max=width - 1))
        if spare:
            rest = torch.cat([ctx.visual_valid, unpicked.new_zeros(len(counts), 1)], dim=1).scatter_(1, top, False)
            pruned = gather_rows(work, positions_of(rest[:, :width], spare))
            similarity = (pruned @ kept.mT) / (pruned.norm(dim=-1, keepdim=True) * kept.norm(dim=-1, keepdim=True).mT)
            target = similarity.masked_fill(unpicked[:, None, :], float("-inf")).argmax(dim=-1)
            target = target.masked_fill(torch.arange(spare, device=device) >= left, keep)
            kept = sequential_average(kept, pruned, target)
        order = top.sort(dim=1)
        return BatchSelection(order.values, counts, width, gather_rows(kept, order.indices).to(hidden.dtype))

    def outer(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """HT:llava_arch.py:370-407 for every clip (a video, or an image as one frame) of the samples with a budget;
        the others keep their tokens. The batch's clips of one shape are worked on together (their signals,
        windows' static merges and frames' dominant and contextual tokens, padded where plans differ), so the
        kernels grow with the number of clip shapes, not with the batch."""
        official = ctx.protocol == "official"
        visual = ctx.visual_hidden()
        work = visual if official else visual.float()
        clips = self._clips(ctx, budgets, official)
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, clip in enumerate(clips):
            shapes.setdefault((clip.frames, clip.tokens), []).append(i)
        signals = {shape: self._signals(ctx, work, [clips[i] for i in members]) for shape, members in shapes.items()}
        counts = [static_counts(runs) for _, _, runs in signals.values()]
        flat = torch.cat([c.flatten() for c in counts]).tolist() if clips else []  # the stage's one read
        plans: list[list[WindowPlan]] = [[] for _ in clips]
        at = 0
        for (frames, tokens), members in shapes.items():
            for i in members:
                plans[i] = self.plan([flat[at + f * (frames - 1) : at + (f + 1) * (frames - 1)]
                                      for f in range(frames)], tokens, clips[i].budget)
                at += frames * (frames - 1)
        noise, draws = self._jitter(ctx, clips, plans)
        table = Pieces()
        found: dict[int, list[tuple[int, int]]] = {}
        for shape, members in shapes.items():
            frames, weights, runs = signals[shape]
            merged = self._merge(frames, weights, runs, [clips[i] for i in members], [plans[i] for i in members],
                                 [draws[i] for i in members], noise, table)
            found.update(zip(members, merged, strict=True))
        pieces: list[list[tuple[int, int]]] = [[] for _ in budgets]
        for i, clip in enumerate(clips):
            pieces[clip.sample] += found[i]
        if any(k is None for k in budgets):  # every token of those samples, as it is
            width = visual.shape[1]
            start = table.add(torch.arange(width, device=visual.device).repeat(len(budgets)), work)
            for b, k in enumerate(budgets):
                if k is None:
                    pieces[b].append((start + b * width, ctx.n_current[b]))
        return self._assemble(ctx, table, pieces, work)

    def _clips(self, ctx: StageContext, budgets: list[int | None], official: bool) -> list[Clip]:
        """Every clip of the samples with a budget, in sample and prompt order, with its share of the budget."""
        clips = []
        for b, k in enumerate(budgets):
            if k is None:
                continue
            grids = clips_of(ctx.grids(b), ctx.family)
            encoded = ctx.vision_inputs(b, -1) if ctx.family in FAMILIES + VISION_BLOCK else [None] * len(grids)
            shares = spread(k, [t * p for t, p, _ in grids])
            for (t, p, offset), item, share in zip(grids, encoded, shares, strict=True):
                clips.append(Clip(b, offset, t, p, None if official else share, item))
            held = sum(t * p for t, p, _ in grids)
            if held != ctx.n_current[b]:
                raise RuntimeError(f"sample {b}: its grids hold {held} tokens but it has {ctx.n_current[b]} visual "
                                   "tokens")
        return clips

    def _signals(self, ctx: StageContext, work: torch.Tensor, clips: list[Clip]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clips of one shape: their frames [G, F, P, C] (one gather), token attention [G, F, P] and static runs."""
        count, size = clips[0].frames, clips[0].tokens
        frames = windows(work, [(c.sample, c.offset) for c in clips], count * size).view(len(clips), count, size, -1)
        weights = self.weights(ctx, frames, [c.item for c in clips]).to(work.dtype)
        return frames, weights, static_runs(frames, self.options.tau)

    def weights(self, ctx: StageContext, frames: torch.Tensor, items: list[Any]) -> torch.Tensor:
        """[G, F, P] token attention of clips [G, F, P, C] of one shape, every clip's frames in one pass: the
        official SigLIP signal (LLaVA-OneVision, `items` their frames' encoder rows) or the port's stand-in (Qwen:
        the videos' vision-block rows, or None)."""
        clips, count, size = frames.shape[:3]
        if ctx.family in FAMILIES:
            return pool_like_frames(siglip_attention(ctx.vision_layers[-1], torch.cat(items))).view(clips, count, size)
        if items[0] is None:
            return embedding_attention(frames.flatten(0, 1)).view(clips, count, size)
        shift = torch.arange(clips, device=items[0].token.device)[:, None] * (count * size)
        joined = dataclasses.replace(items[0], hidden=torch.cat([it.hidden for it in items]),
                                     cos=torch.cat([it.cos for it in items]), sin=torch.cat([it.sin for it in items]),
                                     blocks=[n for it in items for n in it.blocks],
                                     token=(torch.stack([it.token for it in items]) + shift).flatten())
        queries, keys = ctx.encoder_queries_keys(ctx.vision_layers[-1], joined)
        signal = vision_block_attention(queries, keys, joined.token, clips * count, size)
        return signal.to(frames.device).view(clips, count, size)

    def _jitter(self, ctx: StageContext, clips: list[Clip], plans: list[list[WindowPlan]]
                ) -> tuple[torch.Tensor, list[list[int]]]:
        """Each sample's density jitter, drawn on the host from its own generator (as many values as its
        clusterings take, in their official order: per window each clustered frame's pool, then the static
        tokens; one draw equals consecutive draws) and uploaded once for the batch, even with none: (the values,
        per clip where each of its clusterings' values start, in that order)."""
        used: dict[int, int] = {}
        local: list[list[int]] = []
        for clip, plan in zip(clips, plans, strict=True):
            at, starts = used.get(clip.sample, 0), []
            for window in plan:
                for dominant, contextual in zip(window.dominant, window.contextual, strict=True):
                    if contextual:
                        starts.append(at)
                        at += clip.tokens - window.static - dominant
                if window.end > window.start and window.clusters:
                    starts.append(at)
                    at += window.static
            used[clip.sample] = at
            local.append(starts)
        drawn = [b for b, size in used.items() if size]
        with host_side():  # uploaded even when empty, so the syncs do not depend on the videos
            draws = [torch.rand(used[b], generator=ctx.generator(b)) * DENSITY_NOISE for b in drawn]
            values = torch.cat(draws) if draws else torch.zeros(0)
        noise = upload(values, ctx.hidden.device)
        base, at = {}, 0
        for b in drawn:
            base[b], at = at, at + used[b]
        return noise, [[base.get(c.sample, 0) + s for s in starts] for c, starts in zip(clips, local, strict=True)]

    def plan(self, counts: list[list[int]], tokens: int, budget: int | None) -> list[WindowPlan]:
        """Windows and counts: the official rule (budget None, HT:llava_arch.py:382-391, 152-155, 201) or exactly
        `budget` tokens spread over the static and dynamic groups (uniform)."""
        o = self.options
        frames = len(counts)
        spans, saved = select_windows(counts, o.max_window_size)
        total = frames * tokens
        if budget is not None and budget > total - saved:  # the static merge alone would leave too few
            spans, saved = [(f, f) for f in range(frames)], 0
        statics = [counts[s][e - s - 1] if e > s else 0 for s, e in spans]
        if budget is None:
            retain = min(self.retain / ((total - saved) / total), 1)
            shares = []
            for (s, e), static in zip(spans, statics, strict=True):
                shares += [round(static * retain) if e > s else 0]
                shares += [math.ceil((tokens - static) * retain)] * (e - s + 1)
        else:
            sizes = []
            for (s, e), static in zip(spans, statics, strict=True):
                sizes += [static if e > s else 0] + [tokens - static] * (e - s + 1)
            shares = spread(budget, sizes)
        plans, i = [], 0
        for (s, e), static in zip(spans, statics, strict=True):
            dynamic = shares[i + 1 : i + 2 + e - s]
            dominant = [round(c * (1 - o.d)) for c in dynamic]
            plans.append(WindowPlan(s, e, static, shares[i], dominant,
                                    [c - m for c, m in zip(dynamic, dominant, strict=True)]))
            i += 2 + e - s
        return plans

    def _merge(self, frames: torch.Tensor, weights: torch.Tensor, runs: torch.Tensor, clips: list[Clip],
               plans: list[list[WindowPlan]], draws: list[list[int]], noise: torch.Tensor, table: Pieces
               ) -> list[list[tuple[int, int]]]:
        """Clips of one shape (frames [G, F, P, C], attention and static runs [G, F, P]), all at once: every
        frame's dominant (top attention, ascending) and contextual tokens (DPC-kNN of the rest, centres
        ascending), every window's static clusters. Results go into `table`; returns per clip its (start,
        length) runs there in the official sequence order (per window: static clusters, then per frame its
        dominant and contextual tokens)."""
        o = self.options
        count, size, channels = frames.shape[1:]
        units = frames.flatten(0, 1)  # [G F, P, C]: frame f of clip g is unit g F + f
        # per frame unit, from the host plan: its window's first unit and static threshold, counts, jitter start
        first, threshold, dynamic, dominant, contextual, jitter, base = [], [], [], [], [], [], []
        statics = []  # per static clustering: (its window's first unit, frames, static tokens, clusters, jitter)
        for g, (clip, plan, starts) in enumerate(zip(clips, plans, draws, strict=True)):
            start = iter(starts)
            for w in plan:
                span = w.end - w.start + 1
                for m, c in zip(w.dominant, w.contextual, strict=True):
                    first.append(g * count + w.start)
                    threshold.append(span - 1 if span > 1 else count)  # a one-frame window has no static token
                    dynamic.append(size - w.static)
                    dominant.append(m)
                    contextual.append(c)
                    jitter.append(next(start) if c else 0)
                if span > 1 and w.clusters:
                    statics.append((g * count + w.start, span, w.static, w.clusters, next(start)))
            base += [clip.offset + f * size for f in range(count)]
        device, total, widest = frames.device, len(first), max(dynamic)
        first_t, threshold_t, dynamic_t, dominant_t, base_t = device_ints(
            first + threshold + dynamic + dominant + base, device).view(5, total, 1)
        static = runs.flatten(0, 1).index_select(0, first_t[:, 0]) >= threshold_t
        place = positions_of(~static, widest)  # [U, D] each unit's dynamic tokens, ascending
        real = torch.arange(widest, device=device) < dynamic_t
        scores = weights.flatten(0, 1).gather(1, place).masked_fill(~real, float("-inf"))
        top = ranked(scores, max(dominant))
        top = top.masked_fill(torch.arange(top.shape[1], device=device) >= dominant_t, widest).sort(dim=1).values
        real &= ~torch.zeros(total, widest + 1, dtype=torch.bool, device=device).scatter_(1, top, True)[:, :widest]
        chosen = place.gather(1, top.clamp(max=max(widest - 1, 0)))
        at_dominant = table.add(chosen + base_t, units.gather(1, chosen[..., None].expand(-1, -1, channels)))
        at_contextual = 0
        if max(contextual):  # D > 0 (official default: 0)
            left = [d - m if c else 0 for d, m, c in zip(dynamic, dominant, contextual, strict=True)]
            pool_place = place.gather(1, positions_of(real, max(left)))  # the rest, ascending
            pool = units.gather(1, pool_place[..., None].expand(-1, -1, channels))
            centres, merged = cluster(pool, left, contextual, [max(1, min(o.k, c)) for c in contextual],
                                      windows(noise[None], [(0, j) for j in jitter], max(left)), o.beta)
            chosen = pool_place.gather(1, centres.clamp(max=max(left) - 1))
            at_contextual = table.add(chosen + base_t, merged)
        # run even without a static window in the batch, so the kernels do not depend on the videos
        at_static = self._static(frames, runs, statics, clips, noise, table)
        found: list[list[tuple[int, int]]] = []
        u = s = 0
        slots = max((w[3] for w in statics), default=0)
        for plan in plans:
            here = []
            for w in plan:
                if w.end > w.start and w.clusters:
                    here.append((at_static + s * slots, w.clusters))
                    s += 1
                for m, c in zip(w.dominant, w.contextual, strict=True):
                    here += [(at_dominant + u * max(dominant), m)] if m else []
                    here += [(at_contextual + u * max(contextual), c)] if c else []
                    u += 1
            found.append(here)
        return found

    def _static(self, frames: torch.Tensor, runs: torch.Tensor, statics: list[tuple[int, int, int, int, int]],
                clips: list[Clip], noise: torch.Tensor, table: Pieces) -> int:
        """Every window's static tokens averaged over its frames (summed in frame order), clustered and merged;
        a merged row sits at its centre's position in the window's first frame. Returns where they start in
        `table`."""
        o = self.options
        count, size, channels = frames.shape[1:]
        device = frames.device
        first, span, static, clusters, jitter = [list(column) for column in zip(*statics, strict=True)] or [[]] * 5
        longest, most = max(span, default=1), max(static, default=1)
        bases = [clips[f // count].offset + (f % count) * size for f in first]
        first_t, threshold_t, span_t, base_t = device_ints(first + [s - 1 for s in span] + span + bases,
                                                           device).view(4, len(first), 1)
        place = positions_of(runs.flatten(0, 1).index_select(0, first_t[:, 0]) >= threshold_t, most)  # ascending
        window = windows(frames, [(f // count, f % count) for f in first], longest)  # [S, longest, P, C]
        tokens = window.gather(2, place[:, None, :, None].expand(-1, longest, -1, channels))
        beyond = torch.arange(longest, device=device) >= span_t  # frames past the window
        mean = tokens.masked_fill(beyond[:, :, None, None], 0).sum(dim=1) / span_t[:, :, None]
        centres, merged = cluster(mean, static, clusters, [min(o.k, c) for c in clusters],
                                  windows(noise[None], [(0, j) for j in jitter], most), o.beta)
        return table.add(place.gather(1, centres.clamp(max=most - 1)) + base_t, merged)

    def _assemble(self, ctx: StageContext, table: Pieces, pieces: list[list[tuple[int, int]]],
                  work: torch.Tensor) -> BatchSelection:
        """The [B, K] order and [B, K, C] rows from the table's runs: one index built from views of one arange,
        then two gathers."""
        width = ctx.visual_slots.shape[1]
        counts = [sum(length for _, length in runs) for runs in pieces]
        device = work.device
        filler = table.add(torch.full((1, 1), width, device=device), work.new_zeros(1, 1, work.shape[-1]))
        index = torch.arange(table.size, device=device)
        at = assemble([[index[start : start + length] for start, length in runs] for runs in pieces], max(counts),
                      filler)
        order = torch.cat(table.positions)[at]
        hidden = torch.cat(table.rows)[at].to(ctx.hidden.dtype)
        return BatchSelection(order, counts, width, hidden)
