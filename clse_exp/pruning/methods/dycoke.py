"""DyCoke (Tao et al., CVPR 2025): temporal token merging (TTM) of a video's frames before the LLM, then dynamic
KV-cache pruning of the visual tokens at every decode step.

Official code (KD-TAO/DyCoke@dd7463498203479d0ff6f2d29c4e72928c0af244, cited DC:<file>:<lines>), LLaVA-OneVision
(Qwen2 LLM) through lmms-eval:
- Knobs and defaults: dycoke=True turns both stages on; dycoke_k=0.7 (TTM merging ratio), dycoke_l=3 (decode
  pruning layer), dycoke_p=0.8 (decode pruning ratio), dycoke_num_tokens_per_frame=196 (14 x 14 pooled frames),
  image_token_start_index=14 (DC:lmms_eval/models/llava_onevision.py:88-93; eval.sh:9 sets only dycoke=True).
- Where: on a video's pooled projector outputs flattened to [F * T, C], before the one newline token is appended,
  i.e. at the LLM input (DC:llava/model/llava_arch.py:384-396, `one_token` newline, `unpad` merge type).
- TTM (DC:llava/model/llava_arch.py:35-89): F = N // T frames. Pairs (i, i + 1), i = 0, 2, ...: frame i kept whole,
  frame i + 1 keeps the int((1 - k) * T) tokens LEAST cosine-similar to the same position in frame i, in
  torch.topk(largest=False) order (ascending similarity), not spatial order (:40-63). Then i = 0, 4, ... < F - 4:
  frame i + 2 (the first of the next pair, whole so far) keeps its int((1 - k) * T) tokens least similar to frame
  i (:66-84). Nothing is averaged: "merging" drops tokens. The frames are concatenated in frame order (:87) and
  fed as a shorter sequence, so positions are contiguous in that order. Quirks kept: the last frame of an odd F
  and the N - F * T tail are dropped (the pair loop never reaches them); frames of the last group of four are
  never compared two apart (range stops at F - 4).
- Decode (DC:llava/model/language_model/modeling_qwen2.py:47-115, 1136-1152, 1268): at every one-token step the
  model's loop resets the KV selection for layers < l (:1138-1139); before layer l it takes layer l - 1's
  attention of the new token (head mean, softmax over every cached key; :98, :700-703, :762-765), restricted to the
  image span [start, start + img_len) with img_len = TTM tokens - 1 (DC:llava_arch.py:390), i.e. every kept visual
  token but the last. Its cosine to the previous step's span attention (:103-111); below 0.9 (or on the first
  step) the top int(img_len * (1 - p)) span keys plus every non-span key are kept for layers >= l (:76-95), gathered
  from the full cache (:72-75), which keeps every key: a pruned key can come back at a later step. At or above 0.9
  nothing sets a selection after the reset, so layers >= l attend to the WHOLE cache that step (the code's
  behaviour, reproduced; the paper describes reusing the previous selection). Gathering keys is masking them.

Here (protocol=official): TTM at layer 0 through Selection(order) in the official order, contiguous positions
(decode positions continue from the cached length); the decode stage through the engine's opt-in decode hook
(`decode_layer` / `decode_keep`), a per-step key mask for layers >= l. Departures (documented, not silent):
- Budget: `merge_ratio` null (default) derives the per-frame count from keep: the official count rule's size,
  (whole frames) * T + (pruned frames) * m, nearest to round(keep * N) (m in [0, T]); a budget below the whole
  frames is unreachable (the sample is flagged). prune.merge_ratio=0.7 is the official setting: m = int(0.3 * T),
  keep is then ignored (every sample flagged, reason logged).
- T defaults to each video's own pooled grid (H * W; 196 on LLaVA-OneVision-7B, as the official constant);
  prune.tokens_per_frame sets it as the official knob does. The image span starts where the video does (the
  official hard-codes 14, the qwen_1_5 template's system prefix).
- F <= 4: the official code stacks an empty list and raises (DC:llava_arch.py:75); we skip its second stage and
  log once.
- Attention state is per prompt: the official config object carries the last step's span attention into the
  next sample's first step (DC:llava_qwen.py:32-38 is built once); here every prompt's first step prunes.
- Batches: the official code reads sample 0 only (:98); here each sample has its own selection. Several videos
  in one prompt: each video gets its own TTM with its share of the budget; the decode span is every visual
  token of the prompt but the last. The TTM runs once per distinct clip plan of the batch (clips of one size
  and per-frame counts, whatever their sample), so its kernels do not grow with the batch.
`uniform`: exactly round(keep * N) visual tokens at their ORIGINAL positions: frames t % 4 == 0 stay whole,
odd frames are compared with t - 1 and frames t % 4 == 2 with t - 2 (the official pattern, the last group
included), the rest of the budget is shared evenly over those frames (earlier frames take the remainder), each
keeping its least-similar tokens (float32); below the whole frames' total, k is shared over the whole frames
instead (each compared with frame t - 4, frame 0 with frame 1).
Its decode stage spans every visual token and keeps round((1 - p) * M). keep=1 runs neither stage (the stock
model). The decode stage changes no prefill and no record (it masks keys per step, as the official code gathers
them, and stores every key), so KV bytes and prefill FLOPs are TTM's; decode attention FLOPs are not reduced in
the report. The decode attention is softmaxed in float32 and cast to the model dtype (official: computed in the
model dtype).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL (`uniform` only; the official code has no Qwen path): the rule above, carried
over literally, per video, on the LLM-input embeddings (the merger's output). Departures: a "frame" is one
temporal grid step (a temporal patch of 2 input frames, its h * w merged tokens); Qwen3-VL lays a video out as
one (1, h, w) segment per temporal patch (timestamps between them), so consecutive one-frame grids of one size
are taken as one video (two same-size images side by side would be merged as one clip); the kept tokens keep
their original M-RoPE positions and decoding continues from the unpruned rope deltas; Qwen3-VL's DeepStack rows
follow the kept tokens (the engine's cut) and the decode stage applies its per-head query norm before RoPE.
`protocol=official` on these families is refused in one line (it names the port). Other families and image
inputs are refused before weights load.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

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
from clse_exp.pruning.methods.vidcom2 import clips_of
from clse_exp.pruning.ragged import assemble, device_ints, windows
from clse_exp.pruning.signals import StageContext

FAMILIES = ("llava_onevision",)  # the official code's family
UNIFORM_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # the uniform rule's (ports on Qwen)
log = logging.getLogger(__name__)


@functools.cache
def announce_short_video() -> None:
    log.warning("prune=dycoke protocol=official: a video of at most 4 frames, where the official code (dd74634) "
                "raises (it stacks an empty list); its second TTM stage (frames two apart) is skipped")


def frame_plan(n: int, per_frame: int) -> tuple[int, int, int]:
    """(whole frames, pruned frames, pairs) of the official TTM on n tokens of `per_frame` tokens each."""
    frames = n // per_frame
    pairs = frames // 2
    second = len(range(0, frames - 4, 4))
    return pairs - second, pairs + second, pairs


def official_per_frame(n: int, per_frame: int, k: int) -> int:
    """Tokens m each pruned frame keeps so the official size, whole * T + pruned * m, is nearest to k."""
    whole, pruned, _ = frame_plan(n, per_frame)
    if pruned == 0:
        return per_frame
    return min(per_frame, max(0, math.floor((k - whole * per_frame) / pruned + 0.5)))


def official_ttm(features: torch.Tensor, per_frame: int, keep: int) -> torch.Tensor:
    """[G, n] indices into each clip of `features` [G, N, C] that the official TTM feeds, in its order: frame after
    frame, a pruned frame's kept tokens by ascending cosine to its reference frame (torch.topk(largest=False)).
    Every clip of the group shares the plan, so each stage is one batched similarity and one top-k."""
    groups, frames = features.shape[0], features.shape[1] // per_frame
    pairs, device = frames // 2, features.device
    if frames <= 4:
        announce_short_video()
    if pairs == 0:
        return torch.zeros(groups, 0, dtype=torch.long, device=device)
    x = features[:, : 2 * pairs * per_frame].view(groups, 2 * pairs, per_frame, -1)
    unit = F.normalize(x, p=2, dim=-1)
    step = 2 * per_frame  # index distance between consecutive pairs' frames
    whole = torch.arange(2 * pairs * per_frame, device=device).view(2 * pairs, per_frame)
    similarity = F.cosine_similarity(unit[:, 0::2], unit[:, 1::2], dim=-1)  # [G, pairs, T]: frame i + 1 vs i
    odd = similarity.topk(keep, largest=False).indices
    odd = odd + torch.arange(per_frame, 2 * pairs * per_frame, step, device=device)[:, None]
    pieces = [piece for i in range(pairs) for piece in (whole[2 * i].expand(groups, -1), odd[:, i])]
    second = len(range(0, frames - 4, 4))  # frame i + 2 vs frame i, i = 0, 4, ... < frames - 4
    if second:
        similarity = F.cosine_similarity(x[:, 0 : 4 * second : 4], x[:, 2 : 4 * second + 2 : 4], dim=-1)
        two = similarity.topk(keep, largest=False).indices
        two = two + torch.arange(step, (4 * second + 2) * per_frame, 2 * step, device=device)[:, None]
        for j in range(second):
            pieces[4 * j + 2] = two[:, j]
    return torch.cat(pieces, dim=1)


def uniform_reference(t: int) -> int | None:
    """The frame a frame is compared with under `uniform` (None: kept whole)."""
    return None if t % 4 == 0 else t - 1 if t % 2 else t - 2


def uniform_ttm(features: torch.Tensor, frames: int, k: int) -> torch.Tensor:
    """[G, k] indices into each clip of `features` [G, F * T, C], ascending. Frames t % 4 == 0 stay whole and the
    rest of k is shared evenly over the other frames (earlier frames take the remainder); below the whole frames'
    total, k is shared over the whole frames instead (compared with frame t - 4, frame 0 with frame 1). A frame
    keeps its tokens least similar to the same position in its reference frame (one batched stable argsort)."""
    groups, device = features.shape[0], features.device
    per_frame = features.shape[1] // frames
    unit = F.normalize(features.float(), dim=-1).view(groups, frames, per_frame, -1)
    whole = [t for t in range(frames) if uniform_reference(t) is None]
    if k >= len(whole) * per_frame:
        shared = [t for t in range(frames) if t not in whole]
        references, spare = [uniform_reference(t) for t in shared], k - len(whole) * per_frame
    else:
        shared, spare = whole, k
        references = [t - 4 if t else 1 for t in shared]
    count = len(shared)  # at least one: every clip has two frames or more
    ints = device_ints(shared + references + [t * per_frame for t in shared], device)  # frames, first tokens
    similarity = (unit.index_select(1, ints[:count]) * unit.index_select(1, ints[count : 2 * count])).sum(-1)
    order = similarity.argsort(dim=-1, stable=True) + ints[2 * count :, None]  # [G, shared, T]
    base = torch.arange(frames * per_frame, device=device).view(frames, per_frame)
    pieces = []
    for t in range(frames):
        if t in shared:
            j = shared.index(t)
            pieces.append(order[:, j, : spare // count + (1 if j < spare % count else 0)])
        elif t in whole:
            pieces.append(base[t].expand(groups, -1))
    return torch.cat(pieces, dim=1).sort(dim=1).values


def proportional(k: int, sizes: list[int]) -> list[int]:
    """k over segments of `sizes` tokens in proportion, largest remainders (earlier first on ties)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))[: k - sum(shares)]:
        shares[i] += 1
    return shares


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DyCoke(PruningMethod):
    name = "dycoke"

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "dycoke"
        merge_ratio: float | None = None  # official dycoke_k (0.7); null: derived from keep (see the module doc)
        tokens_per_frame: int | None = None  # official dycoke_num_tokens_per_frame (196); null: the video's grid
        decode_pruning: bool = True  # the decode-step KV pruning (official: on with dycoke=True)
        decode_layer: int = 3  # official dycoke_l: layer l - 1's attention selects the keys of layers >= l
        decode_ratio: float = 0.8  # official dycoke_p: share of the span's keys pruned at a step
        similarity_threshold: float = 0.9  # below it (attention changed), a step prunes (official constant)

    def validate(self) -> None:
        o = self.options
        if o.merge_ratio is not None and not 0.0 <= o.merge_ratio <= 1.0:
            raise ConfigError(f"prune.merge_ratio={o.merge_ratio} must lie in [0, 1] or be null (official 0.7: "
                              "a pruned frame keeps int((1 - merge_ratio) * tokens_per_frame) tokens)")
        if o.tokens_per_frame is not None and o.tokens_per_frame < 1:
            raise ConfigError(f"prune.tokens_per_frame={o.tokens_per_frame} must be a positive count or null "
                              "(the video's own pooled grid)")
        if not 0.0 <= o.decode_ratio <= 1.0:
            raise ConfigError(f"prune.decode_ratio={o.decode_ratio} must lie in [0, 1] (official 0.8)")
        if o.decode_layer < 1:
            raise ConfigError(f"prune.decode_layer={o.decode_layer} must be at least 1 (layer l - 1's attention "
                              "selects the keys; official 3)")
        if not o.decode_pruning:
            defaults = self.Options()
            for knob in ("decode_layer", "decode_ratio", "similarity_threshold"):
                if getattr(o, knob) != getattr(defaults, knob):
                    raise ConfigError(f"prune.{knob}={getattr(o, knob)} has no effect with prune.decode_pruning=false "
                                      "(it sets the decode-step KV pruning); leave it at its default")

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        o = self.options
        families = FAMILIES if official else UNIFORM_FAMILIES
        if facts.family not in families:
            port = (f"; protocol=uniform runs the port on {', '.join(UNIFORM_FAMILIES[1:])}"
                    if official and facts.family in UNIFORM_FAMILIES else "")
            raise ConfigError(f"prune=dycoke protocol={'official' if official else 'uniform'} merges video frames; "
                              f"model family {facts.family!r} is not supported (supported: {', '.join(families)})"
                              f"{port}")
        if tuple(layers.prune_layers) != (0,):
            raise ConfigError(f"prune=dycoke merges frames at the LLM input: layers.prune_layers="
                              f"{list(layers.prune_layers)} must be [0]")
        if o.decode_pruning and not o.decode_layer < facts.num_layers:
            raise ConfigError(f"prune.decode_layer={o.decode_layer} is outside the model ({facts.num_layers} "
                              "layers); valid layers are 1..{facts.num_layers - 1}")
        if not official and (o.merge_ratio is not None or o.tokens_per_frame is not None):
            raise ConfigError("prune.merge_ratio and prune.tokens_per_frame are official-protocol knobs: "
                              "protocol=uniform keeps exactly round(keep * N) of each video's own frames; leave "
                              "them null")

    def check_inputs(self, videos: bool) -> None:
        if not videos:
            raise ConfigError("prune=dycoke merges tokens across video frames; this dataset has no videos "
                              "(use dataset.variant=video or a video benchmark)")

    def keep_ignored(self, official: bool) -> str | None:
        ratio = self.options.merge_ratio
        if official and ratio is not None:
            return (f"prune.merge_ratio={ratio} sets the tokens each pruned frame keeps (int((1 - merge_ratio) "
                    "* tokens_per_frame), the official rule), not keep")
        return None

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    # ------------------------------------------------------------------------------- stage 1: TTM

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Every clip of every cut sample at once: clips whose host plan matches (size, frame shape and per-frame
        counts) are gathered into one [G, N, C] window tensor and run through one TTM; each sample's order is its
        clips' rows plus their offsets, joined in one kernel. Kernels grow with the distinct plans, not the batch.
        A sample not cut (budget None) keeps its tokens in order."""
        width = ctx.visual_slots.shape[1]
        device = ctx.hidden.device
        official = ctx.protocol == "official"
        plans: dict[tuple, list[tuple[int, int, int]]] = {}  # plan -> (sample, clip, first token) of its clips
        clips_per_sample: dict[int, int] = {}
        for b, k in enumerate(budgets):
            if k is None:
                continue
            clips = clips_of(ctx.grids(b), ctx.family)  # (frames, tokens per frame, offset); frames: temporal steps
            if any(frames < 2 for frames, _, _ in clips):
                raise ConfigError("prune=dycoke merges tokens across video frames; this prompt holds an image (or a "
                                  "one-frame video)")
            sizes = [frames * tokens for frames, tokens, _ in clips]
            clips_per_sample[b] = len(clips)
            for c, ((frames, tokens, offset), share) in enumerate(zip(clips, proportional(k, sizes), strict=True)):
                plans.setdefault(self._plan(official, frames, tokens, share), []).append((b, c, offset))
        if not plans:
            return BatchSelection(ctx.visual_slots[:, :0], list(ctx.n_current), width)
        features = ctx.visual_hidden()  # [B, N_max, C] every sample's visual tokens
        pieces: dict[tuple[int, int], torch.Tensor] = {}
        for plan, units in plans.items():
            x = windows(features, [(b, offset) for b, _, offset in units], plan[1])
            if official:
                picks = official_ttm(x, plan[2], plan[3])
            else:
                picks = uniform_ttm(x, plan[2], plan[3])
            picks = picks + device_ints([offset for _, _, offset in units], device)[:, None]
            pieces.update({(b, c): picks[g] for g, (b, c, _) in enumerate(units)})
        everything = torch.arange(width, device=device) if None in budgets else None
        rows = [[everything[:n]] if k is None else [pieces[b, c] for c in range(clips_per_sample[b])]
                for b, (k, n) in enumerate(zip(budgets, ctx.n_current, strict=True))]
        counts = [sum(len(piece) for piece in row) for row in rows]
        return BatchSelection(assemble(rows, max(counts), width), counts, width)

    def _plan(self, official: bool, frames: int, tokens: int, share: int) -> tuple:
        """What a clip's TTM depends on besides its tokens: (protocol, size, frames or tokens per frame, kept per
        pruned frame or the clip's share); clips with equal plans run as one group."""
        size = frames * tokens
        if not official:
            return ("uniform", size, frames, share)
        per_frame = self.options.tokens_per_frame or tokens
        ratio = self.options.merge_ratio
        m = official_per_frame(size, per_frame, share) if ratio is None else int((1 - ratio) * per_frame)
        return ("official", size, per_frame, min(m, per_frame))

    # --------------------------------------------------------------------------- stage 2: decode
    def decode_layer(self) -> int | None:
        """The layer l whose keys (and every later layer's) a decode step prunes; None: no decode-step work."""
        return self.options.decode_layer if self.options.decode_pruning else None

    def decode_keep(self, layer: nn.Module, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                    keys: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor, n_visual: list[int],
                    memory: dict, official: bool) -> torch.Tensor:
        """[B, S] keys layers >= l attend to this step. `layer` is decoder layer l - 1, `hidden` [B, 1, C] its input
        and `rotary` its (cos, sin); `keys` [B, kv heads, S, d] its cache after this step (post-RoPE); `valid`
        [B, S] real keys; `visual` [B, P] the prompt's visual keys (P <= S, cache order); `n_visual` their count
        per sample; `memory` this prompt's state across steps."""
        attn = layer.self_attn
        batch = hidden.shape[0]
        x = layer.input_layernorm(hidden)
        query = attn.q_proj(x).view(batch, 1, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-VL normalises each head's query before RoPE
            query = attn.q_norm(query)
        query = query.transpose(1, 2)
        cos, sin = (part.unsqueeze(1) for part in rotary)
        query = query * cos + rotate_half(query) * sin
        groups = query.shape[1] // keys.shape[1]
        scores = query @ keys.repeat_interleave(groups, dim=1).transpose(2, 3) * attn.scaling  # [B, H, 1, S]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        if official:
            probs = probs.to(hidden.dtype)
        width = visual.shape[1]
        attention = probs.mean(dim=1)[:, 0, :width].float()  # [B, P]
        span_len = [max(n - 1, 0) if official else n for n in n_visual]
        ratio = 1 - self.options.decode_ratio
        counts = [int(n * ratio) if official else math.floor(n * ratio + 0.5) for n in span_len]
        if "span" not in memory:  # the same every step of this prompt: built (and uploaded) once
            rank = visual.long().cumsum(1) - 1
            limits = torch.tensor([span_len, counts], device=visual.device)
            memory["span"] = visual & (rank < limits[0][:, None])
            memory["counts"] = limits[1][:, None]
        span = memory["span"]
        current = attention.masked_fill(~span, 0.0)
        previous = memory.get("previous")
        if previous is None:
            prune_now = torch.ones(batch, dtype=torch.bool, device=visual.device)
        else:
            dot = (current * previous).sum(1)
            norms = (current.square().sum(1) * previous.square().sum(1)).clamp(min=1e-16).sqrt()
            prune_now = dot / norms < self.options.similarity_threshold
        memory["previous"] = current
        top = max(counts, default=0)
        kept = torch.zeros_like(span)
        if top > 0:
            picks = current.masked_fill(~span, float("-inf")).topk(top, dim=1).indices
            wanted = torch.arange(top, device=visual.device)[None] < memory["counts"]
            kept = F.pad(kept, (0, 1)).scatter(1, torch.where(wanted, picks, width), True)[:, :width]
        drop = span & ~kept & prune_now[:, None]
        drop = F.pad(drop, (0, valid.shape[1] - width))
        return valid & ~drop
