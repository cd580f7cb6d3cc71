"""Checks that every knob a run sets is read: a setting that nothing reads is refused before weights load,
and an official count rule that cannot stand for `keep` on a sample is flagged in its record and logged.

A run labelled with a setting it never used (a layer list a method ignores, a stage shape an official table
overrides) would look like a different experiment in a sweep while keeping the same tokens. The engine calls
these from `Pruner.__init__`, `Pruner.bind` and the budget plan; the methods say what they read.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import Layers, ModelFacts, PruningMethod

log = logging.getLogger("clse_exp")

PROBE_TOKENS = 576  # an image size at which every official count rule answers (LLaVA-1.5's 24 x 24)


def layer_index(name: str, value: Any) -> int:
    """`value` as a layer index: a Python or numpy integer (not a bool, a float or a string)."""
    if isinstance(value, bool | str | bytes):
        raise ConfigError(f"{name}={value!r} is not a layer index; give an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name}={value!r} is not a layer index; give an integer") from None


def layer_list(name: str, value: Any) -> tuple[int, ...]:
    """`value` as a tuple of layer indices: a list, tuple or 1-D array of integers. A string would be read
    character by character ("12" -> layers 1 and 2) and a bare integer is not a list, so both are refused."""
    if isinstance(value, str | bytes) or (not isinstance(value, Sequence) and not hasattr(value, "__iter__")):
        raise ConfigError(f"{name}={value!r} is not a list of layer indices; give a list such as [2] or [1, 10, 19]")
    if getattr(value, "ndim", 1) != 1:
        raise ConfigError(f"{name}={value!r} is not a list of layer indices; give a 1-D list such as [1, 10, 19]")
    return tuple(layer_index(f"{name} entry", item) for item in value)


def asked_layers(method: PruningMethod, reference_layer: Any, prune_layers: Any
                 ) -> tuple[int | None, tuple[int, ...] | None]:
    """The layers a user asked for, as integers; a reference layer only for a method that reads one."""
    if reference_layer is not None:
        reference_layer = layer_index("layers.reference_layer", reference_layer)
        unread = method.unread_reference_layer()
        if unread is not None:
            raise ConfigError(f"layers.reference_layer={reference_layer} has no effect: {unread}; leave it null")
    return reference_layer, None if prune_layers is None else layer_list("layers.prune_layers", prune_layers)


def check_bound(method: PruningMethod, layers: Layers, facts: ModelFacts, shape: Sequence[float] | None,
                kv_policy: str, keep: float, budget: str, protocol: str, schedule: str, official: bool,
                keep_ignored: str | None) -> None:
    """Refuse, once layers and counts are resolved for a model, the engine knobs nothing would read:
    `prune.shape` where the counts do not come from the planner or there is one stage, and
    `prune.kv_policy=crop` where no layer runs before a cut."""
    name = f"prune={method.name}"
    if shape is not None:
        asked = f"prune.shape={[float(v) for v in shape]}"
        if len(layers.prune_layers) == 1:
            raise ConfigError(f"{asked} has no effect: {name} cuts once (layers.prune_layers="
                              f"{list(layers.prune_layers)}), and shape sets the relative sizes of several stages; "
                              "leave it null")
        if keep_ignored is not None:
            raise ConfigError(f"{asked} has no effect: {keep_ignored}; leave it null")
        if official and _official_rule_applies(method, keep, budget, layers, facts):
            setting = f"protocol={protocol}" + (" schedule=paper" if schedule == "paper" else "")
            raise ConfigError(f"{asked} has no effect: under {setting} {name} takes its per-stage counts from its "
                              "official rule; shape applies only under protocol=uniform with schedule=auto")
    if kv_policy == "crop" and layers.prune_layers[-1] == 0:  # `ragged` is what happens there: accepted
        raise ConfigError(f"prune.kv_policy=crop has no effect: {name} cuts only at the LLM input "
                          f"(layers.prune_layers={list(layers.prune_layers)}), so no layer caches a token a cut "
                          "removes; leave prune.kv_policy=auto (or ragged)")


def _official_rule_applies(method: PruningMethod, keep: float, budget: str, layers: Layers, facts: ModelFacts) -> bool:
    """Whether the method's official count rule (not the planner) sets the counts for these layers and model.
    Every rule here decides that from the layers, the model and the options, not from the image size, so one
    probe answers for every sample."""
    try:
        return method.official_counts(PROBE_TOKENS, keep, budget, layers, facts) is not None
    except ConfigError:  # the rule exists but cannot count this probe: it still overrides the planner
        return True


def count_departure(method: PruningMethod, n_visual: int, keep: float, budget: str, layers: Layers,
                    facts: ModelFacts, counts: Sequence[int | None], exact: dict[int, int] | None) -> str | None:
    """Why a sample's official `counts` do not stand for `keep`: the method's own reason, or a cut the rule
    cancels (it keeps every visual token where the planner's exact count would cut)."""
    reason = method.count_departure(n_visual, keep, budget, layers, facts, list(counts))
    if reason is not None:
        return reason
    kept = min([c for c in counts if c is not None], default=n_visual)
    asked = min(exact.values()) if exact else 1
    if kept >= n_visual > asked:
        return (f"its official count rule keeps all {n_visual} visual tokens of an image where keep asks for "
                f"{asked} (the cut is cancelled)")
    return None


class DepartureNotice:
    """Logs the first count departure of a run, one line, so a run whose records are flagged says why; and the
    method's own note about the run, once. Logged when the run first plans a sample, so a pruner built only to
    check a config says nothing."""

    def __init__(self, method: str, keep: float, budget: str, protocol: str) -> None:
        self.setting = f"prune={method} keep={keep} budget={budget} protocol={protocol}"
        self.logged: set[str] = set()

    def __call__(self, reason: str) -> None:
        if "departure" not in self.logged:
            self.logged.add("departure")
            log.warning("%s: %s; such samples are flagged budget_unreachable in their records (retention gives "
                        "what each kept)", self.setting, reason)

    def note(self, message: str) -> None:
        if message not in self.logged:
            self.logged.add(message)
            log.warning(message)
