"""Label-free fidelity to the unpruned model: meaningful even for random weights."""

from __future__ import annotations

import torch


def first_token_kl(reference_logits: torch.Tensor, pruned_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_reference || p_pruned) of the first generated token, per sample, in nats. Inputs: [B, V]."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    pruned = torch.log_softmax(pruned_logits.float(), dim=-1)
    return (ref.exp() * (ref - pruned)).sum(-1)
