"""What a method may ask about the tokens at a stage; every signal is computed only when asked.

Signals come from layer INPUTS the engine captured during this prefill (the method declares which layers
it reads): hidden states at any of them, attention rows of any query set at any of them (recomputed from
that layer's input, so the layers stay on SDPA/flash), post-RoPE keys, the visual grids, and the vision
tower's attention when the model adapter captured it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clse_exp.pruning.attention import post_rope_keys, query_attention
from clse_exp.pruning.slots import Slots, gather_rows, positions_of


@dataclass
class Capture:
    """A layer's input as the engine passed it: hidden [B, L, C], its slots, and (cos, sin) [B, L, D]."""

    hidden: torch.Tensor
    slots: Slots
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class StageContext:
    """Signals for one stage before decoder layer `layer`, for every sample of the batch.

    Per-sample accessors return the sample's CURRENT visual tokens in slot order: `n_b` of them.
    """

    layer: int
    stage_index: int
    hidden: torch.Tensor  # [B, L, C] input of decoder layer `layer`
    slots: Slots
    cos: torch.Tensor  # [B, L, D] rotary of the current slots
    sin: torch.Tensor
    is_visual: torch.Tensor  # [B, L] bool, visual and real
    visual_rank: torch.Tensor  # [B, L] index into the sample's ORIGINAL visual tokens (-1 elsewhere)
    grids_per_sample: list[list[tuple[int, int, int]]]
    n_visual: list[int]
    layers: nn.ModuleList
    final_norm: nn.Module
    captures: dict[int, Capture] = field(default_factory=dict)
    reference_layer: int = 0
    seed: int = 0
    vision: dict[int, list[list[Any]]] | None = None  # encoder layer -> per sample, per encoded segment input
    vision_layers: nn.ModuleList | None = None  # the image encoder's layers (their norms and projections)
    projector: nn.Module | None = None  # vision features -> LLM embeddings
    # (encoder layer, one vision_inputs item) -> post-RoPE queries and keys [heads, rows, D] (Qwen-VL adapters)
    encoder_queries_keys: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]] | None = None
    attention_dtype: torch.dtype | None = None  # cast probabilities to it before the head mean (official code)
    protocol: str = "uniform"
    family: str = ""
    # per sample, (first, last) sequence index of each visual segment: the non-visual tokens inside one (a
    # Video-LLaVA frame's CLS token) belong to the image or video, not to the text around it
    segment_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    # host-known counts (the engine tracks them, so no accessor reads the device): current visual and real text
    # tokens per sample, and each sample's first real slot (its left padding)
    n_current: list[int] = field(default_factory=list)
    n_text: list[int] = field(default_factory=list)
    first_slot: list[int] = field(default_factory=list)
    keep_counts: torch.Tensor | None = None  # [B] on the device: the visual tokens each sample keeps here
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """A context built outside the engine (tests, tools) reads its counts from the device once."""
        if not self.n_current:
            self.n_current = self.is_visual.sum(1).tolist()
        if not self.n_text:
            self.n_text = (self.slots.valid & ~self.is_visual).sum(1).tolist()
        if self.keep_counts is None:
            self.keep_counts = self.is_visual.sum(1)

    @property
    def visual_slots(self) -> torch.Tensor:
        """[B, max n_b] slot positions of each sample's current visual tokens, ascending; row b is valid up to
        n_current[b] (filler after)."""
        if "visual_slots" not in self._cache:
            self._cache["visual_slots"] = positions_of(self.is_visual, max(self.n_current, default=0))
        return self._cache["visual_slots"]

    @property
    def visual_valid(self) -> torch.Tensor:
        """[B, max n_b] which entries of `visual_slots` are real visual tokens."""
        counts = self.is_visual.sum(1, keepdim=True)
        return torch.arange(self.visual_slots.shape[1], device=counts.device)[None] < counts

    @property
    def text_slots(self) -> torch.Tensor:
        """[B, max t_b] slot positions of each sample's real non-visual tokens, ascending (filler after)."""
        if "text_slots" not in self._cache:
            self._cache["text_slots"] = positions_of(self.slots.valid & ~self.is_visual, max(self.n_text, default=0))
        return self._cache["text_slots"]

    # ------------------------------------------------------------------------------ positions
    def visual_positions(self, b: int) -> torch.Tensor:
        """Slot positions of sample b's current visual tokens, ascending."""
        return self.visual_slots[b, : self.n_current[b]]

    def original_index(self, b: int) -> torch.Tensor:
        """Index of each current visual token among the sample's ORIGINAL visual tokens."""
        return self.visual_rank[b, self.visual_positions(b)]

    def text_positions(self, b: int) -> torch.Tensor:
        """Slot positions of sample b's real non-visual tokens (system prompt, question, template)."""
        return self.text_slots[b, : self.n_text[b]]

    def outside_segments(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        """The slot `positions` whose tokens lie outside every visual segment's span (e.g. drops CLS tokens)."""
        index = self.slots.idx[b, positions]
        inside = torch.zeros_like(index, dtype=torch.bool)
        for first, last in self.segment_spans[b] if self.segment_spans else []:
            inside |= (index >= first) & (index <= last)
        return positions[~inside]

    def sequence_index(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        """Index of the tokens at slot `positions` in the sample's own unpadded prompt (as the official
        batch-1 codes number them)."""
        return self.slots.idx[b, positions] - (self.first_slot[b] if self.first_slot else 0)

    def grids(self, b: int) -> list[tuple[int, int, int]]:
        """Sample b's visual grids (T, H, W), in prompt order; only defined before any visual token is cut."""
        if self.n_current[b] != self.n_visual[b]:
            raise RuntimeError(f"grids are undefined at layer {self.layer}: visual tokens were already cut")
        return self.grids_per_sample[b]

    def generator(self, b: int) -> torch.Generator:
        """A fresh generator seeded by (seed, stage, n_b): same draw for a sample alone or in any batch."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed * 1_000_003 + self.stage_index * 10_007 + self.n_current[b])
        return gen

    def vision_inputs(self, b: int, layer: int) -> list[Any]:
        """Per encoded segment of sample b, in prompt order, the input of image-encoder `layer` (as the
        method's vision_layers() named it), as the model adapter's `vision_layer_inputs` gives it: CLIP
        families give each image's rows [tokens, C] ([CLS] first; images only), Qwen-VL an EncoderRows per
        image or video."""
        if self.vision is None or layer not in self.vision:
            raise RuntimeError(f"image-encoder layer {layer}'s input was not captured; list it in vision_layers()")
        return self.vision[layer][b]

    # ------------------------------------------------------------------------------ hidden states
    def hidden_states(self, b: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[n, C] hidden states at the input of layer K (default: the current visual tokens)."""
        return self.hidden[b, self.visual_positions(b) if positions is None else positions]

    def hidden_at(self, layer: int, b: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[n, C] the same tokens' hidden states at the input of an earlier captured `layer`."""
        capture = self._capture(layer)
        return capture.hidden[b, self._in_capture(capture, b, positions)]

    def reference_hidden_states(self, b: int) -> torch.Tensor:
        """[n_b, C] the current visual tokens at the input of the reference layer L."""
        return self.hidden_at(self.reference_layer, b)

    def normed_hidden(self, b: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The model's final norm applied to layer K's input (DART's feature space)."""
        return self.final_norm(self.hidden_states(b, positions))

    # ------------------------------------------------------------------------------ attention
    def attention(self, b: int, layer: int | None = None) -> torch.Tensor:
        """[n_b] float32: the last prompt token's head-averaged attention over the current visual tokens
        in `layer` (default K-1), softmax over all keys."""
        layer = self.layer - 1 if layer is None else layer
        capture = self._capture(layer)
        return self._last_query_rows(layer)[b, self._in_capture(capture, b, None)]

    def attention_batch(self, layer: int | None = None) -> torch.Tensor:
        """[B, max n_b] float32: `attention` for every sample at once, in `visual_slots` order (entries past a
        sample's count are filler)."""
        layer = self.layer - 1 if layer is None else layer
        capture = self._capture(layer)
        return self._last_query_rows(layer).gather(1, self._visual_in_capture(capture))

    def _last_query_rows(self, layer: int) -> torch.Tensor:
        """[B, L] the last prompt token's head-averaged attention over every slot of `layer`'s input (cached)."""
        if ("last", layer) not in self._cache:
            capture = self._capture(layer)
            batch, length = capture.slots.idx.shape
            last = torch.full((batch, 1), length - 1, dtype=torch.long, device=capture.hidden.device)
            self._cache[("last", layer)] = self._attend(layer, capture, last)[:, 0]
        return self._cache[("last", layer)]

    def visual_hidden(self, layer: int | None = None) -> torch.Tensor:
        """[B, max n_b, C] the current visual tokens' hidden states at the input of `layer` (default K), in
        `visual_slots` order (filler rows past a sample's count)."""
        capture = self._capture(self.layer if layer is None else layer)
        return gather_rows(capture.hidden, self._visual_in_capture(capture))

    def current_layer_attention(self, b: int) -> torch.Tensor:
        """[n_b] float32: like `attention`, with layer K's own norm, projections and RoPE (PDrop)."""
        return self.attention(b, layer=self.layer)

    def attention_rows(self, b: int, queries: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """[Q, n_b] float32: attention of the query tokens (current slot positions, e.g. text raters) over
        the current visual tokens in `layer` (default K-1), head-averaged, softmax over all visible keys."""
        layer = self.layer - 1 if layer is None else layer
        capture = self._capture(layer)
        rows = self._in_capture(capture, b, queries)[None]
        single = Capture(capture.hidden[b : b + 1], _one(capture.slots, b), capture.cos[b : b + 1],
                         capture.sin[b : b + 1])
        return self._attend(layer, single, rows)[0][:, self._in_capture(capture, b, None)]

    def keys_batch(self) -> torch.Tensor:
        """[B, L, kv_heads * head_dim] post-RoPE keys of layer K-1, heads concatenated, at every current slot."""
        capture, keys = self._capture(self.layer - 1), self._captured_keys()
        if capture.slots is self.slots:
            return keys
        return gather_rows(keys, capture.slots.lookup_all(self.slots.idx).clamp(min=0))

    # ------------------------------------------------------------------------------ internals
    def _capture(self, layer: int) -> Capture:
        if layer == self.layer:
            return Capture(self.hidden, self.slots, self.cos, self.sin)
        if layer not in self.captures:
            raise RuntimeError(f"layer {layer}'s input was not captured for the stage at layer {self.layer}; "
                               "the method must list it in capture_layers()")
        return self.captures[layer]

    def _captured_keys(self) -> torch.Tensor:
        """[B, L_capture, kv_heads * head_dim] post-RoPE keys of layer K-1 at its captured slots (cached)."""
        layer = self.layer - 1
        if ("keys", layer) not in self._cache:
            capture = self._capture(layer)
            keys = post_rope_keys(self.layers[layer], capture.hidden, capture.cos, capture.sin)
            self._cache[("keys", layer)] = keys.transpose(1, 2).flatten(2)
        return self._cache[("keys", layer)]

    def _in_capture(self, capture: Capture, b: int, positions: torch.Tensor | None) -> torch.Tensor:
        """Slot positions in `capture` of the current tokens at `positions` (default: visual)."""
        positions = self.visual_positions(b) if positions is None else positions
        if capture.slots is self.slots:
            return positions
        return capture.slots.lookup(self.slots.idx[b, positions], b)

    def _visual_in_capture(self, capture: Capture) -> torch.Tensor:
        """[B, max n_b] slot positions in `capture` of the current visual tokens (filler entries: any slot)."""
        if capture.slots is self.slots:
            return self.visual_slots
        return capture.slots.lookup_all(self.slots.idx.gather(1, self.visual_slots)).clamp(min=0)

    def _attend(self, layer: int, capture: Capture, queries: torch.Tensor) -> torch.Tensor:
        return query_attention(self.layers[layer], capture.hidden, capture.cos, capture.sin, capture.slots.valid,
                               queries, self.attention_dtype)


def _one(slots: Slots, b: int) -> Slots:
    return Slots(slots.idx[b : b + 1], slots.valid[b : b + 1], slots.length)
