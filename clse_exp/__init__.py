"""clse-exp: config-driven experiments for training-free visual-token pruning (CLSE and baselines)."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "make_pruner"]


def load_model(name_or_cfg: Any, device: str = "auto") -> Any:
    """Load a model by conf/model name or config; see clse_exp.api.load_model."""
    from clse_exp.api import load_model as _load_model

    return _load_model(name_or_cfg, device)


def make_pruner(method: str, **kwargs: Any) -> Any:
    """A pruner for a method with its knobs (layers resolve when it binds to a model); see clse_exp.api.make_pruner."""
    from clse_exp.api import make_pruner as _make_pruner

    return _make_pruner(method, **kwargs)
