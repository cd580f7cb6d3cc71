"""What a pruning method is: named knobs, and a choice of k visual tokens per sample at a stage."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.signals import StageContext


class PruningMethod:
    """Subclasses set `name`, an `Options` dataclass of knobs, and implement `scores` or `select`.

    Methods see tensors and budgets only (a StageContext); hooks, masks, caches and positions are the
    engine's business.
    """

    name: ClassVar[str]

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, **options: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"prune={self.name} has no option {unknown[0]!r}; valid options: {', '.join(sorted(known)) or 'none'}"
            )
        self.options = self.Options(**options)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for a bad knob value (names the value and the valid choices)."""

    def scores(self, ctx: StageContext, b: int) -> torch.Tensor:
        """[n_b] importance of sample b's current visual tokens; higher is kept."""
        raise NotImplementedError

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        """Positions (into sample b's current visual tokens) of the k tokens to keep."""
        return self.scores(ctx, b).float().topk(k).indices


def choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
