"""From a run config (prune, layers, keep, budget, schedule, protocol) to a Pruner, or None for the stock model."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from clse_exp.pruning.engine import Pruner
from clse_exp.pruning.methods import NO_PRUNING, get_method
from clse_exp.pruning.methods.base import ModelFacts


def pruner_from_config(cfg: Any, facts: ModelFacts | None = None) -> Pruner | None:
    """The run's pruner (bound to `facts` when given, so layers and budget are checked now)."""
    prune = OmegaConf.to_container(cfg.prune, resolve=True) if isinstance(cfg.prune, DictConfig) else dict(cfg.prune)
    if prune["name"] == NO_PRUNING:
        return None
    method_cls = get_method(prune["name"])
    method = method_cls(method_cls.Options(**prune))
    layers = cfg.get("layers") or {}
    prune_layers = layers.get("prune_layers")
    pruner = Pruner(method, keep=cfg.keep, budget=cfg.budget, schedule=cfg.schedule, protocol=cfg.protocol,
                    reference_layer=layers.get("reference_layer"),
                    prune_layers=None if prune_layers is None else list(prune_layers), seed=cfg.seed)
    return pruner.bind(facts) if facts is not None else pruner


def build_pruner(cfg: Any, loaded: Any) -> Pruner | None:
    """The run's pruner, bound to a loaded model's family and depth."""
    return pruner_from_config(cfg, loaded.adapter.facts(loaded.model.config))
