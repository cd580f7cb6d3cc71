"""Positional statistics of kept tokens, against hand-computed grids."""

import pytest

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


def test_histogram_has_one_bin_per_grid_row():
    # A 6x6 grid (the toy model's): keep the whole of row 1 and one token of row 4. Equal-width binning of
    # normalised rows into 10 bins would leave bins 1, 3, 5, 7 empty whatever is kept.
    kept = list(range(6, 12)) + [27]
    histogram = positional_summary([{"kept": kept, "grids": [[1, 6, 6]]}])["kept_row_histogram"]
    assert histogram == [0.0, round(6 / 7, 4), 0.0, 0.0, round(1 / 7, 4), 0.0]


def test_uniform_keeping_gives_a_flat_histogram_over_rows_of_every_frame():
    histogram = positional_summary([{"kept": list(range(2 * 6 * 4)), "grids": [[2, 6, 4]]}])["kept_row_histogram"]
    assert histogram == [round(1 / 6, 4)] * 6


def test_mixed_grid_heights_spread_each_row_over_the_bands_it_covers():
    # Two kept tokens, so each carries 1/2. Image 0 has 2 rows: its row 0 is the top half, bands 0-4 of 10,
    # 1/5 of the token each. Image 1 has 5 rows: its row 2 is [0.4, 0.6), bands 4 and 5, 1/2 of the token each.
    kept = [0, 4 + 2 * 1]  # image 0 (2x2) row 0; image 1 (5x1) row 2
    histogram = positional_summary([{"kept": kept, "grids": [[1, 2, 2], [1, 5, 1]]}])["kept_row_histogram"]
    expected = [0.1, 0.1, 0.1, 0.1, 0.1 + 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]
    assert histogram == pytest.approx(expected)
    assert all(histogram[i] > 0 for i in range(6))  # no false zeros inside the covered part
