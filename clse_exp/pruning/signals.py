"""What a method may ask about the tokens at a stage; every signal is computed only when asked."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from clse_exp.pruning.attention import last_query_attention, post_rope_keys
from clse_exp.pruning.slots import Slots


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

    Per-sample accessors return the sample's CURRENT visual tokens in original order: `n_b` of them.
    """

    layer: int
    stage_index: int
    hidden: torch.Tensor  # [B, L, C] input of decoder layer `layer`
    slots: Slots
    cos: torch.Tensor  # [B, L, D] rotary of the current slots (original positions)
    sin: torch.Tensor
    is_visual: torch.Tensor  # [B, L] bool, visual and real
    visual_rank: torch.Tensor  # [B, L] index into the sample's ORIGINAL visual tokens (-1 elsewhere)
    grids_per_sample: list[list[tuple[int, int, int]]]
    n_visual: list[int]
    layers: nn.ModuleList
    final_norm: nn.Module
    reference: Capture | None = None
    previous_layer_input: Capture | None = None
    seed: int = 0

    def visual_positions(self, b: int) -> torch.Tensor:
        """Slot positions of sample b's current visual tokens, ascending."""
        return self.is_visual[b].nonzero().flatten()

    def original_index(self, b: int) -> torch.Tensor:
        """Index of each current visual token among the sample's ORIGINAL visual tokens."""
        return self.visual_rank[b, self.visual_positions(b)]

    def text_positions(self, b: int) -> torch.Tensor:
        """Slot positions of sample b's real non-visual tokens (system prompt, question, template)."""
        return (self.slots.valid[b] & ~self.is_visual[b]).nonzero().flatten()

    def hidden_states(self, b: int) -> torch.Tensor:
        """[n_b, C] visual hidden states at the input of layer K."""
        return self.hidden[b, self.visual_positions(b)]

    def reference_hidden_states(self, b: int) -> torch.Tensor:
        """[n_b, C] the same tokens' hidden states at the input of the reference layer L."""
        if self.reference is None:
            raise RuntimeError("this method needs a reference layer, but none was captured")
        ref = self.reference
        lookup = torch.full((int(ref.slots.idx.max()) + 1,), -1, dtype=torch.long, device=ref.hidden.device)
        lookup[ref.slots.idx[b][ref.slots.valid[b]]] = ref.slots.valid[b].nonzero().flatten()
        return ref.hidden[b, lookup[self.slots.idx[b, self.visual_positions(b)]]]

    def grids(self, b: int) -> list[tuple[int, int, int]]:
        """Sample b's visual grids (T, H, W), in prompt order; only defined before any visual token is cut."""
        if len(self.visual_positions(b)) != self.n_visual[b]:
            raise RuntimeError(f"grids are undefined at layer {self.layer}: visual tokens were already cut")
        return self.grids_per_sample[b]

    @cached_property
    def _attention(self) -> torch.Tensor:
        prev = self._previous()
        return last_query_attention(self.layers[self.layer - 1], prev.hidden, prev.cos, prev.sin, prev.slots.valid)

    @cached_property
    def _keys(self) -> torch.Tensor:
        prev = self._previous()
        keys = post_rope_keys(self.layers[self.layer - 1], prev.hidden, prev.cos, prev.sin)
        return keys.transpose(1, 2).flatten(2)  # [B, L, kv_heads * head_dim]

    def _previous(self) -> Capture:
        if self.previous_layer_input is None:
            raise RuntimeError(f"attention signals need a layer before the cut; layer {self.layer} has none")
        return self.previous_layer_input

    @cached_property
    def _current_attention(self) -> torch.Tensor:
        return last_query_attention(self.layers[self.layer], self.hidden, self.cos, self.sin, self.slots.valid)

    def attention(self, b: int) -> torch.Tensor:
        """[n_b] float32: the last prompt token's head-averaged attention in layer K-1 (softmax over all keys)."""
        return self._attention[b, self.visual_positions(b)]

    def current_layer_attention(self, b: int) -> torch.Tensor:
        """[n_b] float32: like `attention`, but with layer K's own norm, projections and RoPE (PDrop)."""
        return self._current_attention[b, self.visual_positions(b)]

    def keys(self, b: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Post-RoPE keys of layer K-1, heads concatenated, at `positions` (default: the visual tokens)."""
        return self._keys[b, self.visual_positions(b) if positions is None else positions]

    def normed_hidden(self, b: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The model's final norm applied to layer K's input (DART's feature space)."""
        rows = self.hidden[b, self.visual_positions(b) if positions is None else positions]
        return self.final_norm(rows)

    def generator(self, b: int) -> torch.Generator:
        """A fresh generator seeded by (seed, stage, n_b): same draw for a sample alone or in any batch."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed * 1_000_003 + self.stage_index * 10_007 + len(self.visual_positions(b)))
        return gen
