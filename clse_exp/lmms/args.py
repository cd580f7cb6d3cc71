"""lmms-eval `--model_args` to our run config: every key is an override of conf/config.yaml.

`model=qwen2vl,prune=clse,keep=0.1,schedule=paper,prune.cutoff_ratio=0.2,layers.prune_layers=[1,10,19]`
composes exactly like `python -m clse_exp model=qwen2vl prune=clse ...`. Everything is checked here,
before any weights load, and a bad value is one ConfigError line that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from clse_exp.api import compose_config
from clse_exp.config import group_options, validate_run
from clse_exp.errors import ConfigError

GROUPS = ("model", "prune", "layers")
# Given to lmms-eval itself, which passes them on to the model class.
LMMS_FLAGS = {"batch_size": "--batch_size", "device": "--device"}
# lmms-eval chooses the data (--tasks) and logs the run (--output_path, --wandb_args).
UNUSED = ("dataset", "logger", "eval", "hydra")
_ABSENT = object()


@dataclass(frozen=True)
class Options:
    """The model_args that are not config keys: where per-request statistics go, frames per video file."""

    stats_dir: Path | None = None
    num_frames: int = 8


OPTION_KEYS = ("stats_dir", "num_frames")


def overrides(model_args: dict[str, Any]) -> list[str]:
    """`key=value` strings from lmms-eval's parsed model_args (it has turned numbers and booleans into
    Python values; their str() reads back the same in Hydra's override grammar)."""
    return [f"{key}={value}" for key, value in model_args.items()]


def _check_keys(model_args: dict[str, Any]) -> None:
    for key, value in model_args.items():
        root = key.split(".")[0]
        if key in LMMS_FLAGS:
            raise ConfigError(f"model_arg {key}={value}: give {LMMS_FLAGS[key]} to lmms-eval instead")
        if root in UNUSED:
            raise ConfigError(f"model_arg {key}={value} is not used here: lmms-eval chooses the data (--tasks) "
                              "and logs the run (--output_path, --log_samples, --wandb_args)")
        if key in GROUPS and str(value) not in group_options(key):
            raise ConfigError(f"model_arg {key}={value!r} is not valid; choose one of: {', '.join(group_options(key))}")


def _batch_size(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--batch_size {value!r} is not supported: give an integer (the model batches "
                          "requests itself)") from None


def _options(values: dict[str, Any]) -> Options:
    stats_dir = Path(str(values["stats_dir"])) if values.get("stats_dir") else None
    if stats_dir is not None and stats_dir.exists() and any(stats_dir.iterdir()):
        raise ConfigError(f"model_arg stats_dir={stats_dir} already holds files: give a new folder")
    num_frames = values.get("num_frames", Options.num_frames)
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ConfigError(f"model_arg num_frames={num_frames!r} must be a positive integer")
    return Options(stats_dir, num_frames)


def parse(model_args: dict[str, Any], batch_size: Any = 1, device: str | None = None) -> tuple[DictConfig, Options]:
    """The validated run config and options for these model_args, `--batch_size` and `--device`."""
    options = _options({k: v for k, v in model_args.items() if k in OPTION_KEYS})
    return resolve_config({k: v for k, v in model_args.items() if k not in OPTION_KEYS}, batch_size, device), options


def resolve_config(model_args: dict[str, Any], batch_size: Any = 1, device: str | None = None) -> DictConfig:
    """The validated run config for these config-key model_args; raises ConfigError naming the bad one."""
    _check_keys(model_args)
    base = compose_config([o for o in overrides(model_args) if o.split("=", 1)[0] in GROUPS])
    for key in model_args:
        if key not in GROUPS and OmegaConf.select(base, key, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"model_arg {key!r} is not a config key of model={base.model.name} "
                              f"prune={base.prune.name}; `python -m clse_exp --help` lists the groups and keys")
    extra = [f"batch_size={_batch_size(batch_size)}"] + ([f"device={device}"] if device else [])
    try:
        cfg = compose_config(overrides(model_args) + extra)
    except ConfigCompositionException as err:  # a value of the wrong type, e.g. keep=abc
        raise ConfigError(f"model_args: {str(err).splitlines()[0]}") from err
    validate_run(cfg)  # method knobs, layers and budget for the model's depth included
    return cfg
