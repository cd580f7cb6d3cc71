"""Attention masks for a pruned sequence, in the form each attention backend expects.

The engine knows, per layer, which slots are real (padding and re-padding slots are not) and that slots
are in sequence order. From that it builds the mask itself instead of trusting the one transformers
derives from the (unpruned) 2-D mask and the first layer's cache length.
"""

from __future__ import annotations

import torch


def prefill_pairs(valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, L, L]: slot i may attend slot j when j is real and not after i (slot order is sequence
    order). Every slot also attends to itself, so no softmax row is empty: an empty row (a padding slot)
    gives NaN, which leaks through 0 * NaN into real rows."""
    length = valid.shape[1]
    order = torch.arange(length, device=valid.device)
    allowed = (order[None, None, :] <= order[None, :, None]) & valid[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=valid.device)
    return allowed[:, None]


def decode_pairs(key_valid: torch.Tensor, step: int) -> torch.Tensor:
    """Bool [B, 1, step, K] for `step` new tokens over keys [prompt slots..., generated...]: every real
    prompt slot, and the generated tokens up to each query's own."""
    keys = key_valid.shape[1]
    query_slot = torch.arange(keys - step, keys, device=key_valid.device)
    order = torch.arange(keys, device=key_valid.device)
    allowed = (order[None, None, :] <= query_slot[None, :, None]) & key_valid[:, None, :]
    return allowed[:, None]


def backend_mask(
    allowed: torch.Tensor, key_valid: torch.Tensor, implementation: str, dtype: torch.dtype, padded: bool
) -> torch.Tensor | None:
    """The mask to hand a decoder layer, or None when the backend's own causal path is exact.

    sdpa: bool (True = attend); eager: additive float; flash_attention_2: the 2-D [B, K] padding mask.
    With no padding (`padded`, known on the host: reading it from `key_valid` would stall the device), a square
    prefill on sdpa/flash runs causal by itself and one decoded token needs no mask.
    """
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    if implementation.startswith("flash"):
        return key_valid.long() if padded else None
    queries, keys = allowed.shape[-2:]
    if not padded and queries in (1, keys):
        return None
    return allowed
