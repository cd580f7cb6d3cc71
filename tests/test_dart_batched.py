"""DART's whole-batch selection on hand-made contexts: a left-padded batch of samples with different visual and
post-image text counts and budgets (one uncut) keeps, per sample, what the sample keeps alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clse_exp.pruning.methods import get_method
from clse_exp.pruning.signals import Capture, StageContext
from clse_exp.pruning.slots import Slots

CHANNELS, HEAD_DIM = 8, 4


class _Layer(nn.Module):
    """What the official key norm reads of layer K-1: the head size and the GQA group count."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.head_dim, self.self_attn.num_key_value_groups = HEAD_DIM, 3


def batch_context(shapes: list[tuple[int, int, int]], budgets: list[int | None], protocol: str) -> StageContext:
    """Samples of (text before, visual, text after) tokens, left-padded to one length; random hidden states and
    layer K-1 keys per token, so a sample's tokens are the same whatever batch it is in."""
    length = max(sum(shape) for shape in shapes)
    hidden, keys = torch.zeros(len(shapes), length, CHANNELS), torch.zeros(len(shapes), length, 2 * HEAD_DIM)
    valid = torch.zeros(len(shapes), length, dtype=torch.bool)
    visual = torch.zeros_like(valid)
    for b, (before, n, after) in enumerate(shapes):
        pad = length - before - n - after
        gen = torch.Generator().manual_seed(before * 100 + n + after)
        hidden[b, pad:] = torch.randn(length - pad, CHANNELS, generator=gen)
        keys[b, pad:] = torch.randn(length - pad, 2 * HEAD_DIM, generator=gen)
        valid[b, pad:] = True
        visual[b, pad + before : pad + before + n] = True
    slots = Slots(torch.arange(length).expand(len(shapes), length), valid, length)
    trig = torch.ones(len(shapes), length, HEAD_DIM), torch.zeros(len(shapes), length, HEAD_DIM)
    ctx = StageContext(
        layer=2, stage_index=0, hidden=hidden, slots=slots, cos=trig[0], sin=trig[1], is_visual=visual,
        visual_rank=(visual.long().cumsum(1) - 1).masked_fill(~visual, -1),
        grids_per_sample=[[(1, 1, n)] for _, n, _ in shapes], n_visual=[n for _, n, _ in shapes],
        layers=nn.ModuleList([_Layer(), _Layer()]), final_norm=nn.Identity(),
        captures={1: Capture(hidden, slots, *trig)}, protocol=protocol,
        first_slot=[length - sum(shape) for shape in shapes],
        keep_counts=torch.tensor([n if k is None else k for (_, n, _), k in zip(shapes, budgets, strict=True)]),
    )
    ctx._cache[("keys", 1)] = keys
    return ctx


@pytest.mark.parametrize("protocol", ["official", "uniform"])
@pytest.mark.parametrize(("shapes", "budgets", "pivots"), [
    ([(2, 40, 3), (5, 25, 0), (1, 9, 6)], [17, None, 5], (4, 4)),
    ([(2, 40, 3), (5, 25, 0), (1, 9, 6)], [30, 10, 2], (4, 4)),  # a budget below the visual pivots (uniform)
    ([(3, 30, 2), (1, 12, 9), (2, 6, 1)], [20, 11, 5], (8, 2)),  # more visual pivots than a sample has
    ([(3, 30, 2), (1, 12, 9)], [7, 7], (1, 0)),
])
def test_a_padded_batch_keeps_what_each_sample_keeps_alone(protocol, shapes, budgets, pivots):
    method = get_method("dart")(visual_pivots=pivots[0], text_pivots=pivots[1])
    together = method.select_batch(batch_context(shapes, budgets, protocol), budgets)
    for b, (shape, k) in enumerate(zip(shapes, budgets, strict=True)):
        alone = method.select_batch(batch_context([shape], [k], protocol), [k])
        assert together.counts[b] == alone.counts[0]
        assert together.order[b, : together.counts[b]].tolist() == alone.order[0].tolist(), f"sample {b}"
        assert (together.order[b, together.counts[b] :] == together.width).all()
        if k is None:
            assert alone.order[0].tolist() == list(range(shape[1]))
        elif protocol == "uniform":
            assert alone.counts[0] == k
