"""Downsampling: the plain baseline that shrinks the image instead of choosing tokens.

VTC-Bench (Chenfei-Liao/VTC-Bench@983e443, ACL 2026) found that downsampling the image to the token budget
beats many pruning methods. Its Qwen2-VL code resizes every image by an integer ratio r with PIL bicubic to
(W // r, H // r) pixels and lets the processor round that to whole 28-px merged patches; videos are passed on
unchanged (external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py:243 the ratio, 259 videos, 260-264 an image,
274-280 several images). Its tables map r to the token budget 1 / r^2 (tools/analyze_results.py:18-20:
r = 2, 3, 4, 5, 10 <-> 0.25, 0.1111, 0.0625, 0.04, 0.01).

Dynamic-resolution families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the image (each video frame) is resized
BEFORE the processor (`prepare_samples`), so the vision tower runs on the smaller grid too. Let gh x gw be
the merged grid the processor makes of the unreduced image (after its own min/max-pixel resize), f the
merged patch size in pixels (28; 32 for Qwen3-VL) and r = 1 / sqrt(keep), snapped to the nearest integer
when within 1e-3 of it (keep=0.1111 is VTC's r=3):
- official: the processor-sized image (gh*f x gw*f px) divided by r as VTC divides the raw image,
  floor(gw*f / r) x floor(gh*f / r) px, bicubic from the raw pixels; the processor then rounds to whole
  merged patches as it does in VTC. Starting from the processor-sized image, not the raw one, keeps the
  processor's max_pixels cap (VTC ran with 2408448, rarely reached) from eating the reduction.
- uniform: the grid nearest the budget, `scaled_grid(gh, gw, keep, nearest=True)`, resized to exactly
  (rows*f x cols*f) px, which the processor leaves as it is.
Video frames are resized like images (VTC leaves videos alone), the number of frames unchanged. VTC also
re-encodes every image as JPEG (qwen2_vl.py:270, at every ratio, the unreduced run included); not done here.
A result below the processor's min_pixels is enlarged by the processor, as in VTC's pipeline (logged); one
enlarged back to the unreduced grid is refused with one line naming model.min_pixels. Records read the
grids the processor really made.

Fixed-resolution families (LLaVA-1.5, Video-LLaVA, LLaVA-OneVision, InternVL): resizing the image would not
change the token count, so each grid (each frame, tile, base image or canvas) of projector outputs is
average-pooled at the LLM input (layer 0), as UniPruneBench's pool baseline does for InternVL tiles
(TianfanPeng/VLMUniPruneBench@f93768f, methods/Pool_PreLLM.py:44-65 adaptive_avg_pool2d of each tile's
row-major grid to side x side, 84-88 side = int(sqrt(target tokens)); custom_internvl.py:43-44, 64-70 the
pooled tokens fed as a shorter sequence). With k the engine's count for the N visual tokens (round(keep * N)):
- official: each side times sqrt(k / N), rounded half up (`scaled_grid`); contiguous positions. LLaVA-1.5's
  24 x 24: keep=0.25 -> 12 x 12 = 144 (a 2 x 2 average pool), 0.11 -> 8 x 8 = 64, 0.33 -> 14 x 14 = 196.
- uniform: the nearest-count grid (`scaled_grid(..., nearest=True)`), each pooled token at the original
  position of its window's centre token.
Adaptive windows overlap when the side does not divide the grid.

The count is whatever the grid holds, not an exact k: every run reports the achieved retention, against the
unreduced token count, and the vision FLOPs of the grids really encoded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from clse_exp.data.sample import Sample
from clse_exp.efficiency.counts import host_side, upload
from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import Layers, ModelFacts, PruningMethod, Rules, Selection
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.signals import StageContext

log = logging.getLogger(__name__)
_WARNED: set[tuple] = set()  # min_pixels enlargements already logged (once per setting, not per sample)

RESIZED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # dynamic resolution: fewer pixels, fewer tokens
INTEGER_RATIO_TOLERANCE = 1e-3


def scaled_grid(h: int, w: int, keep: float, nearest: bool = False) -> tuple[int, int]:
    """An h x w grid shrunk to about keep * h * w cells: each side times sqrt(keep), rounded half up; with
    `nearest`, the floor/ceil combination of the scaled sides whose count is nearest keep * h * w (ties: the
    closer aspect ratio, then fewer cells, then fewer rows). Sides stay within [1, side]."""
    scale = math.sqrt(keep)
    if not nearest:
        return min(h, max(1, math.floor(h * scale + 0.5))), min(w, max(1, math.floor(w * scale + 0.5)))

    def options(side: int) -> set[int]:
        return {min(side, max(1, math.floor(side * scale))), min(side, max(1, math.ceil(side * scale)))}

    target = keep * h * w
    return min(((r, c) for r in options(h) for c in options(w)),
               key=lambda rc: (abs(rc[0] * rc[1] - target), abs(rc[0] / rc[1] - h / w), rc[0] * rc[1], rc))


def vtc_ratio(keep: float) -> float:
    """VTC-Bench's per-side ratio r for a token budget keep = 1 / r^2 (integer when within 1e-3 of one)."""
    ratio = 1.0 / math.sqrt(keep)
    return float(round(ratio)) if abs(ratio - round(ratio)) < INTEGER_RATIO_TOLERANCE else ratio


