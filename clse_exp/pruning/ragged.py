"""Ragged per-sample work (clips, frames, segments of different lengths and places) run for the whole batch.

A video method's units of work sit at host-known places that differ per sample: clip c of sample b starts at
token o and holds F x P tokens. Slicing, offsetting and re-assembling them one by one launches kernels per unit,
so the cost grows with the batch; uploading their places is a blocking host-to-device copy. These helpers take
views instead (a view launches nothing) and join them in one kernel, so a batch of units costs what one unit
costs and nothing is read back or uploaded:

- `windows`: equal-length windows of a [B, W, ...] tensor at (sample, start) places -> [G, length, ...];
- `device_ints`: host ints as a device tensor (views of one arange, joined): offsets, counts, budgets;
- `assemble`: per-row lists of 1-D pieces (views of the units' results) joined into [B, width] rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def windows(x: torch.Tensor, places: Sequence[tuple[int, int]], length: int) -> torch.Tensor:
    """[G, length, ...]: x[b, start : start + length] for each (b, start) of `places`. A window reaching past the
    end of x is filled with zeros there (one pad of x, then views), so windows of ragged units can share the
    largest unit's length; the caller masks what lies past each unit."""
    if not places:
        return x.new_zeros(0, length, *x.shape[2:])
    overhang = max(start + length for _, start in places) - x.shape[1]
    if overhang > 0:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, overhang))
    return torch.stack([x[b].narrow(0, start, length) for b, start in places])


def device_ints(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """[len(values)] long on `device` holding the host ints `values` (each >= 0): one arange and one join of
    its elements, whatever the count, where torch.tensor(values) would be a blocking upload."""
    if not values:
        return torch.zeros(0, dtype=torch.long, device=device)
    if min(values) < 0:
        raise ValueError(f"device_ints takes counts and offsets (>= 0), got {min(values)}")
    base = torch.arange(max(values) + 1, device=device)
    return torch.stack([base[v] for v in values])


def assemble(rows: Sequence[Sequence[torch.Tensor]], width: int, fill: int | float | bool) -> torch.Tensor:
    """[len(rows), width]: each row's 1-D pieces joined in order, then `fill` up to `width` (pieces share one
    dtype and device; a row longer than `width` is an error)."""
    sample = next((p for row in rows for p in row), None)
    if sample is None:
        raise ValueError("assemble needs at least one piece (its dtype and device)")
    filler = torch.full((width,), fill, dtype=sample.dtype, device=sample.device)
    pieces: list[torch.Tensor] = []
    for row in rows:
        used = sum(len(p) for p in row)
        if used > width:
            raise ValueError(f"a row of {used} entries does not fit width {width}")
        pieces += [*row, filler[: width - used]]
    return torch.cat(pieces).view(len(rows), width)


CDIST_BY_PRODUCTS_ABOVE = 25  # torch.cdist (default mode) computes by matrix products for more rows than this


def alone_cdist(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """[U, n, n] float32 Euclidean distances within each unit of x [U, n, C] (its first sizes[u] rows real), each
    as torch.cdist computes them for that unit alone: pair by pair up to 25 rows, by matrix products above. The two
    formulas differ in the last bits, so a padded unit takes its own size's formula to match its unpadded self."""
    x = x.float()
    by_products = [int(size > CDIST_BY_PRODUCTS_ABOVE) for size in sizes]
    dist = torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist" if all(by_products) else
                       "donot_use_mm_for_euclid_dist")
    if any(by_products) and not all(by_products):
        products = torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist")
        dist = torch.where(device_ints(by_products, x.device).bool()[:, None, None], products, dist)
    return dist
