"""CLSE scoring as pure functions: spectral energy of visual tokens, its evolution across layers, top-k.

Reads like the method (shared/docs/clse-method.md): lay the tokens of each image out on their grid,
FFT, shift the zero frequency to the centre, mask, shift back, inverse FFT, magnitude, mean over channels.
The evolution factor compares that energy between a reference layer L and the pruning layer K.
No hooks and no models here: tensors in, tensors out.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import torch

from clse_exp.errors import ConfigError

FILTERS = ("gaussian_highpass", "ideal_highpass", "butterworth_highpass", "gaussian_lowpass", "bandpass")
SPECTRA = ("frame2d", "3d")
SCORE_TYPES = ("clse", "clse_attn", "attn")
EPS = 1e-6

Grid = tuple[int, int, int]


def frequency_mask(
    shape: tuple[int, ...],
    filter: str = "gaussian_highpass",
    cutoff_ratio: float = 0.1,
    band: tuple[float, float] | None = None,
    order: int = 2,
    device: torch.device | str | None = None,
    gaussian_eps: float = 0.0,
) -> torch.Tensor:
    """Float32 mask of `shape` ((H, W) or (T, H, W)) over an fftshift-ed spectrum; 1 keeps a frequency.

    Distances d are measured from the centre index (T//2, H//2, W//2) and scaled by the radius
    min(shape) // 2: the cutoff is `radius * cutoff_ratio`, a band is (low, high) fractions of the radius.
    A high-pass filter with `cutoff_ratio == 0` is all-pass (a zero cutoff removes nothing).
    `gaussian_eps` is added to the Gaussian's 2 sigma^2 (the official Video-LLaVA code adds 1e-6).
    """
    shape = tuple(int(size) for size in shape)
    band = None if band is None else tuple(float(edge) for edge in band)
    # copy=True so a caller that edits its mask in place cannot corrupt the cached one.
    return _cached_mask(shape, filter, float(cutoff_ratio), band, int(order), float(gaussian_eps)).to(
        device=device, copy=True)


@functools.lru_cache(maxsize=64)
def _cached_mask(
    shape: tuple[int, ...], filter: str, cutoff_ratio: float, band: tuple[float, ...] | None, order: int,
    gaussian_eps: float,
) -> torch.Tensor:
    _check_filter_knobs(shape, filter, cutoff_ratio, band, order)
    if filter.endswith("highpass") and cutoff_ratio == 0:
        return torch.ones(shape)
    radius = min(shape) // 2
    if radius == 0:
        raise ConfigError(
            f"grid {shape} has spectral radius min{shape} // 2 = 0, so a {filter} mask "
            f"(cutoff_ratio={cutoff_ratio}) is undefined; use spectral=frame2d for inputs with a single or "
            "few frames, or cutoff_ratio=0 for an all-pass mask"
        )
    d = _distance_from_centre(shape)
    cutoff = radius * cutoff_ratio
    if filter == "gaussian_highpass":
        mask = 1 - torch.exp(-(d**2) / (2 * cutoff**2 + gaussian_eps))
    elif filter == "gaussian_lowpass":
        mask = torch.exp(-(d**2) / (2 * cutoff**2 + gaussian_eps))
    elif filter == "ideal_highpass":
        mask = (d > cutoff).double()
    elif filter == "butterworth_highpass":
        # the DC term has d = 0, where cutoff / d is infinite and the gain is exactly 0
        gain = 1 / (1 + (cutoff / d.clamp_min(1e-12)) ** (2 * order))
        mask = torch.where(d > 0, gain, torch.zeros_like(d))
    else:
        low, high = band
        mask = ((d >= low * radius) & (d <= high * radius)).double()
    return mask.float()


def _check_filter_knobs(
    shape: tuple[int, ...], filter: str, cutoff_ratio: float, band: tuple[float, ...] | None, order: int
) -> None:
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"mask shape {shape} must be (H, W) or (T, H, W) with positive sizes")
    if filter not in FILTERS:
        raise ConfigError(f"filter={filter!r} is not valid; choose one of: {', '.join(FILTERS)}")
    if cutoff_ratio < 0:
        raise ConfigError(f"cutoff_ratio={cutoff_ratio} must be >= 0 (a fraction of the spectral radius)")
    if filter == "gaussian_lowpass" and cutoff_ratio == 0:
        raise ConfigError(
            "filter=gaussian_lowpass needs cutoff_ratio > 0 (its width is radius * cutoff_ratio)"
        )
    if filter == "butterworth_highpass" and order < 1:
        raise ConfigError(f"order={order} must be >= 1 for filter=butterworth_highpass")
    if filter == "bandpass" and (band is None or len(band) != 2 or not 0 <= band[0] < band[1]):
        raise ConfigError(
            f"filter=bandpass needs band=[low, high] with 0 <= low < high (fractions of the radius), "
            f"got band={band}"
        )


def _distance_from_centre(shape: tuple[int, ...]) -> torch.Tensor:
    """Euclidean distance (float64) of every index from the centre index (size // 2 along each axis)."""
    axes = [torch.arange(size, dtype=torch.float64) - size // 2 for size in shape]
    squared = sum(axis**2 for axis in torch.meshgrid(*axes, indexing="ij"))
    return squared.sqrt()


def spectral_energy(
    x: torch.Tensor, grid: Sequence[int], spectral: str = "frame2d", **filter_kwargs
) -> torch.Tensor:
    """Per-token filtered spectral magnitude [B, N] of visual tokens `x` [B, N, C] on one grid (T, H, W).

    Tokens are laid out row-major (frame, row, column), N = T*H*W. `frame2d` takes the 2-D spectrum of
    each frame, `3d` the joint spectrum over (T, H, W). Computed in float32 whatever the input dtype.
    `filter_kwargs` go to `frequency_mask` (filter, cutoff_ratio, band, order).
    """
    t, h, w = _as_grid(grid)
    batch, n, channels = x.shape
    if n != t * h * w:
        raise ValueError(f"x has {n} tokens but grid (T, H, W) = {(t, h, w)} holds T*H*W = {t * h * w}")
    maps = x.float().reshape(batch, t, h, w, channels)
    if spectral == "frame2d":
        maps = maps.permute(0, 1, 4, 2, 3).reshape(batch * t, channels, h, w)  # [B*T, C, H, W]
        dims, mask_shape = (-2, -1), (h, w)
    elif spectral == "3d":
        maps = maps.permute(0, 4, 1, 2, 3)  # [B, C, T, H, W]
        dims, mask_shape = (-3, -2, -1), (t, h, w)
    else:
        raise ConfigError(f"spectral={spectral!r} is not valid; choose one of: {', '.join(SPECTRA)}")
    mask = frequency_mask(mask_shape, device=x.device, **filter_kwargs)
    filtered = _filter_spectrum(maps, mask, dims)
    return filtered.abs().mean(dim=1).reshape(batch, n)


def _filter_spectrum(maps: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Filter `maps` over `dims` with the centred `mask`: the same numbers as fftshift, mask, ifftshift and
    the inverse complex FFT, at about half the cost.

    Every mask here is a function of the distance from the centre index, so it is even (also at the Nyquist
    index, which is its own mirror); a real input then stays real after filtering and the real FFT pair
    gives the result exactly, with the mask moved to the unshifted half-spectrum layout.
    """
    sizes = [maps.shape[d] for d in dims]
    unshifted = torch.fft.ifftshift(mask, dim=tuple(range(mask.dim())))[..., : sizes[-1] // 2 + 1]
    return torch.fft.irfftn(torch.fft.rfftn(maps, dim=dims) * unshifted, s=sizes, dim=dims)


def evolution_factor(s_ref: torch.Tensor, s_cur: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """How strongly each token's spectral energy changed from layer L (`s_ref`) to K (`s_cur`), in (0, 1).

    Inputs and output are [B, N]. The relative change is clamped to 1, standardised over the tokens of
    each sample (unbiased std) and squashed by a sigmoid with `temperature`.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    s_ref, s_cur = s_ref.float(), s_cur.float()
    intensity = (s_cur - s_ref).abs() / (s_ref.mean(dim=1, keepdim=True) + s_ref + EPS)
    intensity = intensity.clamp(max=1.0)
    mean = intensity.mean(dim=1, keepdim=True)
    # one token has no spread (unbiased std would be NaN): it standardises to 0, i.e. evolution 0.5
    std = intensity.std(dim=1, keepdim=True) if intensity.shape[1] > 1 else torch.zeros_like(mean)
    return torch.sigmoid((intensity - mean) / (std + EPS) / temperature)


def clse_scores(
    z_ref: torch.Tensor | None,
    z_cur: torch.Tensor | None,
    grid_thw: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    attn: torch.Tensor | None = None,
    score_type: str = "clse_attn",
    cutoff_ratio: float = 0.1,
    temperature: float = 0.1,
    spectral: str = "frame2d",
    filter: str = "gaussian_highpass",
    band: tuple[float, float] | None = None,
    order: int = 2,
    gaussian_eps: float = 0.0,
) -> torch.Tensor:
    """CLSE importance of each visual token, float32 [B, N]; higher means keep.

    `z_ref`, `z_cur` [B, N, C]: visual hidden states at the reference layer L and the pruning layer K.
    `grid_thw`: one (T, H, W) for the whole span, or one per image laid out consecutively along N
    (tuples, lists or a LongTensor [n_images, 3]); each image's spectrum uses its own grid, and the
    evolution is standardised over all N tokens of the sample. `attn` [B, N]: last-query attention.
    score_type: `clse` = evolution, `clse_attn` = evolution * attn, `attn` = attn (z_* may be None).
    """
    if score_type not in SCORE_TYPES:
        raise ConfigError(f"score_type={score_type!r} is not valid; choose one of: {', '.join(SCORE_TYPES)}")
    if score_type != "clse" and attn is None:
        raise ValueError(
            f"score_type={score_type!r} needs attn [B, N] (last-query attention over visual tokens)"
        )
    if score_type == "attn":
        return attn.float()
    if z_ref is None or z_cur is None or z_ref.shape != z_cur.shape:
        raise ValueError("z_ref and z_cur must both be given with the same shape [B, N, C]")
    grids = _as_grids(grid_thw, n_tokens=z_ref.shape[1])
    knobs = dict(spectral=spectral, filter=filter, cutoff_ratio=cutoff_ratio, band=band, order=order,
                 gaussian_eps=gaussian_eps)
    s_ref = _energy_per_image(z_ref, grids, **knobs)
    s_cur = _energy_per_image(z_cur, grids, **knobs)
    evolution = evolution_factor(s_ref, s_cur, temperature)
    if score_type == "clse":
        return evolution
    if attn.shape != evolution.shape:
        raise ValueError(f"attn has shape {tuple(attn.shape)}; expected [B, N] = {tuple(evolution.shape)}")
    return evolution * attn.float()


def _energy_per_image(x: torch.Tensor, grids: list[Grid], **knobs) -> torch.Tensor:
    """Spectral energy [B, N] of consecutive images, each on its own grid."""
    sizes = [t * h * w for t, h, w in grids]
    parts = torch.split(x, sizes, dim=1)
    return torch.cat(
        [spectral_energy(part, grid, **knobs) for part, grid in zip(parts, grids, strict=True)], dim=1
    )


def _as_grids(grid_thw: Sequence | torch.Tensor, n_tokens: int) -> list[Grid]:
    """One grid or a list of grids, checked to cover exactly `n_tokens` tokens."""
    if isinstance(grid_thw, torch.Tensor):
        grid_thw = grid_thw.tolist()
    grid_thw = list(grid_thw)
    single = len(grid_thw) == 3 and all(isinstance(v, numbers.Integral) for v in grid_thw)
    grids = [_as_grid(grid_thw)] if single else [_as_grid(grid) for grid in grid_thw]
    total = sum(t * h * w for t, h, w in grids)
    if total != n_tokens:
        raise ValueError(
            f"grid_thw {grids} holds {total} tokens (sum of T*H*W) but the inputs have N = {n_tokens}"
        )
    return grids


def _as_grid(grid: Sequence[int] | torch.Tensor) -> Grid:
    values = grid.tolist() if isinstance(grid, torch.Tensor) else list(grid)
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in values):
        raise ValueError(f"a grid must be (T, H, W) of positive integers, got {grid}")
    return int(values[0]), int(values[1]), int(values[2])


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] (long) of the k highest scores per sample, in original (ascending) token order."""
    n = scores.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in [0, N={n}]")
    return torch.topk(scores, k, dim=1).indices.sort(dim=1).values
