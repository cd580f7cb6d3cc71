"""Datasets behind one call: `load_samples(dataset_cfg)` -> list of Sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError

__all__ = ["Sample", "LOADERS", "load_samples"]


def _load_synthetic(cfg: Any) -> list[Sample]:
    from clse_exp.data.synthetic import synthetic_dataset

    return synthetic_dataset(
        cfg.size, split=cfg.split, seed=cfg.get("seed", 0), variant=cfg.variant,
        image_size=cfg.image_size, grid=cfg.grid, num_frames=cfg.num_frames,
    )


LOADERS: dict[str, Callable[[Any], list[Sample]]] = {"synthetic": _load_synthetic}


def load_samples(cfg: Any) -> list[Sample]:
    """The samples of `cfg.split`, cut to the first `cfg.limit` when set."""
    if cfg.loader not in LOADERS:
        raise ConfigError(f"dataset.loader={cfg.loader!r} is not valid; choose one of: {', '.join(sorted(LOADERS))}")
    try:
        samples = LOADERS[cfg.loader](cfg)
    except ValueError as err:  # the generators name the bad value; surface it as a config error
        raise ConfigError(str(err)) from err
    return samples if cfg.limit is None else samples[: cfg.limit]
