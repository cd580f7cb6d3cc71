"""Attention rows recomputed from a layer's input, so every decoder layer stays on SDPA or flash attention.

Attention-ranking methods need a few rows of one layer's attention (the last prompt token's, or a set of
text "rater" tokens'). Asking the model for `output_attentions` would force the layer to eager and
materialise [B, H, N, N]; recomputing Q rows costs the projections and a [H, Q, N] product. The softmax
runs in float32 over every real key the query may see (causal, in slot order), as eager attention does.
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


def query_attention(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_valid: torch.Tensor,
    queries: torch.Tensor, mean_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Head-averaged softmax attention of the query slots over all slots of `layer`: float32 [B, Q, L].

    hidden [B, L, C] is the layer's input; cos/sin [B, L, D]; key_valid [B, L] marks real slots; queries
    [B, Q] are slot positions. Query q sees the real keys at or before its own slot. `mean_dtype` casts
    the float32 probabilities before the head mean, as eager attention in a half-precision model does.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    rows = queries[..., None].expand(-1, -1, normed.shape[-1])
    query_in = normed.gather(1, rows)
    trig = queries[..., None].expand(-1, -1, cos.shape[-1])
    query = _normed(attn, "q_norm", _heads(attn.q_proj(query_in), attn.head_dim))
    query = _apply_rotary(query, cos.gather(1, trig), sin.gather(1, trig))
    keys = _keys(attn, normed, cos, sin)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * attn.scaling
    slot = torch.arange(hidden.shape[1], device=hidden.device)
    visible = (slot[None, None, :] <= queries[:, :, None]) & key_valid[:, None, :]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if mean_dtype is not None:
        probs = probs.to(mean_dtype)
    return probs.mean(dim=1).float()


def last_query_attention(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """The LAST slot's head-averaged attention over all slots of `layer`: float32 [B, L] (FastV's row)."""
    last = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    return query_attention(layer, hidden, cos, sin, key_valid, last)[:, 0]
