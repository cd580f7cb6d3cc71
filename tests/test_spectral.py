"""Specification of CLSE scoring (clse_exp.pruning.spectral) against the official reference and numpy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clse_exp.pruning.spectral import (
    FILTERS,
    clse_scores,
    evolution_factor,
    frequency_mask,
    spectral_energy,
    top_k_indices,
)

# Official CLSE scoring on one case (a copy of shared/reference/clse_scores_24x24.npz).
REFERENCE = Path(__file__).parent / "data" / "clse_scores_24x24.npz"
GRID = (1, 24, 24)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {key: data[key] for key in data.files}


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


# ---------------------------------------------------------------- slow, obviously-correct references


def slow_mask(shape, filter, cutoff_ratio=0.1, band=None, order=2) -> np.ndarray:
    """Per-pixel loop over the centred spectrum, straight from the formulas in clse-method.md."""
    radius = min(shape) // 2
    cutoff = radius * cutoff_ratio
    mask = np.zeros(shape)
    for index in np.ndindex(*shape):
        d = math.sqrt(sum((i - size // 2) ** 2 for i, size in zip(index, shape, strict=True)))
        if filter == "gaussian_highpass":
            value = 1.0 if cutoff_ratio == 0 else 1 - math.exp(-(d**2) / (2 * cutoff**2))
        elif filter == "gaussian_lowpass":
            value = math.exp(-(d**2) / (2 * cutoff**2))
        elif filter == "ideal_highpass":
            value = 1.0 if d > cutoff else 0.0
        elif filter == "butterworth_highpass":
            value = 0.0 if d == 0 else 1 / (1 + (cutoff / d) ** (2 * order))
        else:
            value = 1.0 if band[0] * radius <= d <= band[1] * radius else 0.0
        mask[index] = value
    return mask


def numpy_energy(x: np.ndarray, grid, mask: np.ndarray, spectral: str = "frame2d") -> np.ndarray:
    """numpy.fft version of the spectral energy, [B, N, C] -> [B, N]."""
    t, h, w = grid
    batch, n, channels = x.shape
    maps = x.astype(np.float64).reshape(batch, t, h, w, channels)
    axes = (2, 3) if spectral == "frame2d" else (1, 2, 3)
    spectrum = np.fft.fftshift(np.fft.fftn(maps, axes=axes), axes=axes)
    shaped_mask = mask[..., None] if spectral == "3d" else mask[None, :, :, None]
    filtered = np.fft.ifftn(np.fft.ifftshift(spectrum * shaped_mask, axes=axes), axes=axes)
    return np.abs(filtered).mean(axis=-1).reshape(batch, n)


def filter_kwargs(filter: str) -> dict:
    return {"filter": filter, "cutoff_ratio": 0.3, "band": (0.2, 0.7) if filter == "bandpass" else None}


# ---------------------------------------------------------------- the official reference vectors


def test_reference_spectral_energy(ref):
    for z, spec in (("z_ref", "spec_ref"), ("z_cur", "spec_cur")):
        got = spectral_energy(_t(ref[z]), GRID, cutoff_ratio=0.1)
        np.testing.assert_allclose(got.numpy(), ref[spec], atol=1e-5, rtol=0)


def test_reference_evolution(ref):
    got = evolution_factor(_t(ref["spec_ref"]), _t(ref["spec_cur"]), temperature=0.1)
    np.testing.assert_allclose(got.numpy(), ref["evolution"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("score_type", ["clse", "clse_attn"])
def test_reference_scores(ref, score_type):
    got = clse_scores(
        _t(ref["z_ref"]),
        _t(ref["z_cur"]),
        GRID,
        attn=_t(ref["attn"]),
        score_type=score_type,
        cutoff_ratio=0.1,
        temperature=0.1,
    )
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref[score_type], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fraction", ["0.1", "0.25", "0.5"])
def test_reference_top_indices(ref, fraction):
    scores = clse_scores(_t(ref["z_ref"]), _t(ref["z_cur"]), GRID, attn=_t(ref["attn"]))
    k = round(float(fraction) * 576)
    got = top_k_indices(scores, k)
    assert got.dtype == torch.long
    np.testing.assert_array_equal(got.numpy(), ref[f"top_clse_attn_{fraction}"])


# ---------------------------------------------------------------- batching, grids, dtypes


def test_batch_equals_per_sample(ref):
    generator = torch.Generator().manual_seed(0)
    z_ref = torch.cat([_t(ref["z_ref"]), torch.randn(1, 576, 64, generator=generator)])
    z_cur = torch.cat([_t(ref["z_cur"]), torch.randn(1, 576, 64, generator=generator)])
    attn = torch.cat([_t(ref["attn"]), torch.rand(1, 576, generator=generator)])
    batched = clse_scores(z_ref, z_cur, GRID, attn=attn)
    for b in range(2):
        single = clse_scores(z_ref[b : b + 1], z_cur[b : b + 1], GRID, attn=attn[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_multi_image_scores_each_image_on_its_own_grid(as_tensor):
    grids = [(1, 6, 8), (1, 5, 5)]
    generator = torch.Generator().manual_seed(1)
    z_ref, z_cur = torch.randn(2, 2, 73, 16, generator=generator)
    parts = lambda z: (z[:, :48], z[:, 48:])  # noqa: E731
    s_ref = torch.cat([spectral_energy(p, g) for p, g in zip(parts(z_ref), grids, strict=True)], dim=1)
    s_cur = torch.cat([spectral_energy(p, g) for p, g in zip(parts(z_cur), grids, strict=True)], dim=1)
    expected = evolution_factor(s_ref, s_cur)
    grid_thw = torch.tensor(grids) if as_tensor else grids
    got = clse_scores(z_ref, z_cur, grid_thw, score_type="clse")
    torch.testing.assert_close(got, expected)
    # one grid over the concatenation would be a different (wrong) answer
    assert not torch.allclose(
        got[:, :48], clse_scores(z_ref[:, :48], z_cur[:, :48], grids[0], score_type="clse")
    )


def test_frame2d_scores_each_frame_separately():
    x = torch.randn(1, 3 * 4 * 6, 8, generator=torch.Generator().manual_seed(2))
    frames = [spectral_energy(x[:, i * 24 : (i + 1) * 24], (1, 4, 6)) for i in range(3)]
    torch.testing.assert_close(spectral_energy(x, (3, 4, 6)), torch.cat(frames, dim=1))


def test_bfloat16_input_is_computed_in_float32(ref):
    x = _t(ref["z_ref"]).bfloat16()
    got = spectral_energy(x, GRID)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, spectral_energy(x.float(), GRID))
    scores = clse_scores(x, _t(ref["z_cur"]).bfloat16(), GRID, attn=_t(ref["attn"]).bfloat16())
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_zero_cutoff_is_all_pass():
    x = torch.randn(2, 2 * 5 * 7, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(frequency_mask((5, 7), cutoff_ratio=0.0), torch.ones(5, 7))
    for spectral in ("frame2d", "3d"):
        got = spectral_energy(x, (2, 5, 7), spectral=spectral, cutoff_ratio=0.0)
        torch.testing.assert_close(got, x.abs().mean(dim=-1), atol=1e-5, rtol=0)


def test_attn_only_needs_no_hidden_states():
    attn = torch.rand(2, 10, dtype=torch.float16)
    got = clse_scores(None, None, (1, 2, 5), attn=attn, score_type="attn")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, attn.float())


def test_top_k_keeps_original_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k_indices(scores, 3).tolist() == [[1, 3, 4], [0, 1, 2]]


# ---------------------------------------------------------------- filters against slow references


@pytest.mark.parametrize("shape", [(24, 24), (7, 10), (4, 6, 8)])
@pytest.mark.parametrize("filter", FILTERS)
def test_mask_matches_per_pixel_formula(shape, filter):
    kwargs = filter_kwargs(filter)
    got = frequency_mask(shape, **kwargs, order=3)
    assert got.shape == shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), slow_mask(shape, **kwargs, order=3), atol=1e-6, rtol=0)


def test_mask_is_centred_on_the_middle_index():
    mask = frequency_mask((6, 9), cutoff_ratio=0.5)
    assert mask[3, 4] == 0 and mask.min() == 0  # the DC term after fftshift sits at (H//2, W//2)


def test_cached_mask_cannot_be_corrupted_by_a_caller():
    frequency_mask((5, 5), cutoff_ratio=0.2).fill_(7.0)
    assert frequency_mask((5, 5), cutoff_ratio=0.2).max() <= 1


@pytest.mark.parametrize("filter", FILTERS)
def test_frame2d_energy_matches_numpy_fft(filter):
    grid = (2, 6, 10)
    x = torch.randn(2, 120, 5, generator=torch.Generator().manual_seed(4))
    kwargs = filter_kwargs(filter)
    expected = numpy_energy(x.numpy(), grid, slow_mask(grid[1:], **kwargs))
    np.testing.assert_allclose(spectral_energy(x, grid, **kwargs).numpy(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("filter", ["gaussian_highpass", "bandpass"])
def test_3d_energy_matches_numpy_fftn(filter):
    grid = (4, 6, 5)
    x = torch.randn(2, 120, 3, generator=torch.Generator().manual_seed(5))
    kwargs = filter_kwargs(filter)
    expected = numpy_energy(x.numpy(), grid, slow_mask(grid, **kwargs), spectral="3d")
    got = spectral_energy(x, grid, spectral="3d", **kwargs)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_evolution_uses_unbiased_std_and_temperature():
    s_ref = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    s_cur = torch.tensor([[1.5, 2.0, 1.0, 9.0]])
    e = np.minimum(np.abs(s_cur.numpy() - s_ref.numpy()) / (s_ref.numpy().mean() + s_ref.numpy() + 1e-6), 1)
    z = (e - e.mean()) / (e.std(ddof=1) + 1e-6)
    expected = 1 / (1 + np.exp(-z / 0.5))
    np.testing.assert_allclose(evolution_factor(s_ref, s_cur, temperature=0.5).numpy(), expected, atol=1e-6)


# ---------------------------------------------------------------- clear errors


def test_unknown_filter_lists_choices():
    with pytest.raises(ValueError, match="filter='lowpass'.*gaussian_highpass.*bandpass"):
        frequency_mask((8, 8), filter="lowpass")


def test_bandpass_needs_a_valid_band():
    for band in (None, (0.5, 0.2), (-0.1, 0.3)):
        with pytest.raises(ValueError, match="band"):
            frequency_mask((8, 8), filter="bandpass", band=band)


def test_unknown_score_type_lists_choices():
    z = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="score_type='fastv'.*clse, clse_attn, attn"):
        clse_scores(z, z, (1, 2, 2), attn=torch.ones(1, 4), score_type="fastv")


def test_attention_scores_need_attn():
    z = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="needs attn"):
        clse_scores(z, z, (1, 2, 2), score_type="clse_attn")


def test_token_count_must_match_grid():
    with pytest.raises(ValueError, match=r"10 tokens.*T\*H\*W = 12"):
        spectral_energy(torch.zeros(1, 10, 2), (1, 3, 4))
    z = torch.zeros(1, 10, 2)
    with pytest.raises(ValueError, match="holds 20 tokens"):
        clse_scores(z, z, [(1, 2, 5), (1, 2, 5)], score_type="clse")


def test_3d_spectrum_of_one_frame_suggests_frame2d():
    with pytest.raises(ValueError, match=r"\(1, 24, 24\).*spectral=frame2d"):
        spectral_energy(torch.zeros(1, 576, 4), (1, 24, 24), spectral="3d")


@pytest.mark.parametrize("grid", [(1, 6, 6), (1, 5, 7), (2, 4, 5), (3, 6, 4)])
@pytest.mark.parametrize("filter_name", ["gaussian_highpass", "ideal_highpass", "butterworth_highpass",
                                         "gaussian_lowpass", "bandpass"])
@pytest.mark.parametrize("spectral", ["frame2d", "3d"])
def test_real_fft_path_equals_the_complex_shifted_filter(grid, filter_name, spectral):
    """The fast path (rfft, unshifted even mask) against the literal recipe: fft, fftshift, mask, ifftshift,
    ifft, complex magnitude."""
    t, h, w = grid
    if spectral == "3d" and min(grid) // 2 == 0:
        return
    knobs = {"filter": filter_name, "cutoff_ratio": 0.3, "band": (0.2, 0.8) if filter_name == "bandpass" else None}
    x = torch.randn(2, t * h * w, 5, generator=torch.Generator().manual_seed(0))
    maps = x.reshape(2, t, h, w, 5)
    if spectral == "frame2d":
        maps, dims, shape = maps.permute(0, 1, 4, 2, 3), (-2, -1), (h, w)
    else:
        maps, dims, shape = maps.permute(0, 4, 1, 2, 3), (-3, -2, -1), (t, h, w)
    mask = frequency_mask(shape, **knobs)
    centred = torch.fft.fftshift(torch.fft.fftn(maps, dim=dims), dim=dims) * mask
    literal = torch.fft.ifftn(torch.fft.ifftshift(centred, dim=dims), dim=dims).abs()
    literal = literal.mean(dim=2 if spectral == "frame2d" else 1)
    expected = literal.reshape(2, -1) if spectral == "3d" else literal.reshape(2, t * h * w)
    torch.testing.assert_close(spectral_energy(x, grid, spectral=spectral, **knobs), expected, atol=1e-5, rtol=1e-5)
