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


def kept_rows(kept: Iterable[int], grids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(row index, number of rows of its grid) of each kept ORIGINAL visual index; frames share their grid."""
    sizes = [t * h * w for t, h, w in grids]
    offsets = np.cumsum([0, *sizes])
    kept = np.asarray(sorted(kept), dtype=np.int64)
    rows, heights = np.zeros(len(kept), dtype=np.int64), np.zeros(len(kept), dtype=np.int64)
    for (_, h, w), start, stop in zip(grids, offsets[:-1], offsets[1:], strict=True):
        inside = (kept >= start) & (kept < stop)
        rows[inside] = ((kept[inside] - start) % (h * w)) // w
        heights[inside] = h
    return rows, heights


def row_histogram(rows: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Fraction of kept tokens per horizontal band of the image, top first.

    When every grid has the same number of rows, the bands are those rows (a 6-row grid gives 6 bins).
    Otherwise there are ROW_BINS equal bands and each token's row, the interval [r/h, (r+1)/h) of the
    image height, is spread over the bands it overlaps: equal-width binning of row centres instead would
    leave bands that no row centre falls in empty, a zig-zag of false zeros.
    """
    if not len(rows):
        return np.zeros(0)
    if len(set(heights.tolist())) == 1:
        return np.bincount(rows, minlength=int(heights[0])) / len(rows)
    edges = np.linspace(0.0, 1.0, ROW_BINS + 1)
    low, high = (rows / heights)[:, None], ((rows + 1) / heights)[:, None]
    overlap = np.clip(np.minimum(high, edges[1:]) - np.maximum(low, edges[:-1]), 0.0, None) * heights[:, None]
    return overlap.sum(axis=0) / len(rows)


def positional_summary(records: list[dict]) -> dict:
    """Mean normalised row/column of kept tokens over all samples and their row histogram (see row_histogram)."""
    with_grids = [r for r in records if r.get("grids")]
    if not with_grids:
        return {}
    stacked = np.concatenate([kept_coordinates(r["kept"], r["grids"]) for r in with_grids])
    per_record = [kept_rows(r["kept"], r["grids"]) for r in with_grids]
    rows, heights = np.concatenate([p[0] for p in per_record]), np.concatenate([p[1] for p in per_record])
    return {
        "kept_mean_row": float(stacked[:, 0].mean()),
        "kept_mean_col": float(stacked[:, 1].mean()),
        "kept_row_histogram": row_histogram(rows, heights).round(4).tolist(),
    }
