"""Attention masks for a pruned sequence, in the form each attention backend expects.

The engine knows, per layer, which original tokens sit in the key/value slots and which slots are real
(padding and re-padding slots are not). From that it builds the mask itself instead of trusting the
one transformers derives from the (unpruned) 2-D mask and the first layer's cache length.
"""

from __future__ import annotations

import torch


def allowed_pairs(query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, Q, K]: query i may attend key j when j is real and not in its future.

    `query_pos` [B, Q] and `key_pos` [B, K] are ORIGINAL sequence indices (kept order is original order).
    When queries and keys are the same slots (prefill), every slot also attends to itself, so no softmax
    row is empty: an empty row (a padding slot) gives NaN, which leaks through 0 * NaN into real rows.
    """
    allowed = (key_pos[:, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :]
    if query_pos.shape[1] == key_pos.shape[1]:
        allowed |= torch.eye(key_pos.shape[1], dtype=torch.bool, device=key_pos.device)
    return allowed[:, None]


def backend_mask(
    allowed: torch.Tensor, key_valid: torch.Tensor, implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The mask to hand a decoder layer, or None when the backend's own causal path is exact.

    sdpa: bool (True = attend); eager: additive float; flash_attention_2: the 2-D [B, K] padding mask.
    With no padding, a square prefill on sdpa/flash runs causal by itself and one decoded token needs no mask.
    """
    no_padding = bool(key_valid.all())
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    if implementation.startswith("flash"):
        return None if no_padding else key_valid.long()
    queries, keys = allowed.shape[-2:]
    if no_padding and queries in (1, keys):
        return None
    return allowed
