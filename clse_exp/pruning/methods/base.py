"""What a pruning method is: its typed knobs, its own layers and count rules, and a selection per stage.

A method owns its knowledge (default layers per model family, official per-stage tables and rounding, the
position and KV-cache rules of its official code) and sees tensors only, through a StageContext; hooks,
masks, caches and positions are the engine's business. Everything here is read when the pruner binds to
a model's facts (family and depth, from its config), so a bad knob or an unreachable budget fails before
any weights load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from clse_exp.errors import ConfigError, choose_one

PROTOCOLS = ("official", "uniform")
KV_POLICIES = ("auto", "ragged", "crop")
POSITION_RULES = ("original", "compact")
DECODE_POSITION_RULES = ("original", "cache_length")


@dataclass
class MethodOptions:
    """Knobs every method has; the engine reads these, the method reads its own subclass fields.

    kv_policy: `auto` takes the protocol's rule (official: the method's own code; uniform: ragged).
    shape: relative stage sizes for the budget planner (null: the method's default shape).
    """

    name: str = "none"
    kv_policy: str = "auto"
    shape: list[float] | None = None


@dataclass(frozen=True)
class Layers:
    """Where a method's stages run: before each of `prune_layers`; `reference_layer` is read by CLSE."""

    reference_layer: int
    prune_layers: tuple[int, ...]


@dataclass(frozen=True)
class Rules:
    """How the engine treats the kept tokens (declared by the method per protocol and family).

    prefill: `original` keeps each token's original position; `compact` renumbers the kept tokens
    contiguously after a cut, as feeding fewer tokens would. decode: `original` continues from the unpruned
    prompt length; `cache_length` continues from the number of prompt tokens each layer cached.
    kv_policy: `ragged` (layers before a cut keep every token) or `crop` (cut to the final survivors).
    """

    prefill: str = "original"
    decode: str = "original"
    kv_policy: str = "ragged"

    def __post_init__(self) -> None:
        choose_one("positions", self.prefill, POSITION_RULES)
        choose_one("decode positions", self.decode, DECODE_POSITION_RULES)
        choose_one("kv_policy", self.kv_policy, KV_POLICIES[1:])


@dataclass(frozen=True)
class Selection:
    """A stage's choice for one sample.

    order: positions into the sample's current visual tokens, in the order the kept tokens will sit
    (the engine sorts them into original order unless the rules compact positions).
    hidden: optional [k, C] replacement hidden states for them (methods that merge dropped tokens into kept
    ones); None keeps the tokens' own states.
    aux_flops: matmul FLOPs of work outside the model that the choice took (CDPruner's CLIP text tower), so
    the run reports them; the method's reads of the model's own states are not counted.
    """

    order: torch.Tensor
    hidden: torch.Tensor | None = None
    aux_flops: int = 0


@dataclass(frozen=True)
class ModelFacts:
    """What a method may know about the model it is bound to, read from the model's config (no weights)."""

    family: str
    num_layers: int
    mrope: bool = False  # multimodal rotary positions (Qwen-VL families): position ids are 3-D


class PruningMethod:
    """Subclasses set `name` and an `Options` dataclass (the method's config schema, registered with Hydra
    as prune=<name>), and implement `scores` or `select`; they may override the knowledge hooks below."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    has_official_counts: ClassVar[bool] = False  # official_counts() is implemented (schedule=paper applies)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A method without knobs of its own gets an Options schema whose `name` is its own."""
        super().__init_subclass__(**kwargs)
        if "Options" not in cls.__dict__ and getattr(cls, "name", None):
            cls.Options = dataclasses.make_dataclass(
                f"{cls.__name__}Options", [("name", str, dataclasses.field(default=cls.name))], bases=(MethodOptions,))

    def __init__(self, options: MethodOptions | None = None, **knobs: Any) -> None:
        if options is None:
            known = {f.name for f in dataclasses.fields(self.Options)} - {"name"}
            unknown = sorted(set(knobs) - known)
            if unknown:
                raise ConfigError(f"prune={self.name} has no option {unknown[0]!r}; valid options: "
                                  f"{', '.join(sorted(known))}")
            options = self.Options(name=self.name, **knobs)
        self.options = options
        choose_one("prune.kv_policy", options.kv_policy, KV_POLICIES)
        self.validate()

    # --------------------------------------------------------------------------------- knowledge
    def validate(self) -> None:
        """Raise ConfigError for a bad knob value (names the value and the valid choices)."""

    def default_layers(self, facts: ModelFacts) -> Layers:
        """The method's own stage layers for this model (a method without a rule cuts at the LLM input)."""
        return Layers(0, (0,))

    def default_shape(self, n_stages: int) -> list[float] | None:
        """Relative stage sizes for the budget planner (None: one stage, or halving)."""
        return None

    def official_counts(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> list[int | None] | None:
        """Per-stage counts by the official code's own rule (tables, rounding; None for a stage it skips),
        or None when it has no rule here, so the budget planner's exact counts are used."""
        return None

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        """Raise ConfigError when the official count rule cannot express this budget."""

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        """Positions and KV policy of the official code (uniform: original positions, ragged)."""
        return Rules()

    def capture_layers(self, layers: Layers) -> set[int]:
        """Decoder layers whose INPUT the method reads (default: the one before each cut, for attention)."""
        return {layer - 1 for layer in layers.prune_layers if layer > 0}

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """Image-encoder layers (negative: from the end) whose INPUT the method reads on this model, e.g. to
        recompute the [CLS] attention of the penultimate CLIP layer; captured per image while the encoder runs."""
        return ()

    def prepare_samples(self, samples: list[Any], keep: float, protocol: str, loaded: Any
                        ) -> tuple[list[Any], list[list[tuple[int, int, int]] | None]]:
        """The samples as the method feeds them to the processor (e.g. images downsampled to the budget), and
        per sample the visual grids (T, H, W, as the LLM sees them) of the UNREDUCED sample where the method
        reduced it, else None. A reduced sample is not cut again at the stages; its record counts retention and
        the unpruned costs against the unreduced grids. Default: unchanged."""
        return samples, [None] * len(samples)

    # --------------------------------------------------------------------------------- selection
    def scores(self, ctx: Any, b: int) -> torch.Tensor:
        """[n_b] importance of sample b's current visual tokens; higher is kept."""
        raise NotImplementedError

    def select(self, ctx: Any, b: int, k: int) -> torch.Tensor | Selection:
        """Positions (into sample b's current visual tokens) of the k tokens to keep, or a Selection."""
        return self.scores(ctx, b).float().topk(k).indices


def fraction_of_depth(fractions: tuple[float, ...], num_layers: int) -> tuple[int, ...]:
    """Stage layers at fractions of the depth (rounded), e.g. (0.25, 0.5, 0.75) of 32 -> (8, 16, 24)."""
    return tuple(sorted({min(num_layers - 1, max(0, round(f * num_layers))) for f in fractions}))
