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
import torch.nn.functional as F

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
class BatchSelection:
    """A stage's choice for the whole batch, padded to the largest kept count K.

    order [B, K]: positions into each sample's current visual tokens (`ctx.visual_slots` order) in the order the
    kept tokens will sit; row b holds counts[b] real entries, then the filler `width` (the width of
    ctx.visual_slots, past every real position), so the device tells real entries without asking the host.
    counts: kept tokens per sample (host). hidden [B, K, C]: replacement rows or None (the tokens' own states).
    """

    order: torch.Tensor
    counts: list[int]
    width: int
    hidden: torch.Tensor | None = None
    aux_flops: list[int] | None = None

    def row(self, b: int) -> Selection:
        """Sample b's choice as a Selection (its real entries, rows and aux FLOPs)."""
        count = self.counts[b]
        return Selection(self.order[b, :count], None if self.hidden is None else self.hidden[b, :count],
                         0 if self.aux_flops is None else self.aux_flops[b])


def top_k(scores: torch.Tensor, ctx: Any, budgets: list[int | None]) -> BatchSelection:
    """Each sample's `budgets[b]` highest `scores` among its current visual tokens (all of them where None), as
    a set in ascending position order: one top-k and one sort for the batch, nothing read back to the host."""
    counts = [n if k is None else min(k, n) for k, n in zip(budgets, ctx.n_current, strict=True)]
    width = scores.shape[1]
    keep = max(counts, default=0)
    if keep == 0:
        return BatchSelection(scores.new_zeros(len(counts), 0, dtype=torch.long), counts, width)
    valid = ctx.visual_valid
    limit = ctx.keep_counts[:, None]  # [B, 1] on the device: the counts above
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    # a sample that keeps every token ranks them all equal, so the top-k takes each of them
    ranked = torch.where((limit == valid.sum(1, keepdim=True)) & valid, torch.zeros_like(ranked), ranked)
    picks = ranked.topk(keep, dim=1).indices
    picks = torch.where(torch.arange(keep, device=scores.device)[None] < limit, picks, width)
    return BatchSelection(picks.sort(dim=1).values, counts, width)


def pack(selections: list[Selection | None], ctx: Any) -> BatchSelection:
    """Per-sample selections (None: the sample keeps every current visual token) as one BatchSelection."""
    width = ctx.visual_slots.shape[1]
    device = ctx.hidden.device
    orders = [torch.arange(n, device=device) if s is None else s.order.to(device)
              for s, n in zip(selections, ctx.n_current, strict=True)]
    counts = [len(order) for order in orders]
    keep = max(counts, default=0)
    padded = torch.stack([F.pad(order, (0, keep - len(order)), value=width) for order in orders])
    hidden = None
    if any(s is not None and s.hidden is not None for s in selections):
        rows = [s.hidden if s is not None and s.hidden is not None else ctx.hidden_states(b)[order]
                for b, (s, order) in enumerate(zip(selections, orders, strict=True))]
        hidden = torch.stack([F.pad(r.to(ctx.hidden.dtype), (0, 0, 0, keep - len(r))) for r in rows])
    aux = [0 if s is None else s.aux_flops for s in selections]
    return BatchSelection(padded, counts, width, hidden, aux)


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

    def count_departure(self, n_visual: int, keep: float, budget: str, layers: Layers, facts: ModelFacts,
                        counts: list[int | None]) -> str | None:
        """Why the official per-stage `counts` for a sample of `n_visual` tokens do not stand for `keep`
        beyond the rule's own rounding (e.g. a formula that degenerates on this image), or None. The engine
        flags such a sample's record (`budget_unreachable`) and logs the first reason once per run."""
        return None

    def keep_ignored(self, official: bool) -> str | None:
        """Why, under these options, the count this method keeps does not follow `keep` at all (an adaptive
        official rule), or None. Every sample is then flagged and the run logs the reason once."""
        return None

    def run_notice(self, layers: Layers, facts: ModelFacts) -> str | None:
        """A line the run logs once, when it first plans a sample (e.g. official rules carried to another depth),
        or None: a choice the method made for the run that the config alone does not show."""
        return None

    def unread_reference_layer(self) -> str | None:
        """Why no selection reads `layers.reference_layer` under these options, or None when one does; only
        then may a user set it (a knob nothing reads would label a run with a setting it never used)."""
        return f"prune={self.name} reads no reference layer (only CLSE's spectral scores do)"

    def check_inputs(self, videos: bool) -> None:
        """Raise ConfigError for a knob that cannot apply to the dataset's inputs (`videos`: whether it holds
        any video), so the run stops before any weights load."""

    def decode_layer(self) -> int | None:
        """The decoder layer from which each one-token decode step attends to only the prompt keys the method's
        `decode_keep` picks (DyCoke), or None: decode steps run as the stock model's, with no hook."""
        return None

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
    def batch_scores(self, ctx: Any) -> torch.Tensor | None:
        """[B, max n_b] importance of every sample's current visual tokens (`ctx.visual_slots` order; entries past
        a sample's count are ignored), computed for the whole batch at once; None: the method scores per sample."""
        return None

    def scores(self, ctx: Any, b: int) -> torch.Tensor:
        """[n_b] importance of sample b's current visual tokens; higher is kept."""
        scores = self.batch_scores(ctx)
        if scores is None:
            raise NotImplementedError(f"prune={self.name} implements neither scores, batch_scores nor select")
        return scores[b, : ctx.n_current[b]]

    def select(self, ctx: Any, b: int, k: int) -> torch.Tensor | Selection:
        """Positions (into sample b's current visual tokens) of the k tokens to keep, or a Selection. A method
        that selects for the whole batch (its own `select_batch`) answers with row b of it, every other sample
        left uncut (for callers that ask per sample: recorders, tests)."""
        if type(self).select_batch is PruningMethod.select_batch:
            return self.scores(ctx, b).float().topk(k).indices
        budgets = [k if i == b else None for i in range(len(ctx.n_current))]
        keep = ctx.is_visual.sum(1)
        keep[b] = k
        return self.select_batch(dataclasses.replace(ctx, keep_counts=keep), budgets).row(b)

    def select_batch(self, ctx: Any, budgets: list[int | None]) -> BatchSelection:
        """Every sample's choice at once (`budgets[b]`: tokens to keep, None: no cut for sample b). Methods with
        `batch_scores` take one batched top-k; the others are asked sample by sample (`select`)."""
        scores = self.batch_scores(ctx)
        if scores is not None:
            return top_k(scores, ctx, budgets)
        selections: list[Selection | None] = []
        for b, k in enumerate(budgets):
            choice = None if k is None else self.select(ctx, b, k)
            if isinstance(choice, torch.Tensor):  # a set of tokens: they keep their original order
                choice = Selection(choice.sort().values)
            selections.append(choice)
        return pack(selections, ctx)


def fraction_of_depth(fractions: tuple[float, ...], num_layers: int) -> tuple[int, ...]:
    """Stage layers at fractions of the depth (rounded), e.g. (0.25, 0.5, 0.75) of 32 -> (8, 16, 24)."""
    return tuple(sorted({min(num_layers - 1, max(0, round(f * num_layers))) for f in fractions}))
