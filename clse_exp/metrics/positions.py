"""Where the kept tokens sit in the image: the raw material for positional-bias analysis.

Attention-based pruning is known to favour late (bottom) rows under RoPE decay; these statistics show it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ROW_BINS = 10


def kept_coordinates(kept: Iterable[int], grids: list[list[int]]) -> np.ndarray:
    """[n_kept, 2] normalised (row, column) in [0, 1] of kept ORIGINAL visual indices, per image/frame
    grid."""
    sizes = [t * h * w for t, h, w in grids]
    offsets = np.cumsum([0, *sizes])
    kept = np.asarray(sorted(kept), dtype=np.int64)
    coords = np.zeros((len(kept), 2))
    for (_, h, w), start, stop in zip(grids, offsets[:-1], offsets[1:], strict=True):
        inside = (kept >= start) & (kept < stop)
        local = (kept[inside] - start) % (h * w)
        coords[inside, 0] = (local // w) / max(h - 1, 1)
        coords[inside, 1] = (local % w) / max(w - 1, 1)
    return coords


def positional_summary(records: list[dict]) -> dict:
    """Mean normalised row/column of kept tokens over all samples and a row histogram (fractions)."""
    coords = [kept_coordinates(r["kept"], r["grids"]) for r in records if r.get("grids")]
    if not coords:
        return {}
    stacked = np.concatenate(coords)
    histogram, _ = np.histogram(stacked[:, 0], bins=ROW_BINS, range=(0.0, 1.0))
    return {
        "kept_mean_row": float(stacked[:, 0].mean()),
        "kept_mean_col": float(stacked[:, 1].mean()),
        "kept_row_histogram": (histogram / max(len(stacked), 1)).round(4).tolist(),
    }
