"""clse-exp: config-driven experiments for training-free visual-token pruning (CLSE and baselines)."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "make_pruner"]


def _install_cli_errors() -> None:
    """Our Hydra entry points report a config they cannot compose in one line (see clse_exp.cli_errors)."""
    from clse_exp.cli_errors import install

    install()


_install_cli_errors()


def load_model(name_or_cfg: Any, device: str = "auto") -> Any:
    """Load a model by conf/model name or config; see clse_exp.api.load_model. A config key that does not exist
    or a value of the wrong type is one ConfigError line listing a model config's keys."""
    import dataclasses

    from omegaconf.errors import OmegaConfBaseException

    from clse_exp.api import load_model as _load_model
    from clse_exp.config import ModelConfig
    from clse_exp.errors import ConfigError

    try:
        return _load_model(name_or_cfg, device)
    except OmegaConfBaseException as err:
        keys = ", ".join(f.name for f in dataclasses.fields(ModelConfig))
        message = (str(getattr(err, "msg", None) or err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model config: {message}; a model config's keys: {keys}") from err


def make_pruner(method: str, **kwargs: Any) -> Any:
    """A pruner for a method with its knobs (layers resolve when it binds to a model); see clse_exp.api.make_pruner."""
    from clse_exp.api import make_pruner as _make_pruner

    return _make_pruner(method, **kwargs)
