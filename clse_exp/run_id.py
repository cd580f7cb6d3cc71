"""Content-addressed run folders: the same science config always maps to the same folder.

The hash covers what changes results (model, method, layers, budget, protocol, dataset, seed, eval), not how the
run is executed (batch size, device, launcher, logger), so a rerun or a requeued job with another batch
size resumes in place. `dataset.limit` is left out too: limits take nested subsets, so a larger limit
extends the same run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

HASHED_KEYS = ("model", "prune", "layers", "dataset", "keep", "budget", "schedule", "protocol", "seed", "eval")


def _plain(value: Any) -> Any:
    plain = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    if isinstance(plain, dict) and "loader" in plain:  # the dataset node
        plain.pop("limit", None)
    return plain


def hashed_config(cfg: Any) -> dict:
    """The part of a run config the hash covers, as plain data (what identifies a run folder)."""
    return {key: _plain(cfg[key]) for key in HASHED_KEYS}


def config_hash(*parts: Any) -> str:
    """12 hex digits of the SHA-256 of the parts as canonical JSON."""
    text = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def register_resolver() -> None:
    """`${run_hash:${model},${prune},...}` in hydra.run.dir / hydra.sweep.subdir."""
    if not OmegaConf.has_resolver("run_hash"):
        OmegaConf.register_new_resolver("run_hash", config_hash)
