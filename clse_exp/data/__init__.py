"""Datasets behind one call: `load_samples(dataset_cfg)` -> list of Sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError

__all__ = ["Sample", "LOADERS", "load_samples"]


def _load_synthetic(cfg: Any) -> tuple[list[Sample], list[dict]]:
    from clse_exp.data.synthetic import synthetic_dataset

    size = cfg.size if cfg.limit is None else min(cfg.size, cfg.limit)
    try:
        samples = synthetic_dataset(size, split=cfg.split, seed=cfg.get("seed", 0), variant=cfg.variant,
                                    image_size=cfg.image_size, grid=cfg.grid, num_frames=cfg.num_frames,
                                    qtypes=cfg.get("qtypes"))
    except ValueError as err:  # the generator names the bad value; surface it as a config error
        raise ConfigError(str(err)) from err
    return samples, []


def _load_hf(cfg: Any) -> tuple[list[Sample], list[dict]]:
    from clse_exp.data.hf import load_hf

    return load_hf(cfg)


LOADERS: dict[str, Callable[[Any], tuple[list[Sample], list[dict]]]] = {"synthetic": _load_synthetic, "hf": _load_hf}


def load_samples(cfg: Any) -> tuple[list[Sample], list[dict]]:
    """The samples of `cfg.split` (limited by `cfg.limit`) and the skipped rows ({"id", "reason"})."""
    if cfg.loader not in LOADERS:
        raise ConfigError(f"dataset.loader={cfg.loader!r} is not valid; choose one of: {', '.join(sorted(LOADERS))}")
    return LOADERS[cfg.loader](cfg)
