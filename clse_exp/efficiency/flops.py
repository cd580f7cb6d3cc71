"""Analytic prefill FLOPs of the LLM from the token count each layer actually processed.

Counts matmul FLOPs only (2 x MACs): the q/k/v/o projections (GQA-aware), the two attention products
QK^T and AV counted in full n x n (as kernels and torch's FlopCounterMode do, causal or not), the SwiGLU
MLP (gate, up, down) and the lm_head rows that produce logits. Norms, RoPE, softmax and residual adds
are ignored, as FlopCounterMode ignores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TextShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> TextShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.hidden_size, text.intermediate_size, text.num_attention_heads,
                   text.num_key_value_heads, head_dim, text.num_hidden_layers, text.vocab_size)


@dataclass(frozen=True)
class PrefillFlops:
    flops: int  # 2 x MACs, summed over layers and the lm_head
    per_layer: tuple[int, ...]
    lm_head: int
    fastv_formula: int  # sum over layers of 4nd^2 + 2n^2d + 2ndm (the FastV paper's count, for comparison)

    @property
    def macs(self) -> int:
        return self.flops // 2


def layer_flops(shape: TextShape, n: int) -> int:
    """One decoder layer over n tokens at prefill."""
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * n * shape.hidden * (2 * q_out + 2 * kv_out)
    attention = 2 * 2 * n * n * q_out
    mlp = 2 * 3 * n * shape.hidden * shape.intermediate
    return projections + attention + mlp


def prefill_flops(config: Any, tokens_per_layer: Sequence[int], logits_positions: int = 1) -> PrefillFlops:
    """FLOPs of one sample's prefill; `tokens_per_layer[j]` = tokens decoder layer j processed."""
    shape = TextShape.from_config(config)
    if len(tokens_per_layer) != shape.layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for a {shape.layers}-layer model")
    per_layer = tuple(layer_flops(shape, n) for n in tokens_per_layer)
    lm_head = 2 * logits_positions * shape.hidden * shape.vocab
    d, m = shape.hidden, shape.intermediate
    fastv = sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer)
    return PrefillFlops(sum(per_layer) + lm_head, per_layer, lm_head, fastv)


def qwen2vl_vision_flops(vision_config: Any, patch_grids: Sequence[Sequence[int]]) -> int:
    """Matmul FLOPs of the Qwen2-VL vision tower for images/videos with patch grids (t, h, w) (before the
    2x2 merge): patch embedding, per block qkv/proj and full attention within each image, the fc1/fc2 MLP,
    and the patch merger. Reported apart from the LLM: pruning inside the LLM does not change it."""
    embed = vision_config.embed_dim
    hidden_mlp = int(embed * vision_config.mlp_ratio)
    patch_in = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    merged = embed * vision_config.spatial_merge_size ** 2
    total = 0
    for t, h, w in patch_grids:
        n = t * h * w
        block = 2 * n * embed * 3 * embed + 2 * n * embed * embed + 4 * n * n * embed + 2 * 2 * n * embed * hidden_mlp
        merger_tokens = n // vision_config.spatial_merge_size ** 2
        merger = 2 * merger_tokens * merged * merged + 2 * merger_tokens * merged * vision_config.hidden_size
        total += 2 * n * patch_in * embed + vision_config.depth * block + merger
    return total


def clip_text_flops(text_config: Any, segments: int, segment_tokens: int, projection_dim: int) -> int:
    """Matmul FLOPs of a CLIP text tower over `segments` sequences of `segment_tokens` tokens (padding is
    computed too): per layer q/k/v/out projections, the full QK^T and AV products, the fc1/fc2 MLP; then the
    text projection of each pooled token. Methods that run it besides the model (CDPruner) report it apart."""
    d, t = text_config.hidden_size, segment_tokens
    layer = 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * text_config.intermediate_size
    return segments * (text_config.num_hidden_layers * layer + 2 * d * projection_dim)
