"""KV-cache bytes: analytic from the tokens each layer caches, and measured from the cache tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clse_exp.efficiency.flops import TextShape


def analytic_kv_bytes(config: Any, tokens_cached_per_layer: Sequence[int], dtype: torch.dtype) -> int:
    """Sum over layers of tokens x (K and V) x kv_heads x head_dim x bytes per element."""
    shape = TextShape.from_config(config)
    per_token = 2 * shape.kv_heads * shape.head_dim * torch.tensor([], dtype=dtype).element_size()
    return per_token * sum(tokens_cached_per_layer)


def measured_kv_bytes(cache: Any) -> int:
    """Bytes held by a transformers DynamicCache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
