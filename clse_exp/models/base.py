"""What every model family exposes to the runner and the pruning engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clse_exp.data.sample import Sample
from clse_exp.pruning.methods.base import ModelFacts


@dataclass(frozen=True)
class VisualSegment:
    """One image (or one video) inside a prompt: where its tokens sit and how they are laid out.

    `start` indexes the (padded) input sequence; the segment covers `t * h * w` tokens laid out row-major
    as frame, row, column, exactly as the LLM sees them (after Qwen's 2x2 merge). They are consecutive
    unless `index` lists their sequence positions in that order (families that interleave separator
    tokens, e.g. a newline token after each row, which belong to no grid and are never pruned).
    """

    start: int
    t: int
    h: int
    w: int
    kind: str = "image"
    index: tuple[int, ...] | None = None

    @property
    def length(self) -> int:
        return self.t * self.h * self.w

    @property
    def positions(self) -> range | tuple[int, ...]:
        """Sequence positions of the grid's tokens, in (frame, row, column) order."""
        return range(self.start, self.start + self.length) if self.index is None else self.index

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.t, self.h, self.w)


@dataclass
class LoadedModel:
    """A model, its processor and the adapter that knows the family's layout."""

    name: str
    model: nn.Module
    processor: Any
    adapter: ModelAdapter
    cfg: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or with a device map (accelerate) its first compute device."""
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            first = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.adapter.decoder_layers(self.model))

    def prepare(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Batch `samples` into model inputs (left padding), on the model's device.

        Raises ValueError when the processor dropped a sample's images or video (no visual token in its
        prompt): answered from the text alone, it would otherwise pass for a pruned sample."""
        inputs = self.adapter.prepare_inputs(self.processor, samples, self.device)
        check_visuals_reached(self.adapter, samples, self.layout(inputs))
        return inputs

    def layout(self, inputs: dict) -> list[list[VisualSegment]]:
        """Per sample, the visual segments of a batch this model's processor prepared."""
        return self.adapter.layout(self.model, inputs)


@dataclass
class EncoderRows:
    """One image's (or video's) rows at the input of a vision-encoder layer, for encoders that pack every
    image of a call into one sequence and attend within blocks of it (Qwen-VL)."""

    hidden: torch.Tensor  # [rows, C] in the encoder's own row order
    cos: torch.Tensor  # [rows, D] the layer's rotary, same order
    sin: torch.Tensor
    blocks: list[int]  # lengths of the row blocks the layer attends within (frames, or windows), in order
    token: torch.Tensor  # [rows] the visual token (grid order, within this image) each row merges into


