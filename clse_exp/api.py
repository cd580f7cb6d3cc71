"""The Python API: the same config groups as the CLI, composed with Hydra's compose API."""

from __future__ import annotations

import json
import numbers
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
from clse_exp.pruning.knobs import layer_index, layer_list
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


def _plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python numbers and lists (what a config holds)."""
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _override(key: str, value: Any) -> str:
    """A command-line override; every value is JSON, so a string stays one string (quoted), whatever it holds."""
    return f"{key}={json.dumps(_plain(value), ensure_ascii=False)}"


def _number(name: str, value: Any) -> float:
    """A real number (Python or numpy, not a bool or a string)."""
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} is not a number; give a float, e.g. {name}=0.25")
    return float(value)


def make_pruner(method: str, keep: float = 0.25, budget: str = "average", schedule: str = "auto",
                reference_layer: int | None = None, prune_layers: Sequence[int] | None = None,
                shape: Sequence[float] | None = None, protocol: str = "official", layers: str | None = None,
                model: str | None = None, seed: int = 0, **knobs: Any) -> Pruner | None:
    """A pruner for `method` with its typed knobs (e.g. score_type="clse", cutoff_ratio=0.2, kv_policy="crop");
    attach it with `pruner.attach(model)`. Layers left as None are the method's own for the model the
    pruner binds to (at attach, or now when `model` names a conf/model entry, so a bad budget or layer
    fails here). `layers` is accepted for older code: None/"auto"/"paper" mean the method's own.
    Layers are integers and `prune_layers` a list of them (numpy integers and arrays too); a string or a bare
    integer is refused, as it would otherwise be read digit by digit. Numbers may be numpy scalars.
    Returns None for method "none".
    """
    if layers not in DEFAULT_LAYERS and layers != "single":
        raise ConfigError(f"layers={layers!r} is not valid; give prune_layers=[...] (and reference_layer=...) "
                          "or leave layers unset for the method's own")
    if layers == "single" and prune_layers is None:
        raise ConfigError("layers='single' needs prune_layers=[...]")
    args = [f"prune={method}", _override("keep", _number("keep", keep)), f"schedule={schedule}", f"budget={budget}",
            f"protocol={protocol}", _override("seed", layer_index("seed", seed))]
    if model is not None:
        args.append(f"model={model}")
    if reference_layer is not None:
        args.append(_override("layers.reference_layer", layer_index("reference_layer", reference_layer)))
    if prune_layers is not None:  # a string or a bare int would otherwise be read digit by digit or fail later
        args.append(_override("layers.prune_layers", list(layer_list("prune_layers", prune_layers))))
    if shape is not None:
        if isinstance(shape, str | bytes) or not hasattr(shape, "__iter__"):
            raise ConfigError(f"shape={shape!r} is not a list of stage sizes; give a list such as [1.0, 0.5, 0.25]")
        knobs["shape"] = [_number("shape entry", value) for value in shape]
    args += [_override(f"prune.{key}", value) for key, value in knobs.items()]
    cfg = compose_config(args)
    pruner = pruner_from_config(cfg)
    if pruner is not None and model is not None:
        pruner.bind(models.describe(cfg.model))
    return pruner
