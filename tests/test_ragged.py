"""The ragged helpers give what per-unit slicing gives, at a kernel count that does not grow with the units."""

import pytest
import torch

from clse_exp.efficiency.counts import count_ops
from clse_exp.pruning.ragged import alone_cdist, assemble, device_ints, windows


def test_windows_are_the_slices_padded_with_zeros():
    x = torch.randn(3, 10, 4)
    places = [(0, 2), (2, 7), (1, 0)]
    got = windows(x, places, 5)
    assert torch.equal(got[0], x[0, 2:7])
    assert torch.equal(got[1, :3], x[2, 7:10]) and torch.equal(got[1, 3:], torch.zeros(2, 4))
    assert torch.equal(got[2], x[1, :5])
    assert windows(x, [], 5).shape == (0, 5, 4)


def test_device_ints_hold_the_values():
    assert device_ints([3, 0, 7, 3], "cpu").tolist() == [3, 0, 7, 3]
    assert device_ints([], "cpu").shape == (0,)
    with pytest.raises(ValueError, match="-1"):
        device_ints([2, -1], "cpu")


def test_assemble_joins_pieces_and_fills():
    a, b = torch.tensor([1, 2]), torch.tensor([5, 6, 7])
    got = assemble([[a, b], [b[1:]], []], 6, -1)
    assert got.tolist() == [[1, 2, 5, 6, 7, -1], [6, 7, -1, -1, -1, -1], [-1] * 6]
    with pytest.raises(ValueError, match="width 4"):
        assemble([[a, b]], 4, 0)


@pytest.mark.parametrize("units", [1, 16])
def test_kernels_do_not_grow_with_the_units(units):
    x = torch.randn(units, 12, 2)
    places = [(u, u % 3) for u in range(units)]
    with count_ops() as tally:
        w = windows(x, places, 10)
        ints = device_ints([u % 5 for u in range(units)], "cpu")
        assemble([[w[u, :, 0], ints[u : u + 1]] for u in range(units)], 12, 0.0)
    counts = tally.get("all")
    assert counts.syncs == 0
    assert counts.kernels <= 6, counts.kernels  # pad, stack, arange, stack, full, cat


@pytest.mark.parametrize("sizes", [[5, 20], [30, 40], [7, 31, 26]])
def test_alone_cdist_is_each_unit_alone_whatever_the_padding(sizes):
    gen = torch.Generator().manual_seed(len(sizes))
    units = [torch.randn(size, 16, generator=gen) * 10 for size in sizes]
    padded = torch.stack([torch.nn.functional.pad(u, (0, 0, 0, 45 - len(u))) for u in units])
    dist = alone_cdist(padded, sizes)
    for u, unit in enumerate(units):
        assert torch.equal(dist[u, : len(unit), : len(unit)], torch.cdist(unit[None], unit[None])[0])