class ModelAdapter:
    """Family-specific knowledge: where the decoder layers are and where the visual tokens sit."""

    family: str = ""
    mrope: bool = False  # multimodal rotary positions: 3-D position ids (Qwen-VL families)
    encoder_kinds: tuple[str, ...] = ("image",)  # visual kinds that pass vision_encoder_layers(), in call order
    encodes_frames: bool = False  # the encoder's batch rows are video frames: a segment takes its T rows, stacked
    token_pixels: int = 28  # image pixels per visual token side (Qwen2-VL: 14-pixel patches merged 2 x 2)
    # (encoder layer, one vision_layer_inputs item) -> its post-RoPE queries and keys [heads, rows, D], for
    # families whose encoder attention a method recomputes from a packed layer input (Qwen-VL); else None
    vision_queries_keys: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]] | None = None
    input_kinds: tuple[str, ...] = ("image", "video")  # the visual inputs the family's processor and model take
    # processor outputs besides input_ids that visual_layout() needs (e.g. grids or image sizes)
    layout_keys: tuple[str, ...] = ()

    def facts(self, config: Any) -> ModelFacts:
        """What a pruning method may know about the model, from its config alone (no weights)."""
        return ModelFacts(self.family, config.get_text_config().num_hidden_layers, self.mrope)

    def text_model(self, model: nn.Module) -> nn.Module:
        """The LLM decoder stack (the module whose forward builds masks and rotary embeddings)."""
        return model.model.language_model

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        """The module that receives `input_ids` and grids at every forward call."""
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.text_model(model).layers

    def vision_towers(self, model: nn.Module) -> list[nn.Module]:
        """The vision encoders (timed separately from the LLM prefill)."""
        return [model.model.vision_tower]

    def vision_encoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The image encoder's transformer layers, whose inputs methods such as VisionZip read."""
        raise ValueError(f"model family {self.family!r} does not expose its vision encoder layers to pruning "
                         "methods; families that do: llava")

    def vision_projector(self, model: nn.Module) -> nn.Module:
        """Vision features -> LLM input embeddings (methods that merge before the projector apply it)."""
        raise ValueError(f"model family {self.family!r} does not expose its projector to pruning methods")

    def vision_layer_inputs(self, model: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, tower_kwargs: dict
                            ) -> list[Any]:
        """Per image of one encoder call, in call order, what a method reads of a layer's input `hidden`:
        here the batched encoder's rows [tokens, C] of each image ([CLS] first for CLIP)."""
        return list(hidden.detach().unbind(0))

    def vision_flops(self, model: nn.Module, segments: list[VisualSegment]) -> int | None:
        """Analytic vision-encoder FLOPs for one sample's images, where the family has a formula."""
        return None

    def visual_token_ids(self, model: nn.Module) -> dict[str, int]:
        """Placeholder token ids, by kind ("image", "video")."""
        raise NotImplementedError

    def visual_layout(self, model: nn.Module, input_ids: torch.Tensor, **grids: Any) -> list[list[VisualSegment]]:
        """Per sample, the visual segments of the prompt, in order."""
        raise NotImplementedError

    def layout(self, model: nn.Module, inputs: dict) -> list[list[VisualSegment]]:
        """visual_layout() of a processor's output: the family picks the keys it needs (`layout_keys`), so
        callers never name one family's keys."""
        return self.visual_layout(model, inputs["input_ids"], **{k: inputs[k] for k in self.layout_keys
                                                                  if inputs.get(k) is not None})

    def build_messages(self, sample: Sample) -> list[dict]:
        """The chat for one sample: the images (or video) first, then the question."""
        content: list[dict] = [{"type": "image"} for _ in sample.images]
        if sample.video is not None:
            content.append({"type": "video"})
        content.append({"type": "text", "text": sample.question})
        return [{"role": "user", "content": content}]

    def prepare_inputs(self, processor: Any, samples: list[Sample], device: torch.device) -> dict:
        """Chat prompts through the family's processor, left-padded; images flattened in sample order."""
        texts = [
            processor.apply_chat_template(self.build_messages(s), tokenize=False, add_generation_prompt=True)
            for s in samples
        ]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        images = [img for s in samples for img in s.images]
        videos = [s.video for s in samples if s.video is not None]
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        processor.tokenizer.padding_side = "left"
        return processor(**kwargs).to(device)


def sample_kinds(sample: Sample) -> list[str]:
    """The visual input kinds a sample carries ("image", "video"); empty for a text-only question."""
    return (["image"] if sample.images else []) + (["video"] if sample.video is not None else [])


def check_visuals_reached(adapter: ModelAdapter, samples: list[Sample], layout: list[list[VisualSegment]]) -> None:
    """Refuse a batch in which a sample with images or a video has no visual token in its prompt."""
    for sample, segments in zip(samples, layout, strict=True):
        if sample_kinds(sample) and not segments:
            raise ValueError(f"sample {sample.id!r}: the {adapter.family} processor dropped its "
                             f"{' and '.join(sample_kinds(sample))} (no visual token in the prompt); model family "
                             f"{adapter.family!r} takes: {', '.join(adapter.input_kinds)}")


def runs_of(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs `(start, length)` of `token_id` in a 1-D id sequence."""
    hits = (ids == token_id).nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for pos in hits:
        if runs and runs[-1][0] + runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pos, 1))
    return runs
