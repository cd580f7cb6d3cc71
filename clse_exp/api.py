"""The Python API: the same config groups as the CLI, composed with Hydra's compose API."""

from __future__ import annotations

import json
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from clse_exp import models
from clse_exp.config import CONF_DIR, ModelConfig, group_options, register_schemas
from clse_exp.errors import ConfigError
from clse_exp.pruning.build import pruner_from_config
from clse_exp.pruning.engine import Pruner
from clse_exp.run_id import register_resolver

LAYER_KEYS = ("reference_layer", "prune_layers")


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides, as `python -m clse_exp` would."""
    register_schemas()
    register_resolver()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except MissingConfigException as err:
        raise ConfigError(str(err).splitlines()[0]) from err


def load_model(name_or_cfg: str | dict | DictConfig, device: str = "auto") -> models.LoadedModel:
    """Load a model by conf/model name (e.g. "tiny_qwen2vl", "qwen2vl") or from a model config."""
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in group_options("model"):
            raise ConfigError(f"model={name_or_cfg!r} is not valid; choose one of: {', '.join(group_options('model'))}")
        path = CONF_DIR / "model" / f"{name_or_cfg}.yaml"
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    else:
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), name_or_cfg)
    return models.load(cfg, device)


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def make_pruner(method: str, keep: float = 0.25, layers: str | None = None, schedule: str = "auto",
                budget: str = "average", model: str | None = None, **overrides: Any) -> Pruner | None:
    """A pruner from conf/prune/METHOD.yaml plus keyword overrides; attach it with `pruner.attach(model)`.

    `reference_layer` / `prune_layers` override the layers group; any other keyword overrides a method
    knob (e.g. score_type="clse", cutoff_ratio=0.2) or an engine knob (kv_policy, shape). `model` picks
    the conf/model entry whose paper layers the `paper` layer group reads (default: the config's).
    Returns None for method "none".
    """
    args = [f"prune={method}", f"keep={keep}", f"schedule={schedule}", f"budget={budget}"]
    if layers is not None:
        args.append(f"layers={layers}")
    if model is not None:
        args.append(f"model={model}")
    for key, value in overrides.items():
        args.append(_override(f"layers.{key}" if key in LAYER_KEYS else f"prune.{key}", value))
    try:
        cfg = compose_config(args)
    except ConfigCompositionException as err:  # e.g. an override naming a key the method does not have
        raise ConfigError(str(err).splitlines()[0]) from err
    return pruner_from_config(cfg.prune, cfg.layers, cfg.keep, cfg.budget, cfg.schedule, cfg.seed)
