"""Pruning methods by name: one module each, registered here (the engine never branches on a name).

Each method's `Options` dataclass is its config schema: registered with Hydra as `prune=<name>`, so its
knobs are typed keys (`prune.cutoff_ratio=0.2`) and an unknown key or a wrong type fails at composition.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import MethodOptions, PruningMethod
from clse_exp.pruning.methods.cdpruner import CDPruner
from clse_exp.pruning.methods.clse import CLSE
from clse_exp.pruning.methods.dart import DART
from clse_exp.pruning.methods.divprune import DivPrune
from clse_exp.pruning.methods.downsample import Downsample
from clse_exp.pruning.methods.dycoke import DyCoke
from clse_exp.pruning.methods.fastv import FastV
from clse_exp.pruning.methods.fastvid import FastVID
from clse_exp.pruning.methods.holitom import HoliTom
from clse_exp.pruning.methods.pdrop import PDrop
from clse_exp.pruning.methods.prumerge_plus import PruMergePlus
from clse_exp.pruning.methods.random import RandomPrune
from clse_exp.pruning.methods.sparsevlm import SparseVLM
from clse_exp.pruning.methods.vidcom2 import VidCom2
from clse_exp.pruning.methods.visionzip import VisionZip
from clse_exp.pruning.methods.vispruner import VisPruner

METHODS: dict[str, type[PruningMethod]] = {
    m.name: m for m in (CLSE, FastV, PDrop, DART, DivPrune, RandomPrune, SparseVLM, VisionZip, PruMergePlus,
                        Downsample, CDPruner, VisPruner, FastVID, DyCoke, HoliTom, VidCom2)
}
NO_PRUNING = "none"


def method_names() -> list[str]:
    """Every value `prune=` accepts, `none` (the stock model) first."""
    return [NO_PRUNING, *sorted(METHODS)]


def get_method(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise ConfigError(f"prune={name!r} is not a method; choose one of: {', '.join(method_names())}")
    return METHODS[name]


def register_method_schemas() -> None:
    """prune=<name> for every method (and `none`) in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(group="prune", name=NO_PRUNING, node=MethodOptions)
    for name, method in METHODS.items():
        store.store(group="prune", name=name, node=method.Options)
