"""The one exception type a user should ever see from a bad config: a single line, no traceback."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message names the value and the valid choices."""


def choose_one(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError naming `name=value` and the valid choices unless `value` is one of them."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
