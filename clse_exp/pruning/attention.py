"""The last prompt token's attention, recomputed from a layer's input so every layer stays on SDPA/flash.

FastV-style methods need one row of layer K-1's attention: the last query over all keys. Asking the
model for `output_attentions` would force the whole layer to eager and materialise [B, H, N, N];
recomputing one query costs a projection and a [H, 1, N] product.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, D]; cos/sin [B, L, D] as the decoder layers receive them (M-RoPE already folded in)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, -1, head_dim).transpose(1, 2)


def _normed(attn: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    norm = getattr(attn, name, None)  # Qwen3-style per-head q/k norms; absent on Qwen2/Llama
    return norm(x) if norm is not None else x


def _keys(attn: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _apply_rotary(_normed(attn, "k_norm", _heads(attn.k_proj(normed), attn.head_dim)), cos, sin)


def post_rope_keys(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys of `layer` after RoPE, [B, kv_heads, L, head_dim], from the layer's input `hidden` [B, L, C]."""
    return _keys(layer.self_attn, layer.input_layernorm(hidden), cos, sin)


def last_query_attention(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """Head-averaged softmax attention of the LAST slot over all slots of `layer`: float32 [B, L].

    hidden [B, L, C] is the layer's input; cos/sin [B, L, D]; key_valid [B, L] marks real slots. The
    softmax runs in float32 over every real key (text and visual), as eager attention does.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    query = _normed(attn, "q_norm", _heads(attn.q_proj(normed[:, -1:]), attn.head_dim))
    query = _apply_rotary(query, cos[:, -1:], sin[:, -1:])
    keys = _keys(attn, normed, cos, sin)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * attn.scaling
    logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]