def target_pixels(grid_h: int, grid_w: int, patch: int, keep: float, protocol: str) -> tuple[int, int]:
    """(width, height) in pixels to resize an image to, whose unreduced merged grid is grid_h x grid_w
    patches of `patch` px: VTC's floor division of the processor-sized image (official), or exactly the
    nearest-count grid (uniform)."""
    if protocol == "official":
        ratio = vtc_ratio(keep)
        return max(1, math.floor(grid_w * patch / ratio)), max(1, math.floor(grid_h * patch / ratio))
    rows, cols = scaled_grid(grid_h, grid_w, keep, nearest=True)
    return cols * patch, rows * patch


def pool_grid(tokens: torch.Tensor, t: int, h: int, w: int, rows: int, cols: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling of each of t frames of an h x w row-major grid [t*h*w, C] to rows x cols:
    the pooled rows [t*rows*cols, C] and, for each, the index of its window's centre token."""
    channels = tokens.shape[-1]
    frames = tokens.reshape(t, h, w, channels).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(frames, (rows, cols)).permute(0, 2, 3, 1).reshape(-1, channels)
    return pooled, _window_centres(t, h, w, rows, cols, tokens.device)


@functools.lru_cache(maxsize=64)
def _window_centres(t: int, h: int, w: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The centre token of each adaptive pooling window, built on the host and uploaded once per grid shape (a
    batch of same-sized images costs one upload, not one per sample)."""
    def centres(side: int, out: int) -> list[int]:  # adaptive windows: [floor(i*side/out), ceil((i+1)*side/out))
        return [((i * side) // out + -(-(i + 1) * side // out) - 1) // 2 for i in range(out)]

    with host_side():
        r, c = torch.tensor(centres(h, rows)), torch.tensor(centres(w, cols))
        index = (torch.arange(t)[:, None, None] * h * w + r[None, :, None] * w + c[None, None, :]).flatten()
    return upload(index, device)


def _min_pixels(part: Any) -> int:
    """The smallest area (px) an image or video processor leaves as it is; below it, it enlarges the image."""
    size = getattr(part, "size", None)
    edge = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    return int(edge or getattr(part, "min_pixels", None) or 0)


def _check_floor(size: tuple[int, int], floor: int, patch: int, unreduced: int, keep: float,
                 what: str) -> tuple[int, int]:
    """`size`, unless the processor's min_pixels would enlarge it to at least the unreduced grid (the run would
    then quietly not be downsampled). A smaller enlargement is what the official pipeline gets too: it is
    logged, and the records count the grid the processor really made."""
    if size[0] * size[1] >= floor:
        return size
    smallest = math.ceil(floor / patch**2)
    if smallest >= unreduced:
        raise ConfigError(f"prune=downsample keep={keep} resizes {what} to {size[0]}x{size[1]} px, below the "
                          f"processor's min_pixels={floor}, which enlarges it back to at least the unreduced "
                          f"{unreduced} tokens: lower model.min_pixels to at most {size[0] * size[1]} (or raise keep)")
    if (keep, what, size, floor) in _WARNED:
        return size
    _WARNED.add((keep, what, size, floor))
    log.warning("prune=downsample keep=%s: %s resized to %dx%d px is below the processor's min_pixels=%d; it will be "
                "enlarged to about %d of %d tokens (the records and retention count what it makes)", keep, what,
                size[0], size[1], floor, smallest, unreduced)
    return size


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.convert("RGB").resize(size, resample=Image.BICUBIC)


class Downsample(PruningMethod):
    """Resize the input (Qwen families) or pool each visual grid at the LLM input (the others)."""

    name = "downsample"

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        """Dynamic-resolution families shrink the image before the model, so no stage layer is ever read."""
        if facts.family in RESIZED_FAMILIES and tuple(layers.prune_layers) != (0,):
            raise ConfigError(f"layers.prune_layers={list(layers.prune_layers)} has no effect: prune=downsample "
                              f"resizes {facts.family} images before the vision tower, not at a decoder layer; leave "
                              "layers.prune_layers null (or [0])")

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers) -> set[int]:
        return set()

    def prepare_samples(self, samples: list[Sample], keep: float, protocol: str, loaded: Any
                        ) -> tuple[list[Sample], list[list[tuple[int, int, int]] | None]]:
        """Qwen families: each image and video frame resized to the budget (see the module docstring); the
        unreduced grids are those the family's own preparation makes of the unreduced samples."""
        if loaded.adapter.family not in RESIZED_FAMILIES:
            return samples, [None] * len(samples)
        inputs = loaded.adapter.prepare_inputs(loaded.processor, samples, torch.device("cpu"))
        grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
        layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], **grids)
        vision = loaded.model.config.vision_config
        patch = vision.patch_size * vision.spatial_merge_size
        floors = {kind: _min_pixels(getattr(loaded.processor, f"{kind}_processor", None))
                  for kind in ("image", "video")}
        reduced, originals = [], []
        for sample, segments in zip(samples, layout, strict=True):
            if not segments:
                reduced.append(sample)
                originals.append(None)
                continue
            by_kind = {"image": [s for s in segments if s.kind == "image"],
                       "video": [s for s in segments if s.kind == "video"]}
            images = [_resize(image, _check_floor(target_pixels(seg.h, seg.w, patch, keep, protocol), floors["image"],
                                                  patch, seg.h * seg.w, keep, "an image"))
                      for image, seg in zip(sample.images, by_kind["image"], strict=True)]
            video = sample.video
            if video is not None:  # one grid, or (Qwen3-VL) one per timestamped temporal patch: frames share it
                seg = by_kind["video"][0]
                size = _check_floor(target_pixels(seg.h, seg.w, patch, keep, protocol), floors["video"], patch,
                                    seg.h * seg.w, keep, "the video frames")
                video = [_resize(frame, size) for frame in video]
            reduced.append(dataclasses.replace(sample, images=images, video=video))
            originals.append([seg.grid for seg in segments])
        return reduced, originals

    def select(self, ctx: StageContext, b: int, k: int) -> Selection:
        if ctx.family in RESIZED_FAMILIES:
            raise RuntimeError(f"prune=downsample resizes {ctx.family} inputs before the processor: build the "
                               "inputs with clse_exp.generation.prepare(loaded, samples, pruner) (or "
                               "pruner.prepare_samples) instead of loaded.prepare")
        hidden, fraction = ctx.hidden_states(b), k / ctx.n_visual[b]
        rows, order, offset = [], [], 0
        for t, h, w in ctx.grids(b):
            sides = scaled_grid(h, w, fraction, nearest=ctx.protocol == "uniform")
            pooled, centres = pool_grid(hidden[offset : offset + t * h * w], t, h, w, *sides)
            rows.append(pooled)
            order.append(centres + offset)
            offset += t * h * w
        return Selection(torch.cat(order), torch.cat(rows))
