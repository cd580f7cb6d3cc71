"""Pruning methods by name: one module each, registered here (the engine never branches on a name)."""

from __future__ import annotations

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import PruningMethod
from clse_exp.pruning.methods.clse import CLSE
from clse_exp.pruning.methods.dart import DART
from clse_exp.pruning.methods.divprune import DivPrune
from clse_exp.pruning.methods.fastv import FastV
from clse_exp.pruning.methods.pdrop import PDrop
from clse_exp.pruning.methods.random import RandomPrune

METHODS: dict[str, type[PruningMethod]] = {m.name: m for m in (CLSE, FastV, PDrop, DART, DivPrune, RandomPrune)}


def get_method(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise ConfigError(f"prune={name!r} is not a method; choose one of: none, {', '.join(sorted(METHODS))}")
    return METHODS[name]
