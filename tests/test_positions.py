"""Positional statistics of kept tokens, against hand-computed grids."""

from clse_exp.metrics.positions import kept_coordinates, positional_summary


def test_coordinates_per_image_grid():
    # Two images: 2x3 then 3x3. Index 5 is image 0's bottom-right; 6 is image 1's top-left; 14 its bottom-right.
    coords = kept_coordinates([0, 5, 6, 14], [[1, 2, 3], [1, 3, 3]])
    assert coords.tolist() == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]


def test_frames_share_a_grid():
    coords = kept_coordinates([4, 13], [[2, 3, 3]])  # frame 0 centre, frame 1 row 1 col 1
    assert coords.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_summary_histogram_sums_to_one():
    summary = positional_summary([{"kept": [0, 1, 8], "grids": [[1, 3, 3]]}])
    assert abs(sum(summary["kept_row_histogram"]) - 1.0) < 1e-9
    assert summary["kept_mean_row"] == (0 + 0 + 1) / 3
