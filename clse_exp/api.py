"""The Python API: the same config groups as the CLI, composed with Hydra's compose API."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from clse_exp import models
from clse_exp.config import CONF_DIR, ModelConfig, group_options, register_schemas
from clse_exp.errors import ConfigError, choose_one
from clse_exp.pruning.build import pruner_from_config
from clse_exp.pruning.engine import Pruner
from clse_exp.run_id import register_resolver

DEFAULT_LAYERS = (None, "auto", "default", "paper")  # `layers=` values that mean "the method's own"


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides, as `python -m clse_exp` would."""
    register_schemas()
    register_resolver()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (MissingConfigException, ConfigCompositionException) as err:
        raise ConfigError(" ".join(str(err).split())) from err


def load_model(name_or_cfg: str | dict | DictConfig, device: str = "auto") -> models.LoadedModel:
    """Load a model by conf/model name (e.g. "tiny_qwen2vl", "qwen2vl") or from a model config."""
    if isinstance(name_or_cfg, str):
        choose_one("model", name_or_cfg, group_options("model"))
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" /
                                                                                 f"{name_or_cfg}.yaml"))
    else:
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), name_or_cfg)
    return models.load(cfg, device)


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def make_pruner(method: str, keep: float = 0.25, budget: str = "average", schedule: str = "auto",
                reference_layer: int | None = None, prune_layers: Sequence[int] | None = None,
                shape: Sequence[float] | None = None, protocol: str = "official", layers: str | None = None,
                model: str | None = None, seed: int = 0, **knobs: Any) -> Pruner | None:
    """A pruner for `method` with its typed knobs (e.g. score_type="clse", cutoff_ratio=0.2, kv_policy="crop");
    attach it with `pruner.attach(model)`. Layers left as None are the method's own for the model the
    pruner binds to (at attach, or now when `model` names a conf/model entry, so a bad budget or layer
    fails here). `layers` is accepted for older code: None/"auto"/"paper" mean the method's own.
    Returns None for method "none".
    """
    if layers not in DEFAULT_LAYERS and layers != "single":
        raise ConfigError(f"layers={layers!r} is not valid; give prune_layers=[...] (and reference_layer=...) "
                          "or leave layers unset for the method's own")
    if layers == "single" and prune_layers is None:
        raise ConfigError("layers='single' needs prune_layers=[...]")
    args = [f"prune={method}", _override("keep", keep), f"schedule={schedule}", f"budget={budget}",
            f"protocol={protocol}", f"seed={seed}"]
    if model is not None:
        args.append(f"model={model}")
    if reference_layer is not None:
        args.append(_override("layers.reference_layer", reference_layer))
    if prune_layers is not None:
        args.append(_override("layers.prune_layers", list(prune_layers)))
    if shape is not None:
        knobs["shape"] = list(shape)
    args += [_override(f"prune.{key}", value) for key, value in knobs.items()]
    cfg = compose_config(args)
    pruner = pruner_from_config(cfg)
    if pruner is not None and model is not None:
        pruner.bind(models.describe(cfg.model))
    return pruner
