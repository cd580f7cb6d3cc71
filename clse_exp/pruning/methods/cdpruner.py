"""CDPruner (Zhang et al., 2025): a conditional DPP over the visual tokens at the LLM input.

Official code (Theia-4869/CDPruner@9541616, llava/model/llava_arch.py:140-187 and
llava/model/multimodal_encoder/clip_encoder.py:38-98), LLaVA-1.5 and LLaVA-NeXT only:
- relevance: CLIP's `visual_projection(post_layernorm(.))` of the penultimate-layer PATCH tokens against
  CLIP's text embedding of the raw instruction (tokenised without truncation, zero-padded to a multiple of
  77 tokens, each 77-token segment encoded on its own); cosine, NEGATED, averaged over segments, then min-max
  over the whole tensor with 1e-6 added to the numerator only (theta/exp is commented out: r is linear);
- kernel: L = diag(r) S diag(r), S the cosine similarity of the projector outputs (normalised in the model
  dtype, then float32);
- selection: greedy fast MAP inference, exactly T steps, no stopping rule (argmax: first maximal index),
  the picks sorted into a mask; the survivors are fed as a shorter sequence, so positions are contiguous.
The instruction is the benchmark question without the answer-format line (llava/eval/model_vqa_loader.py:110,
model_vqa_science.py:81); the method reads `Sample.question` of the batch `prepare_samples` saw last (the
runner's `pruner.prepare_samples`, clse_exp.generation.prepare). T = round(keep * N): the cut is at layer 0,
so `budget=average` and `final` give the same count. The official loader runs batch 1 (its whole-tensor
min-max is per image); here relevance, min-max and the DPP are per sample, over all of its images' tokens,
computed for the whole batch at once (one text-tower call, padded [B, N, N] kernels, one greedy loop).
`uniform` keeps original positions and exactly k distinct tokens: it stops the greedy once no token adds a
positive gain (where the official loop takes square roots of non-positive numbers, and its mask collapses
the repeated picks that follow) and fills the rest by relevance.

The CLIP text tower and `visual_projection` are not part of a LLaVA checkpoint: `prune.clip` names the
CLIP checkpoint they come from (loaded once per process with from_pretrained), `tiny` a seeded stand-in for
the tiny offline models, `auto` the one that fits the model's vision tower (see `resolve_clip`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from clse_exp.data.prompts import LETTER_ANSWER, SHORT_ANSWER
from clse_exp.data.sample import Sample
from clse_exp.efficiency.counts import host_side, upload
from clse_exp.efficiency.flops import clip_text_flops
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
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import positions_of

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPTokenizer, CLIPVisionConfig

log = logging.getLogger("clse_exp")

LLAVA15_CLIP = "openai/clip-vit-large-patch14-336"  # LLaVA-1.5's vision tower (ViT-L/14, 336 px, width 1024)
SUPPORTED_FAMILIES = ("llava",)
SMALLEST_CLIP_WIDTH = 768  # ViT-B: no released CLIP vision tower is narrower
ANSWER_FORMATS = (SHORT_ANSWER, LETTER_ANSWER)  # removed from the question, as the official loaders do
TINY_SEED = 0
TINY_PROJECTION = 16


@dataclass(frozen=True)
class ClipParts:
    """What CDPruner takes from a CLIP checkpoint: its tokenizer and text tower with projection, and the
    vision side's post_layernorm and visual_projection. `vision_layer0` (None for the stand-in) is the
    checkpoint's first encoder layer, compared with the model's own to catch a wrong checkpoint."""

    tokenizer: object
    text_model: nn.Module
    text_projection: nn.Module
    post_layernorm: nn.Module
    visual_projection: nn.Module
    segment: int
    vision_layer0: nn.Module | None


def tiny_clip(vision_config: CLIPVisionConfig) -> tuple[CLIPModel, CLIPTokenizer]:
    """A seeded CLIP around `vision_config` (the tiny model's own): a 2-layer text tower over a byte-level CLIP
    tokenizer (no merges; start and end tokens are the two highest ids, as in CLIP's vocabulary) and the
    legacy `eos_token_id=2` of OpenAI's configs, so the pooled token is the end token, as there."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                projection_dim=TINY_PROJECTION)
    vision = vision_config.to_dict() | {"projection_dim": TINY_PROJECTION}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_PROJECTION)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPModel(config)
    return model.eval(), tokenizer


@lru_cache(maxsize=4)
def _load_clip(source: str, vision_json: str, device: str) -> ClipParts:
    """CLIP parts in float32 on `device` (the official towers run in float32: from_pretrained's default under
    its device_map='auto', builder.py:26,147-156)."""
    from transformers import AutoTokenizer, CLIPModel, CLIPVisionConfig  # only runs that use CDPruner pay for it

    if source == "tiny":
        model, tokenizer = tiny_clip(CLIPVisionConfig.from_dict(json.loads(vision_json)))
        log.info("CDPruner CLIP: tiny, a seeded random CLIP text tower and projections (tiny offline models only)")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = CLIPModel.from_pretrained(source, dtype=torch.float32).eval()
        except (OSError, ValueError) as err:
            first = " ".join(str(err).split())[:200]
            raise ConfigError(f"prune.clip={source!r} is not a loadable CLIP checkpoint ({first}); give a hub id "
                              "in the local cache or a directory with a CLIPModel and its tokenizer") from err
        log.info("CDPruner CLIP: %s (text tower, post_layernorm, visual_projection)", source)
    vision = model.vision_model  # only its post_layernorm and first layer are kept (not moved, not held)
    return ClipParts(tokenizer, model.text_model.to(device), model.text_projection.to(device),
                     vision.post_layernorm.to(device), model.visual_projection.to(device),
                     model.config.text_config.max_position_embeddings,
                     None if source == "tiny" else vision.encoder.layers[0].to(device))


def resolve_clip(asked: str, vision_layers: nn.ModuleList, grid_side: int) -> str:
    """`auto`: LLaVA-1.5's CLIP for a ViT-L/14-336 tower (width 1024, 24 x 24 patches); the seeded stand-in
    for a tower narrower than any released CLIP (the tiny offline builds); otherwise the user must name it."""
    if asked != "auto":
        return asked
    width = vision_layers[0].layer_norm1.normalized_shape[0]
    if width == 1024 and grid_side == 24:
        return LLAVA15_CLIP
    if width < SMALLEST_CLIP_WIDTH:
        return "tiny"
    raise ConfigError(f"prune.clip=auto knows LLaVA-1.5's CLIP only ({LLAVA15_CLIP}); this vision tower has width "
                      f"{width} and a {grid_side}x{grid_side} grid: give prune.clip=<hub id or directory of its CLIP>")


def instruction(text: str) -> str:
    """The question the official loaders hand to CLIP: the prompt without its answer-format line."""
    for line in ANSWER_FORMATS:
        text = text.replace(line, "")
    return text


def text_tokens(clip: ClipParts, text: str) -> torch.Tensor:
    """[2, M, segment] the untruncated token ids and attention mask, zero-padded to M whole 77-token segments
    (host tensors: the tokenizer's work, uploaded by the caller)."""
    encoded = clip.tokenizer(text=text, return_tensors="pt")
    length = encoded["input_ids"].shape[1]
    pad = clip.segment * ((length - 1) // clip.segment + 1) - length
    return torch.stack([torch.cat([encoded[key], encoded[key].new_zeros(1, pad)], 1).reshape(-1, clip.segment)
                        for key in ("input_ids", "attention_mask")])


def text_embeds(clip: ClipParts, text: str | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[M, P] one CLIP text embedding per 77-token segment of the untruncated, zero-padded token ids (`text`, or
    its `text_tokens` already on the device: any number of segments, of one instruction or of many, go through
    the tower as the rows of one call; each row is pooled at its own end token, as the stock model does)."""
    if isinstance(text, str):
        with host_side():
            tokens = text_tokens(clip, text)
        text = upload(tokens, device)
    ids, mask = text[0], text[1]
    return clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)


def clip_flops(clip: ClipParts, segments: int, patches: int) -> int:
    """What CDPruner runs of CLIP besides the model: the text tower over `segments` 77-token segments and the
    visual projection of `patches` patch features."""
    projection = clip.visual_projection
    return (clip_text_flops(clip.text_model.config, segments, clip.segment, clip.text_projection.out_features)
            + 2 * patches * projection.in_features * projection.out_features)


def relevance(image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, N] the official relevance of each sample's tokens (image [B, N, P], `valid` [B, N]) against its own
    text segments (text [S, P], owner [B, S]: which segments are sample b's): negated cosine averaged over the
    sample's segments, min-max over its valid tokens with 1e-6 on top (invalid tokens: whatever their rows give)."""
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    # a masked sum over all segments divided by the sample's count: its mean (torch's mean is sum / count)
    score = (-(image @ text.T)).masked_fill(~owner[:, None], 0).sum(dim=-1) / owner.sum(dim=1, keepdim=True)
    invalid = ~valid
    low = score.masked_fill(invalid, float("inf")).amin(dim=1, keepdim=True)
    high = score.masked_fill(invalid, float("-inf")).amax(dim=1, keepdim=True)
    return (score - low + 1e-6) / (high - low)


def fast_map(kernel: torch.Tensor, k: int, fill: torch.Tensor | None = None, valid: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Greedy MAP of a DPP (Chen et al. 2018's incremental Cholesky), k steps, in pick order: kernel [N, N] gives
    [k], kernel [B, N, N] gives [B, k], every sample stepped at once (`valid` [B, N]: its real tokens; a row
    that needs fewer than k picks discards the rest).

    Without `fill` the official loop: no stopping rule (a non-positive gain yields NaN rows and possibly
    repeated picks). With `fill` ([N] or [B, N] priorities) the picks stop at the first step whose gain is not
    positive and the rest are taken by descending priority, so the k picks are distinct. The loop uses tensor
    ops only (no host synchronisation per step); the stopping step is found after it, on the device too.
    Invalid tokens get gain -inf at every step: once a gain of 0 divides an official row, the valid tokens
    may all be at -inf while an invalid one turns NaN, which argmax would take.
    """
    single = kernel.dim() == 2
    if single:
        kernel, fill = kernel[None], None if fill is None else fill[None]
    batch, n = kernel.shape[:2]
    rows = kernel.new_zeros(batch, k, n)
    gain = kernel.diagonal(dim1=1, dim2=2).clone()
    invalid = None if valid is None else ~valid
    if invalid is not None:
        gain.masked_fill_(invalid, float("-inf"))
    picks = torch.empty(batch, k, dtype=torch.long, device=kernel.device)
    gains = kernel.new_empty(batch, k)
    for i in range(k):
        j = torch.argmax(gain, dim=1, keepdim=True)  # [B, 1]: the first maximal index, as the official argmax
        picks[:, i : i + 1] = j
        gains[:, i : i + 1] = gain.gather(1, j)
        earlier = rows[:, :i]
        row = (kernel.gather(1, j[:, :, None].expand(batch, 1, n))[:, 0]
               - torch.einsum("bt,btn->bn", earlier.gather(2, j[:, None].expand(batch, i, 1))[..., 0], earlier)
               ) / torch.sqrt(gains[:, i : i + 1])
        rows[:, i] = row
        gain -= row.square()
        gain.scatter_(1, j, float("-inf"))
        if invalid is not None:
            gain.masked_fill_(invalid, float("-inf"))
    if fill is not None:
        picks = _filled(kernel, picks, gains, fill, invalid)
    return picks[0] if single else picks


def _filled(kernel: torch.Tensor, picks: torch.Tensor, gains: torch.Tensor, fill: torch.Tensor,
            invalid: torch.Tensor | None) -> torch.Tensor:
    """[B, k] the picks up to each row's first step without a positive gain, then its untaken valid tokens by
    descending `fill` (stable: ties by index), all found on the device."""
    k = picks.shape[1]
    stopped = ~(gains > 0)
    steps = torch.arange(k, device=kernel.device)
    first = torch.where(stopped.any(dim=1), stopped.to(torch.int8).argmax(dim=1), k)[:, None]  # [B, 1]
    taken = steps < first
    # picks[:first], repeats or not
    picked = kernel.new_zeros(fill.shape).scatter_add_(1, picks, taken.to(kernel.dtype)) > 0
    if invalid is not None:
        picked |= invalid
    order = torch.sort(fill.masked_fill(picked, float("-inf")), dim=1, descending=True, stable=True).indices
    return torch.where(taken, picks, order.gather(1, (steps - first).clamp(min=0)))


def _missing_checkpoint(source: str) -> str | None:
    """Why `source` (a directory or hub id) cannot be loaded, when that is known without loading it: a
    directory that does not exist, or a hub id absent from the local cache while the hub is offline."""
    from clse_exp.config import looks_local

    if looks_local(source):
        return None if Path(source).expanduser().is_dir() else "no such directory"
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(source, "config.json"), str):
        return "the hub is offline (HF_HUB_OFFLINE) and it is not in the local cache"
    return None


class CDPruner(PruningMethod):
    """Runs at the LLM input (layer 0): similarity of the projector outputs, relevance from CLIP."""

    name = "cdpruner"

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "cdpruner"
        clip: str = "auto"  # CLIP checkpoint of the text tower and visual_projection: hub id, directory, tiny, auto

    def __init__(self, options: MethodOptions | None = None, **knobs: Any) -> None:
        super().__init__(options, **knobs)
        self._questions: list[str] | None = None
        self._checked: set[tuple[str, int]] = set()  # (CLIP source, vision tower) pairs found to match
        self._short = False  # whether this run has said that the official rule kept fewer tokens than asked

    def validate(self) -> None:
        clip = self.options.clip
        if not isinstance(clip, str) or not clip.strip():
            raise ConfigError(f"prune.clip={clip!r}: give a CLIP hub id or directory, `tiny` or `auto`")
        if clip not in ("auto", "tiny"):
            missing = _missing_checkpoint(clip)
            if missing:
                raise ConfigError(f"prune.clip={clip!r} is not a loadable CLIP checkpoint ({missing}); give a hub "
                                  "id in the local cache, a directory with a CLIPModel and its tokenizer, `tiny` or "
                                  "`auto`")

    def default_layers(self, facts: ModelFacts) -> Layers:
        if facts.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"prune=cdpruner supports model families: {', '.join(SUPPORTED_FAMILIES)} "
                              f"(LLaVA-1.5; the official code has no other); got {facts.family}")
        return Layers(0, (0,))

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    def prepare_samples(self, samples: list[Sample], keep: float, protocol: str, loaded: Any
                        ) -> tuple[list[Sample], list[None]]:
        """Unchanged samples; their questions are the instructions of the prefills that follow."""
        self._questions = [sample.question for sample in samples]
        return samples, [None] * len(samples)

    def question(self, ctx: StageContext, b: int) -> str:
        """Sample b's question, from the batch `prepare_samples` saw last (the same number of samples)."""
        questions = self._questions
        if questions is None or len(questions) != ctx.hidden.shape[0]:
            raise RuntimeError("prune=cdpruner reads each sample's question: build the batch's inputs with "
                               "clse_exp.generation.prepare(loaded, samples, pruner), as the runner does")
        return questions[b]

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        return (-1,)  # the last encoder layer's input is hidden_states[-2], the layer LLaVA-1.5 feeds

    def clip_parts(self, ctx: StageContext, b: int) -> ClipParts:
        """The CLIP parts for this model (loaded once per process and device)."""
        side = ctx.grids(b)[0][1]
        source = resolve_clip(self.options.clip, ctx.vision_layers, side)
        vision_json = ctx.vision_layers[0].self_attn.config.to_json_string() if source == "tiny" else ""
        parts = _load_clip(source, vision_json, str(ctx.hidden.device))
        if parts.vision_layer0 is not None and (source, id(ctx.vision_layers)) not in self._checked:
            _check_same_tower(source, parts.vision_layer0, ctx.vision_layers[0])
            self._checked.add((source, id(ctx.vision_layers)))
        return parts

    def announce_shortfall(self, asked: int, kept: int, n_visual: int) -> None:
        """Say once per run that the official rule kept fewer tokens than asked, and why."""
        if self._short:
            return
        self._short = True
        log.warning("prune=cdpruner protocol=official: a sample kept %d of the %d tokens asked (of its %d visual "
                    "tokens): the official greedy DPP runs exactly k steps and its mask collapses the picks it "
                    "repeats once the kernel runs out of rank (no positive gain left); records give each sample's "
                    "retention (protocol=uniform fills the rest by relevance to keep exactly k)", kept, asked, n_visual)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Every sample at once: the questions tokenised on the host and uploaded once (with each segment's
        sample and each sample's count), one text-tower call, batched [B, N, N] kernels and one greedy DPP of
        max(budgets) steps; under `official` the kept counts (what is left once repeats collapse, a number only
        the data sets) are read once. A sample not cut (budget None) keeps its tokens; its rows are computed
        with the batch and ignored."""
        samples = [b for b, k in enumerate(budgets) if k is not None]
        width = ctx.visual_slots.shape[1]
        counts = list(ctx.n_current)
        if not samples:
            return BatchSelection(ctx.visual_slots[:, :0], counts, width)
        clip = self._batch_clip(ctx, samples)
        asked = [n if k is None else k for k, n in zip(budgets, counts, strict=True)]
        with host_side():
            tokens = [text_tokens(clip, instruction(self.question(ctx, b))) for b in samples]
            owners = torch.cat([torch.full((t.shape[1],), b) for b, t in zip(samples, tokens, strict=True)])
            segments = torch.cat(tokens, dim=1)
            packed = torch.cat([segments.flatten(), owners, torch.tensor(asked)])
        packed = upload(packed, ctx.hidden.device)
        rows = segments.shape[1]
        texts = packed[: 2 * rows * clip.segment].view(2, rows, clip.segment)
        owner = packed[2 * rows * clip.segment : -len(asked)]
        wanted = packed[-len(asked) :, None]  # [B, 1]: tokens each sample keeps (all of them where not cut)
        valid = ctx.visual_valid
        present = valid.sum(dim=1, keepdim=True)
        with torch.no_grad():
            text = text_embeds(clip, texts, ctx.hidden.device)
            mine = owner[None] == torch.arange(len(budgets), device=owner.device)[:, None]  # [B, S]
            r = relevance(self._image_features(ctx, clip, present), text, mine, valid)
            features = ctx.visual_hidden()
            if ctx.protocol == "official":
                unit = (features / features.norm(dim=-1, keepdim=True)).float()
            else:
                unit = F.normalize(features.float(), dim=-1)
            unit = unit.masked_fill(~valid[..., None], 0)
            kernel = r[:, :, None] * (unit @ unit.transpose(1, 2)) * r[:, None, :]
            steps = max(budgets[b] for b in samples)
            fill = None if ctx.protocol == "official" else r
            padded = min(ctx.n_current) < width  # no invalid token to keep out otherwise
            picks = fast_map(kernel, steps, fill=fill, valid=valid if padded else None)
        # a set per sample: its live picks (official: repeats collapse), or all of its tokens where not cut
        live = torch.arange(steps, device=picks.device) < wanted
        chosen = valid.new_zeros(len(budgets), width + 1).scatter_(1, torch.where(live, picks, width), True)
        chosen = chosen[:, :width] | (valid & (wanted >= present))
        if ctx.protocol == "official":
            kept = chosen.sum(dim=1, keepdim=True)
            counts = kept[:, 0].tolist()
            for b in samples:
                if counts[b] < budgets[b]:
                    self.announce_shortfall(budgets[b], counts[b], ctx.n_visual[b])
        else:
            kept, counts = wanted, asked
        keep = max(counts)
        order = positions_of(chosen, keep)
        order = torch.where(torch.arange(keep, device=order.device) < kept, order, width)
        flops = [0] * len(budgets)
        for b, t in zip(samples, tokens, strict=True):
            flops[b] = clip_flops(clip, t.shape[1], ctx.n_current[b])
        return BatchSelection(order, counts, width, aux_flops=flops)

    def _batch_clip(self, ctx: StageContext, samples: list[int]) -> ClipParts:
        """The CLIP parts every cut sample resolves to: one text tower runs for the batch."""
        parts = [self.clip_parts(ctx, b) for b in samples]
        if any(part is not parts[0] for part in parts):
            raise ConfigError("prune.clip: the samples of one batch resolve to different CLIP checkpoints; name "
                              "the checkpoint with prune.clip=<hub id or directory>")
        return parts[0]

    @staticmethod
    def _image_features(ctx: StageContext, clip: ClipParts, present: torch.Tensor) -> torch.Tensor:
        """[B, N, P] CLIP's `visual_projection(post_layernorm(.))` of every sample's patch tokens (each image's
        [CLS] dropped), one pass over the batch's patches laid out in `visual_slots` order (filler rows repeat
        real ones); `present` [B, 1]: each sample's visual token count on the device."""
        images = [[image[1:] for image in ctx.vision_inputs(b, -1)] for b in range(len(ctx.n_current))]
        for b, sample in enumerate(images):
            if sum(image.shape[0] for image in sample) != ctx.n_current[b]:
                raise RuntimeError(f"prune=cdpruner: sample {b} has {ctx.n_current[b]} visual tokens but "
                                   f"{sum(image.shape[0] for image in sample)} patch tokens; it needs one per token")
        patches = torch.cat([image for sample in images for image in sample]).float()
        projected = clip.visual_projection(clip.post_layernorm(patches))
        start = present.cumsum(dim=0) - present  # [B, 1] each sample's first patch
        index = (start + torch.arange(ctx.visual_slots.shape[1], device=start.device)).clamp(
            max=projected.shape[0] - 1)
        return projected[index]


def _check_same_tower(source: str, clip_layer: nn.Module, model_layer: nn.Module) -> None:
    """The CLIP checkpoint must be the one the model's vision tower came from (LLaVA-1.5 froze it)."""
    ours, theirs = clip_layer.self_attn.k_proj.weight, model_layer.self_attn.k_proj.weight
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs.float().to(ours.device), rtol=1e-2, atol=1e-3):
        raise ConfigError(f"prune.clip={source!r} is not the CLIP checkpoint this model's vision tower came from "
                          "(their first encoder layers differ): give the matching one")
