"""From config groups (prune, layers, keep, budget, schedule) to a Pruner, or None for the stock model."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from clse_exp.pruning.engine import Pruner
from clse_exp.pruning.methods import get_method

ENGINE_KEYS = ("name", "shape", "kv_policy")


def pruner_from_config(prune: Any, layers: Any, keep: float, budget: str = "average", schedule: str = "auto",
                       seed: int = 0) -> Pruner | None:
    prune = OmegaConf.to_container(prune, resolve=True) if isinstance(prune, DictConfig) else dict(prune)
    if prune["name"] == "none":
        return None
    method = get_method(prune["name"])(**{k: v for k, v in prune.items() if k not in ENGINE_KEYS})
    return Pruner(method, list(layers["prune_layers"]), reference_layer=layers["reference_layer"], keep=keep,
                  budget=budget, schedule=schedule, shape=prune.get("shape"),
                  kv_policy=prune.get("kv_policy", "ragged"), seed=seed)


def build_pruner(cfg: Any, loaded: Any) -> Pruner | None:
    """The run's pruner, already checked against the loaded model's depth."""
    pruner = pruner_from_config(cfg.prune, cfg.layers, cfg.keep, cfg.budget, cfg.schedule, cfg.seed)
    if pruner is not None:
        pruner.bind(loaded.num_layers, loaded.model.config.model_type)
    return pruner
