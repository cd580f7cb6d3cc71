"""From a run config to a pruner (or None for the stock model)."""

from __future__ import annotations

from typing import Any

from clse_exp.errors import ConfigError


def build_pruner(cfg: Any, loaded: Any) -> Any:
    """The pruner the config asks for, validated against the loaded model; None means no pruning."""
    name = cfg.prune.name
    if name == "none":
        return None
    raise ConfigError(f"prune={name!r} is not available yet; choose one of: none")
