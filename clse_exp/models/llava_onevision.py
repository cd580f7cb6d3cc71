"""LLaVA-OneVision: a base image plus an any-resolution canvas with a newline token after every row.

transformers packs one image's features as (LlavaOnevisionModel.pack_image_features): the base crop's
side x side grid, then, when the image was cut into crops (a sample with one image), the crops stitched
into one canvas, unpadded back to the image's aspect ratio, shrunk when larger than `anyres_max_N` crops,
with `image_newline` after each canvas row. A sample with several images gets only the base grid plus one
newline per image; a video is its frames pooled 2x2 (bilinear, ceil) with one newline after the last frame.
Every one of these tokens, newlines included, is the image (or video) placeholder id in `input_ids`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

from clse_exp.data.sample import Sample
from clse_exp.models.base import ModelAdapter, VisualSegment, runs_of


class LlavaOnevisionAdapter(ModelAdapter):
    """Segments: per image the base grid, then (single-image samples) the canvas; per video (T, p, p).

    Newline tokens are in no segment, so they are never pruned. The placeholder ids alone do not say where
    the newlines are: image layouts need the forward call's `image_sizes` and `batch_num_images`, or, inside
    generate(), which consumes those, the packed image features it passes as `mm_encoder_outputs`.
    """

    family = "llava_onevision"
    layout_keys = ("image_sizes", "batch_num_images")  # where the newlines are (see visual_layout)
    # the SigLIP tower encodes a batch's videos frame by frame (one row per frame, in sample order): each video
    # segment takes its T frames' rows. Images pass the tower too, as base crop plus any-resolution crops that
    # map to no one segment, so encoder-reading methods take videos only on this family
    encoder_kinds = ("video",)
    encodes_frames = True

    def vision_encoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.vision_tower.encoder.layers

    def vision_projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        return {"image": model.config.image_token_id, "video": model.config.video_token_id}

    def prepare_inputs(self, processor: Any, samples: list[Sample], device: torch.device) -> dict:
        """As the base adapter, but images grouped per sample: the processor cuts crops only for a sample with
        exactly one image (`batch_num_images`), as LLaVA-OneVision was trained."""
        texts = [
            processor.apply_chat_template(self.build_messages(s), tokenize=False, add_generation_prompt=True)
            for s in samples
        ]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(s.images for s in samples):
            kwargs["images"] = [list(s.images) for s in samples]
        videos = [s.video for s in samples if s.video is not None]
        if videos:
            kwargs["videos"] = videos
        processor.tokenizer.padding_side = "left"
        return processor(**kwargs).to(device)

    def base_side(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return vision.image_size // vision.patch_size

    def canvas_shape(self, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of an image's any-resolution canvas, as pack_image_features computes them."""
        cfg = model.config
        side = self.base_side(model)
        crops_h, crops_w = get_anyres_image_grid_shape(list(image_size), cfg.image_grid_pinpoints,
                                                       cfg.vision_config.image_size)
        rows, cols = crops_h * side, crops_w * side
        height, width = image_size
        if width / height > cols / rows:  # letterboxed top and bottom: drop the padded rows
            rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
        max_crops = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def _plans_from_sizes(self, model: nn.Module, image_sizes: torch.Tensor,
                          batch_num_images: torch.Tensor | list[int] | None) -> list[list[tuple[int, int, int]]]:
        """Per image, its grids as (offset into the image's tokens, rows, columns), from the processor's sizes.

        Like get_image_features, an image is cut into crops when its sample has one image (every image when
        `batch_num_images` is absent)."""
        side = self.base_side(model)
        sizes = [tuple(size) for size in image_sizes.tolist()]
        counts = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else batch_num_images
        crops = [n == 1 for n in counts for _ in range(n)] if counts is not None else [True] * len(sizes)
        return [[(0, side, side), (side * side, *self.canvas_shape(model, size))] if crop else [(0, side, side)]
                for size, crop in zip(sizes, crops, strict=True)]

    def _plans_from_features(self, model: nn.Module, features: list[torch.Tensor]) -> list[list[tuple[int, int, int]]]:
        """The same plans read from generate()'s pre-computed image features (generate() consumes image_sizes
        before the forward call): `image_newline` rows mark the row ends, the base grid comes first."""
        side = self.base_side(model)
        plans = []
        for feature in features:
            newline = model.model.image_newline.to(feature.device, feature.dtype)
            ends = (feature == newline).all(-1).nonzero().flatten().tolist()
            if ends == [side * side] and len(feature) == side * side + 1:
                plans.append([(0, side, side)])
                continue
            rows, stride = len(ends), (ends[0] - side * side + 1) if ends else 0
            expected = [side * side + (r + 1) * stride - 1 for r in range(rows)]
            if not rows or ends != expected or len(feature) != side * side + rows * stride:
                raise ValueError(f"image features of {len(feature)} rows with newlines at {ends} are not a "
                                 f"{side}x{side} base grid followed by a canvas with one newline per row")
            plans.append([(0, side, side), (side * side, rows, stride - 1)])
        return plans

    def visual_layout(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | list[int] | None = None,
        mm_encoder_outputs: dict | None = None,
        **_: Any,
    ) -> list[list[VisualSegment]]:
        """Image grids come from `image_sizes` (and `batch_num_images`) when given, else from the image
        features generate() passes as `mm_encoder_outputs`; a video's (T, p, p) from its run length."""
        token = self.visual_token_ids(model)
        if image_sizes is not None:
            plans = iter(self._plans_from_sizes(model, image_sizes, batch_num_images))
        elif mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
            plans = iter(self._plans_from_features(model, list(mm_encoder_outputs["image"].pooler_output)))
        else:
            plans = iter([])
        pooled = math.ceil(self.base_side(model) / 2)
        layout = []
        for ids in input_ids:
            segments = []
            positions = (ids == token["image"]).nonzero().flatten().tolist()
            while positions:
                plan = next(plans, None)
                if plan is None:
                    raise ValueError("llava_onevision image tokens need the forward call's image_sizes and "
                                     "batch_num_images (or generate()'s mm_encoder_outputs) to locate the newlines")
                segments += _image_segments(positions, plan)
                offset, rows, cols = plan[-1]  # a canvas ends every row in a newline, a lone base grid ends in one
                positions = positions[offset + rows * (cols + 1) if offset else rows * cols + 1 :]
            for start, length in runs_of(ids, token["video"]):
                frames, rest = divmod(length - 1, pooled * pooled)
                if rest or frames < 1:
                    raise ValueError(f"video run of {length} tokens is not frames x {pooled}x{pooled} + 1 newline")
                segments.append(VisualSegment(start, frames, pooled, pooled, "video"))
            layout.append(sorted(segments, key=lambda s: s.start))
        if next(plans, None) is not None:
            raise ValueError("more images than image token spans in input_ids")
        return layout


def _image_segments(positions: list[int], plan: list[tuple[int, int, int]]) -> list[VisualSegment]:
    """Segments of one image whose tokens start at positions[0]: the base grid has no newlines inside, a
    canvas has one after each row."""
    segments = []
    for offset, rows, cols in plan:
        stride = cols if offset == 0 else cols + 1
        if offset + rows * stride > len(positions):
            raise ValueError(f"an image needs {offset + rows * stride} tokens; only {len(positions)} are left")
        index = [positions[offset + r * stride + c] for r in range(rows) for c in range(cols)]
        consecutive = index[-1] - index[0] == len(index) - 1
        segments.append(VisualSegment(index[0], 1, rows, cols, "image", None if consecutive else tuple(index)))
    return segments
