"""The pruning engine: forward pre-hooks on a stock transformers VLM, attached for a call, removed after.

A method is a list of stages; a stage runs before decoder layer K and keeps, per sample, a budget of
visual tokens (optionally merging dropped ones into kept ones). The engine, never the method, keeps every
later layer and every decode step consistent: hidden states, rotary (cos, sin) at the positions the
method's rules ask for (original, or renumbered after each cut), position ids, attention masks it builds
itself from the slots each layer holds, and the KV cache (`ragged` or `crop`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from clse_exp.compat import cache_in, cache_of
from clse_exp.data.sample import Sample
from clse_exp.efficiency.counts import host_side, upload
from clse_exp.errors import ConfigError, choose_one
from clse_exp.models import ADAPTERS, LoadedModel, ModelAdapter, VisualSegment
from clse_exp.pruning.masks import backend_mask, decode_pairs, prefill_pairs
from clse_exp.pruning.methods.base import (
    KV_POLICIES,
    PROTOCOLS,
    Layers,
    ModelFacts,
    PruningMethod,
    Rules,
)
from clse_exp.pruning.record import SampleRecord, StageRecord
from clse_exp.pruning.schedule import BUDGETS, SCHEDULES, UnreachableBudget, check_budget, plan_stages
from clse_exp.pruning.signals import Capture, StageContext
from clse_exp.pruning.slots import Slots, gather_rows, shrink


@dataclass
class _Prefill:
    """Everything the engine learns in one prefill call and needs at every later layer and decode step."""

    layout: list[list[VisualSegment]]
    plans: list[tuple[dict[int, int], bool]] = field(default_factory=list)  # per sample: layer -> count
    n_prompt: list[int] = field(default_factory=list)  # per sample: real prompt tokens (read once, on the host)
    first_real: list[int] = field(default_factory=list)  # per sample: sequence index of its first real token
    mask2d: torch.Tensor | None = None
    length: int = 0
    visual_rank: torch.Tensor | None = None  # [B, S] rank among the sample's visual tokens, -1 for text
    keep_counts: torch.Tensor | None = None  # [B, stages] visual tokens each sample keeps at each stage
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    start: torch.Tensor | None = None  # [B] position of each sample's first real token
    slots: Slots | None = None
    n_current: list[int] = field(default_factory=list)  # per sample: visual tokens the current slots hold
    compacted: bool = False  # positions were renumbered by a cut (rules.prefill == "compact")
    layer_slots: dict[int, Slots] = field(default_factory=dict)
    processed: dict[int, list[int]] = field(default_factory=dict)  # layer -> per sample tokens it ran on
    captures: dict[int, Capture] = field(default_factory=dict)
    layer_kwargs: tuple[Slots, dict] | None = None
    cuts: list[_Cut] = field(default_factory=list)
    cached: bool = False
    crop: bool = False  # every layer's cache was cut to the final survivors
    planned: list[list[int]] = field(default_factory=list)  # per stage: per sample kept if every stage keeps plan
    deepstack: tuple[list[torch.Tensor], torch.Tensor] | None = None  # features per layer, [B, S] row or -1
    vision: dict[int, list[list[Any]]] | None = None  # encoder layer -> per sample, per encoded segment input
    generated: int = 0
    step_length: int = 0
    decoding: bool = False
    decode_plans: dict[int, _DecodeSlots] = field(default_factory=dict)  # id(layer slots) -> its decode plan
    decode_work: dict = field(default_factory=dict)  # opt-in decode-step pruning's state (see _decode_prune)
    reduced: list[list[tuple[int, int, int]] | None] | None = None  # per sample: unreduced grids (prepare_samples)
    _read: tuple[list[StageRecord], list[SampleRecord]] | None = None

    @property
    def n_visual(self) -> list[int]:
        return [sum(seg.length for seg in segments) for segments in self.layout]

    @property
    def n_text(self) -> list[int]:
        return [prompt - visual for prompt, visual in zip(self.n_prompt, self.n_visual, strict=True)]

    def padded(self, slots: Slots) -> bool:
        """Whether `slots` hold a padding slot (known on the host from the counts)."""
        return any(self.processed_now(b) != slots.idx.shape[1] for b in range(len(self.n_prompt)))

    def processed_now(self, b: int) -> int:
        return self.n_prompt[b] - self.n_visual[b] + self.n_current[b]


@dataclass
class _Cut:
    """One stage of a prefill, still on the device: read back (one transfer for all stages) only when the
    trace or the records are asked for."""

    layer: int
    budget: list[int]
    counts: list[int]
    kept: torch.Tensor  # [B, K] ORIGINAL visual indices, row b valid up to counts[b]
    merged: torch.Tensor | None  # [B] kept tokens whose states a merge replaced
    aux_flops: list[int]
    seconds: float = 0.0


DECODE_CAPACITY = 64  # decode steps whose masks and rotary the prefill prepares (doubled when outgrown)


class _DecodeSlots:
    """One layer group's decode inputs (the layers whose prompt slots are the same): the mask and, under
    `cache_length` positions, rotary, as views of buffers filled once for many steps, so a decode step
    launches nothing the stock model does not."""

    def __init__(self, slots: Slots, padded: bool, offset: torch.Tensor | None) -> None:
        self.slots, self.padded, self.offset = slots, padded, offset
        self.capacity = 0
        self.keys: torch.Tensor | None = None  # [B, prompt + capacity] key validity as the backend wants it
        self.rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # cos, sin, positions

    def fill(self, capacity: int, implementation: str, rotary: nn.Module | None, hidden: torch.Tensor) -> None:
        """Buffers for `capacity` one-token steps: the keys' validity (padding only) and the rotary of the
        positions that continue from this group's cached length (`cache_length` only)."""
        self.capacity = capacity
        if self.padded:
            self.keys = _key_buffer(self.slots.valid, capacity, implementation, hidden.dtype)
        if self.offset is not None:
            positions = self.offset[:, None] + torch.arange(capacity, device=self.offset.device)[None]
            self.rotary = (*rotary(hidden, positions), positions)


class Pruner:
    """Applies `method` at its stage layers while attached to a model; see `attach`.

    The budget (`keep`, `budget`, `schedule`, `shape`; see clse_exp.pruning.schedule) is planned per sample
    from its own visual-token count, so samples with different image sizes in one batch each get their
    own counts. `protocol="official"` follows the method's official code (counts and their rounding,
    positions, KV policy); `"uniform"` keeps original positions, exact counts and one KV policy for every
    method. Layers left as None are the method's own for the model it binds to.
    """

    def __init__(self, method: PruningMethod, keep: float = 1.0, budget: str = "average", schedule: str = "auto",
                 protocol: str = "official", reference_layer: int | None = None,
                 prune_layers: Sequence[int] | None = None, shape: Sequence[float] | None = None,
                 kv_policy: str | None = None, seed: int = 0, time_stages: bool = False) -> None:
        choose_one("protocol", protocol, PROTOCOLS)
        kv_policy = kv_policy or method.options.kv_policy
        choose_one("prune.kv_policy", kv_policy, KV_POLICIES)
        shape = shape if shape is not None else method.options.shape
        check_budget(keep, budget, schedule, shape)
        self._asked_shape = shape
        self.method, self.keep, self.budget, self.schedule, self.protocol = method, keep, budget, schedule, protocol
        self.kv_policy, self.seed, self.time_stages = kv_policy, seed, time_stages
        from clse_exp.pruning import knobs  # imported here: this module's header belongs to the engine rewrite

        reference_layer, prune_layers = knobs.asked_layers(method, reference_layer, prune_layers)
        self._asked_layers = (reference_layer, prune_layers)
        self._notice = knobs.DepartureNotice(method.name, keep, budget, protocol)
        self._hooked: Any = None  # weakref to the text model this pruner's hooks were last put on
        self.facts: ModelFacts | None = None
        self._vision_pending: dict[int, list[Any]] = {}
        self._vision_modules: tuple[nn.ModuleList | None, nn.Module | None] = (None, None)
        self._encoder_kinds: tuple[str, ...] = ("image",)
        self._encodes_frames = False
        self._encoder_queries_keys = None
        self._state: _Prefill | None = None
        self._reduced: list[list[tuple[int, int, int]] | None] | None = None  # see prepare_samples
        self._last: _Prefill | None = None
        self._layer_handles: list = []
        self._layer_hook_specs: list = []

    # ---------------------------------------------------------------------------------- binding
    def bind(self, facts: ModelFacts) -> Pruner:
        """Resolve layers, rules and the budget plan for a model (family and depth only: no weights needed).

        Raises ConfigError for layers outside the model, or a budget no image size can reach here.
        """
        if self.facts == facts:
            return self
        default = self.method.default_layers(facts)
        reference, prune_layers = self._asked_layers
        self.layers = Layers(default.reference_layer if reference is None else reference,
                             default.prune_layers if prune_layers is None else prune_layers)
        _validate_layers(self.layers, facts.num_layers)
        rules = self.method.rules(self.protocol, facts)
        if self.kv_policy != "auto":
            rules = Rules(rules.prefill, rules.decode, self.kv_policy)
        self.rules = rules
        self.official_counts = self.schedule == "paper" or self.protocol == "official"
        if self.schedule == "paper" and not self.method.has_official_counts:
            raise ConfigError(f"schedule=paper: prune={self.method.name} has no official count rule of its own; "
                              "use schedule=auto")
        shape = self._asked_shape if self._asked_shape is not None else self.method.default_shape(
            len(self.layers.prune_layers))
        self.shape = None if shape is None else [float(value) for value in shape]
        if self.shape is not None and len(self.shape) != len(self.layers.prune_layers):
            raise ConfigError(f"prune.shape={self.shape} has {len(self.shape)} entries but there are "
                              f"{len(self.layers.prune_layers)} prune layers {list(self.layers.prune_layers)}")
        self.method.check_budget(self.keep, self.budget, self.layers, facts, self.official_counts)
        from clse_exp.pruning import knobs

        self._keep_ignored = self.method.keep_ignored(self.official_counts)
        self._run_notice = self.method.run_notice(self.layers, facts)
        knobs.check_bound(self.method, self.layers, facts, self._asked_shape, self.kv_policy, self.keep, self.budget,
                          self.protocol, self.schedule, self.official_counts, self._keep_ignored)
        floor = self.layers.prune_layers[0] / facts.num_layers
        if self.budget == "average" and self.keep <= floor:
            raise ConfigError(
                f"keep={self.keep} is not above {floor:.6f}, the smallest average retention that "
                f"prune_layers={list(self.layers.prune_layers)} allow in {facts.num_layers} layers (layers before "
                f"{self.layers.prune_layers[0]} see every visual token); lower the first prune layer or use "
                "budget=final")
        self.facts = facts
        self._plan = lru_cache(maxsize=512)(self._plan_uncached)
        return self

    def _plan_uncached(self, n_visual: int) -> tuple[dict[int, int], bool]:
        """Per-stage counts for one sample: {layer: count} and whether the budget was unreachable."""
        layers = self.layers.prune_layers
        if self.keep >= 1.0:  # keep everything, whatever a method's official rule would make of a ratio of 1
            return {}, False
        if self._run_notice is not None:
            self._notice.note(self._run_notice)
        # The planner's exact counts are what `keep` asks. Only the one-token-per-stage floor can stand in the
        # way (an image smaller than the budget can express): the fewest possible are kept, and the sample's
        # record says so. The floor is the same under both budgets, so the flag does not depend on `budget`.
        try:
            stages = plan_stages(n_visual, self.facts.num_layers, layers, self.keep, self.budget, self.shape)
            exact = {stage.layer: stage.count for stage in stages}
            unreachable = self.budget == "final" and self.keep * n_visual < 1 - 1e-9
        except UnreachableBudget:
            exact, unreachable = None, True
        from clse_exp.pruning import knobs

        plan, reason = exact, self._keep_ignored
        if self.official_counts:
            try:
                counts = self.method.official_counts(n_visual, self.keep, self.budget, self.layers, self.facts)
            except UnreachableBudget:
                counts, plan, unreachable = None, None, True
            if counts is not None:
                plan = {layer: c for layer, c in zip(layers, counts, strict=True) if c is not None}
                reason = reason or knobs.count_departure(self.method, n_visual, self.keep, self.budget, self.layers,
                                                         self.facts, counts, exact)
        if reason is not None:
            self._notice(reason)
        return (plan if plan is not None else {layer: 1 for layer in layers}), unreachable or reason is not None

    def plan(self, n_visual: int) -> dict[int, int]:
        """{stage layer: visual tokens kept} for a sample with `n_visual` visual tokens (bound pruners only)."""
        return dict(self._plan(n_visual)[0])

    # ----------------------------------------------------------------------------------- public
    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[Pruner]:
        """Hook `model` (a stock *ForConditionalGeneration) for the duration of the block. One pruner holds one
        prefill's state, so it refuses a second attach while its hooks are on a model (they are removed on exit)."""
        import weakref

        adapter = adapter_for(model)
        text_model = adapter.text_model(model)
        hooked = [module for module in (self._hooked() if self._hooked else None, text_model) if module is not None]
        if any(getattr(hook, "__self__", None) is self for module in hooked for hook in
               module._forward_pre_hooks.values()):
            raise RuntimeError(f"this prune={self.method.name} pruner is already attached (a nested or concurrent "
                               "pruner.attach would run every stage twice); leave the first attach block first")
        if any(isinstance(getattr(hook, "__self__", None), Pruner) for hook in text_model._forward_pre_hooks.values()):
            raise RuntimeError("this model already has another pruner attached; attach one pruner at a time")
        self._hooked = weakref.ref(text_model)
        self.bind(adapter.facts(model.config))
        layers = adapter.decoder_layers(model)
        implementation = text_model.config._attn_implementation
        rotary = getattr(text_model, "rotary_emb", None)
        self._implementation, self._rotary = implementation, rotary
        self._vision_pending: dict[int, list[Any]] = {}
        self._vision_modules = (None, None)
        handles = self._vision_hooks(adapter, model)
        handles += [
            adapter.multimodal_model(model).register_forward_pre_hook(
                lambda _m, args, kwargs: self._on_multimodal(adapter, model, args, kwargs), with_kwargs=True),
            text_model.register_forward_pre_hook(self._on_text_model, with_kwargs=True),
            text_model.register_forward_hook(self._after_text_model, with_kwargs=True),
        ]
        hooks = [self._layer_hook(index, layers, text_model.norm, rotary, implementation)
                 for index in range(len(layers))]
        self._layer_hook_specs = list(zip(layers, hooks, strict=True))
        self._install_layer_hooks()
        try:
            yield self
        finally:
            for handle in handles + self._layer_handles:
                handle.remove()
            self._layer_handles, self._layer_hook_specs = [], []
            self._state = None

    @property
    def _layer_hooks_on(self) -> bool:
        return bool(self._layer_handles)

    def _install_layer_hooks(self) -> None:
        self._layer_handles = [layer.register_forward_pre_hook(hook, with_kwargs=True)
                               for layer, hook in self._layer_hook_specs]

    def _remove_layer_hooks(self) -> None:
        """Decode steps that need nothing per layer run the stock layers with no hook at all."""
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles = []

    def _vision_hooks(self, adapter: ModelAdapter, model: nn.Module) -> list:
        """Capture the inputs of the image-encoder layers the method reads. generate() runs the encoder
        before the forward call, so captures wait in `_vision_pending` until the next prefill takes them."""
        wanted = self.method.vision_layers(self.facts)
        if not wanted:
            return []
        layers = adapter.vision_encoder_layers(model)
        self._vision_modules = (layers, adapter.vision_projector(model))
        self._encoder_queries_keys = adapter.vision_queries_keys
        self._encoder_kinds = adapter.encoder_kinds
        self._encodes_frames = adapter.encodes_frames
        tower_call: dict = {}

        def on_tower(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            tower_call.clear()
            tower_call.update(kwargs)
            if len(args) > 1:  # Qwen-VL towers take (pixels, grid_thw)
                tower_call.setdefault("grid_thw", args[1])

        towers = adapter.vision_towers(model)
        handles = [tower.register_forward_pre_hook(on_tower, with_kwargs=True) for tower in towers]
        for layer in wanted:
            index = layer % len(layers)

            def capture(_module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                items = adapter.vision_layer_inputs(model, hidden, kwargs, tower_call)
                self._vision_pending.setdefault(layer, []).extend(items)

            handles.append(layers[index].register_forward_pre_hook(capture, with_kwargs=True))
        return handles

    def _take_vision(self, state: _Prefill) -> dict[int, list[list[Any]]] | None:
        """This prefill's captured encoder inputs, per sample in prompt order. The encoder ran kind by kind
        (the family's `encoder_kinds`), each kind over the batch in sample and prompt order."""
        if not self._vision_pending:
            return None
        others = sorted({seg.kind for segments in state.layout for seg in segments} - set(self._encoder_kinds))
        if others:  # the tower also encoded inputs that no captured row can be matched to
            raise ConfigError(f"prune={self.method.name} reads the vision encoder, which on this family it can read "
                              f"for {'/'.join(self._encoder_kinds)} inputs only; this batch also holds "
                              f"{'/'.join(others)} inputs (use a dataset without them)")
        encoded = [[seg for seg in segments if seg.kind in self._encoder_kinds] for segments in state.layout]
        call_order = [(kind, b, seg.start, seg.t) for kind in self._encoder_kinds for b, segments in enumerate(encoded)
                      for seg in segments if seg.kind == kind]
        out = {}
        for layer, items in self._vision_pending.items():
            if self._encodes_frames and len(items) == sum(t for *_, t in call_order):
                items = _per_segment(items, [t for *_, t in call_order])
            if len(items) != len(call_order):
                raise RuntimeError(f"captured {len(items)} encoder inputs for {len(call_order)} "
                                   f"{'/'.join(self._encoder_kinds)} segments")
            per_sample: list[list[tuple[int, Any]]] = [[] for _ in encoded]
            for (_, b, start, _), item in zip(call_order, items, strict=True):
                per_sample[b].append((start, item))
            out[layer] = [[item for _, item in sorted(found, key=lambda pair: pair[0])] for found in per_sample]
        self._vision_pending = {}
        return out

    @property
    def trace(self) -> list[dict]:
        """Per stage of the last prefill: layer, per-sample budget, per-sample kept ORIGINAL visual indices."""
        if self._last is None:
            return []
        return [{"layer": s.layer, "budget": s.budget, "kept": s.kept, "merged": s.merged, "seconds": s.seconds}
                for s in self._read_records()[0]]

    @property
    def records(self) -> list[SampleRecord]:
        """Per sample of the last prefill: tokens each layer processed and cached, kept tokens per stage."""
        return list(self._read_records()[1]) if self._last is not None else []

    def _read_records(self) -> tuple[list[StageRecord], list[SampleRecord]]:
        """The last prefill's records; the first read also flags (and logs once) every sample whose achieved
        retention departs from `keep` beyond whole-token rounding, whatever rule set its counts."""
        first = self._last._read is None
        stages, records = _read_back(self._last, self.facts.num_layers)
        for record in records if first else []:
            achieved = record.departure(self.keep, self.budget)
            if achieved is not None:
                self._notice(f"a sample kept {achieved:.3f} of its {record.n_visual} visual tokens ({self.budget} "
                             f"retention, stages keep {record.kept_per_stage}) where keep={self.keep}: the counts "
                             f"{'its official rule' if self.official_counts else 'it'} sets for this input depart "
                             "from keep beyond whole-token rounding")
                record.budget_unreachable = True
        return stages, records

    @property
    def stage_seconds(self) -> float:
        """Wall time spent scoring and cutting in the last prefill."""
        return sum(cut.seconds for cut in self._last.cuts) if self._last is not None else 0.0

    def prepare_samples(self, loaded: LoadedModel, samples: list[Sample]) -> list[Sample]:
        """`samples` as the method feeds them to the processor (e.g. downsampled images; the same list for
        methods that cut inside the LLM). The prefills that follow, until the next call, are taken to be of
        these samples: a sample the method reduced is not cut again, and its record counts against the
        unreduced input."""
        self.bind(loaded.adapter.facts(loaded.model.config))
        if self.keep >= 1.0:
            self._reduced = None
            return samples
        fed, unreduced = self.method.prepare_samples(samples, self.keep, self.protocol, loaded)
        self._reduced = unreduced if any(grids is not None for grids in unreduced) else None
        return fed

    def trace_records(self) -> list[dict]:
        """`records` as JSON-ready dicts (what the runner writes per sample)."""
        return [record.as_dict() for record in self.records]

    # ------------------------------------------------------------------------------------ hooks
    def _on_multimodal(self, adapter: ModelAdapter, model: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_in(kwargs)
        _refuse_unsupported_cache(cache)
        if cache is not None and cache.get_seq_length() > 0:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("pruning needs input_ids (the visual token spans are read from them)")
        # every kwarg (families read their layout from different ones: grids, image sizes, encoder outputs); the
        # prompt, its mask and the family's layout keys are read to the host in one transfer, and the layout is
        # worked out there
        layout_kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        keys = [k for k in adapter.layout_keys if isinstance(kwargs.get(k), torch.Tensor)]
        mask = kwargs.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ids, mask_host, *read = _read_to_host([input_ids, mask2d, *(kwargs[k] for k in keys)])
        layout_kwargs.update(zip(keys, read, strict=True))
        n_prompt, first_real = _prompt_extent(ids, mask_host)
        with host_side():
            layout = adapter.visual_layout(model, ids, **layout_kwargs)
        plans = [self._plan(sum(seg.length for seg in segments)) if segments else ({}, False) for segments in layout]
        reduced = self._reduced
        if reduced is not None:
            if len(reduced) != len(layout) or any(grids is not None and len(grids) != len(segments)
                                                  for grids, segments in zip(reduced, layout, strict=True)):
                raise RuntimeError(f"these inputs are not the samples prune={self.method.name} last prepared: build "
                                   "every batch with pruner.prepare_samples (clse_exp.generation.prepare)")
            plans = [({}, False) if grids is not None else plan for grids, plan in zip(reduced, plans, strict=True)]
        self._state = _Prefill(layout=layout, plans=plans, reduced=reduced, n_prompt=n_prompt, first_real=first_real)
        if not self._layer_hooks_on:
            self._install_layer_hooks()
        return None

    def _on_text_model(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state
        if state is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if state.slots is None and not state.decoding:  # prefill
            state.length = embeds.shape[1]
            state.mask2d = mask2d
            state.visual_rank, state.keep_counts = _upload_plan(state, self.layers.prune_layers, embeds.device)
            state.vision = self._take_vision(state)
            deepstack, where = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
            if deepstack is not None and where is not None:  # Qwen3-VL: the engine adds them to the kept tokens
                rows = (where.flatten().long().cumsum(0) - 1).view(where.shape).masked_fill(~where.bool(), -1)
                state.deepstack = (list(deepstack), rows.to(embeds.device))
                kwargs["deepstack_visual_embeds"] = kwargs["visual_pos_masks"] = None
        else:
            state.decoding = True
            state.generated += embeds.shape[1]
            state.step_length = embeds.shape[1]
        kwargs["attention_mask"] = None  # every layer gets the engine's own mask (see _layer_hook)
        return args, kwargs

    def _after_text_model(self, _module: nn.Module, _args: tuple, kwargs: dict, output: Any) -> None:
        state = self._state
        if state is None or state.decoding:
            return None
        cache = cache_of(output) or cache_in(kwargs)
        if self.rules.kv_policy == "crop" and cache is not None:
            _crop_cache(cache, state)
        state.cached = cache is not None
        state.crop = self.rules.kv_policy == "crop" and state.cached
        state.captures.clear()
        state.decoding = True
        self._last = state
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self._plan_decode(state, hidden)
        return None

    def _layer_hook(self, index: int, layers: nn.ModuleList, norm: nn.Module, rotary: nn.Module | None,
                    implementation: str):
        capture_layers = self.method.capture_layers(self.layers)
        prune_layers = set(self.layers.prune_layers)

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if state is None:
                return None
            if state.decoding:
                update = self._decode_kwargs(state, index, rotary, implementation, args[0])
                if self._decode_layer is not None and index >= self._decode_layer - 1:
                    self._decode_prune(state, index, layers, implementation, args[0], kwargs, update)
                kwargs.update(update)
                return args, kwargs
            hidden = args[0]
            if index == 0:
                self._start_prefill(state, hidden, kwargs)
            elif state.deepstack is not None and index - 1 < len(state.deepstack[0]):
                hidden = _add_deepstack(hidden, state.slots, *state.deepstack, index - 1)
            if index in prune_layers:
                hidden = self._run_stage(state, index, self.layers.prune_layers.index(index), hidden, layers, norm,
                                         rotary)
            state.layer_slots[index] = state.slots
            state.processed[index] = [state.processed_now(b) for b in range(len(state.n_prompt))]
            kwargs.update(self._prefill_kwargs(state, rotary, implementation, hidden))
            if index in capture_layers:
                cos, sin = kwargs["position_embeddings"]
                state.captures[index] = Capture(hidden, state.slots, cos, sin)
            return (hidden, *args[1:]), kwargs

        return hook

    # ---------------------------------------------------------------------------------- prefill
    def _start_prefill(self, state: _Prefill, hidden: torch.Tensor, kwargs: dict) -> None:
        batch = hidden.shape[0]
        state.slots = Slots.initial(batch, state.length, state.mask2d, hidden.device)
        state.n_current = list(state.n_visual)
        cos, sin = kwargs["position_embeddings"]
        state.cos, state.sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == state.length:
            state.position_ids = position_ids
        if state.position_ids is not None and state.position_ids.dim() == 2:
            first_real = state.slots.valid.float().argmax(1)
            state.start = state.position_ids.expand(batch, -1).gather(1, first_real[:, None])[:, 0]
        else:
            state.start = torch.zeros(batch, dtype=torch.long, device=hidden.device)

    def _run_stage(self, state: _Prefill, layer: int, stage_index: int, hidden: torch.Tensor,
                   layers: nn.ModuleList, norm: nn.Module, rotary: nn.Module | None) -> torch.Tensor:
        """Select, shrink the slots, gather (and merge) hidden states; the stage's wall time goes into the
        trace (synchronized on CUDA when `time_stages`, so the benchmark's overhead numbers are real)."""
        if self.time_stages and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        started = time.perf_counter()
        hidden = self._select_and_shrink(state, layer, stage_index, hidden, layers, norm, rotary)
        if self.time_stages and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        state.cuts[-1].seconds = time.perf_counter() - started
        return hidden

    def _select_and_shrink(self, state: _Prefill, layer: int, stage_index: int, hidden: torch.Tensor,
                           layers: nn.ModuleList, norm: nn.Module, rotary: nn.Module | None) -> torch.Tensor:
        """One batched cut: the method's choice for every sample, then the new slots, the gather and the merged
        rows, with nothing read back to the host (every count is known there already)."""
        slots, batch = state.slots, hidden.shape[0]
        visual_rank = slots.gather(state.visual_rank)
        is_visual = (visual_rank >= 0) & slots.valid
        n_current = list(state.n_current)
        planned = [state.plans[b][0].get(layer) for b in range(batch)]
        asked = [n if k is None else min(k, n) for k, n in zip(planned, n_current, strict=True)]
        budgets = [k if k is not None and k < n else None for k, n in zip(planned, n_current, strict=True)]
        cos, sin = self._prefill_rotary(state, rotary, hidden)
        ctx = StageContext(
            layer=layer, stage_index=stage_index, hidden=hidden, slots=slots, cos=cos, sin=sin,
            is_visual=is_visual, visual_rank=visual_rank,
            grids_per_sample=[[seg.grid for seg in segments] for segments in state.layout],
            n_visual=state.n_visual, layers=layers, final_norm=norm, captures=state.captures,
            reference_layer=self.layers.reference_layer, seed=self.seed,
            attention_dtype=hidden.dtype if self.protocol == "official" else None, protocol=self.protocol,
            family=self.facts.family, vision=state.vision,
            vision_layers=self._vision_modules[0], projector=self._vision_modules[1],
            encoder_queries_keys=self._encoder_queries_keys,
            segment_spans=[[(seg.start, seg.positions[-1]) for seg in segments] for segments in state.layout],
            n_current=n_current, n_text=state.n_text, first_slot=state.first_real,
            keep_counts=_stage_counts(state, stage_index, asked, hidden.device),
        )
        if all(k is None for k in budgets):  # nothing to cut here: every sample keeps its tokens
            kept = visual_rank.gather(1, ctx.visual_slots)
            state.cuts.append(_Cut(layer, asked, n_current, kept, None, [0] * batch))
            return hidden
        selection = self.method.select_batch(ctx, budgets)
        counts, width = selection.counts, selection.width
        order, rows = selection.order.to(hidden.device), selection.hidden
        if self.rules.prefill == "original":  # positions follow original order, so the sequence must too
            order, permutation = order.sort(dim=1)  # the filler (width) stays last
            rows = None if rows is None else gather_rows(rows, permutation)
        real = order < width
        kept_slots = ctx.visual_slots.gather(1, order.clamp(max=max(width - 1, 0)))  # [B, K], method order
        width_now = slots.idx.shape[1]
        keep = torch.cat([slots.valid & ~is_visual, is_visual.new_zeros(batch, 1)], dim=1)
        keep.scatter_(1, torch.where(real, kept_slots, width_now), True)
        length = max(text + count for text, count in zip(state.n_text, counts, strict=True))
        new_slots, rel = shrink(slots, keep[:, :width_now], length)
        new_visual = is_visual.gather(1, rel) & new_slots.valid
        rank = (new_visual.long().cumsum(1) - 1).clamp(min=0, max=max(order.shape[1] - 1, 0))
        if self.rules.prefill != "original":  # the kept tokens take the kept visual places in the method's order
            rel = torch.where(new_visual, kept_slots.gather(1, rank), rel)
            new_slots = Slots(slots.idx.gather(1, rel), new_slots.valid, slots.length)
        hidden = gather_rows(hidden, rel)
        merged = None
        if rows is not None:
            hidden, merged = _write_rows(hidden, rows, real, new_visual, rank)
        state.cuts.append(_Cut(layer, asked, counts, visual_rank.gather(1, kept_slots), merged,
                               selection.aux_flops or [0] * batch))
        state.slots, state.n_current = new_slots, list(counts)
        if self.rules.prefill == "compact":
            state.compacted = True
        state.layer_kwargs = None
        return hidden

    def _prefill_rotary(self, state: _Prefill, rotary: nn.Module | None, hidden: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        if not state.compacted:
            return state.slots.gather(state.cos), state.slots.gather(state.sin)
        positions = _compact_positions(state.slots, state.start)
        return rotary(hidden, positions)

    def _prefill_kwargs(self, state: _Prefill, rotary: nn.Module | None, implementation: str,
                        hidden: torch.Tensor) -> dict:
        """Rotary, positions and mask for the current slots; rebuilt only when the slots change."""
        if state.layer_kwargs is None or state.layer_kwargs[0] is not state.slots:
            slots = state.slots
            update = {"position_embeddings": self._prefill_rotary(state, rotary, hidden)}
            if state.compacted:
                update["position_ids"] = _compact_positions(slots, state.start)
            elif state.position_ids is not None:
                update["position_ids"] = _gather_last(state.position_ids, slots.idx)
            update["attention_mask"] = backend_mask(prefill_pairs(slots.valid), slots.valid, implementation,
                                                    hidden.dtype, padded=state.padded(slots))
            state.layer_kwargs = (slots, update)
        return state.layer_kwargs[1]

    # ----------------------------------------------------------------------------------- decode
    def _plan_decode(self, state: _Prefill, hidden: torch.Tensor) -> None:
        """Once per prefill: each layer group's decode inputs (their buffers filled now, for the first
        DECODE_CAPACITY steps), and whether decode steps need the layer hooks at all: not when no layer's cache
        holds padding and positions continue as the stock model's do."""
        plans: dict[int, _DecodeSlots] = {}
        by_slots: dict[int, _DecodeSlots] = {}
        cached = _cached_counts(state, self.facts.num_layers)
        for layer, slots in state.layer_slots.items():
            if id(slots) not in by_slots:
                padded = any(count != slots.idx.shape[1] for count in cached[layer])
                offset = state.start + slots.valid.sum(1) if self.rules.decode == "cache_length" else None
                plan = _DecodeSlots(slots, padded, offset)
                plan.fill(DECODE_CAPACITY, self._implementation, self._rotary, hidden)
                by_slots[id(slots)] = plan
            plans[layer] = by_slots[id(slots)]
        state.decode_plans = plans
        # sdpa and flash need no mask for one unpadded query; eager adds the stock model's mask, which is sized
        # by the first layer's cache, to every layer's scores, so its layers keep their hook (and get None)
        if self._implementation != "eager" and self._decode_layer is None and not any(
                plan.padded or plan.offset is not None for plan in plans.values()):
            self._remove_layer_hooks()

    @cached_property
    def _decode_layer(self) -> int | None:
        """Opt-in decode-step pruning (DyCoke): the layer l from which a method masks prompt keys per step (none
        at keep=1, which keeps every visual token)."""
        return self.method.decode_layer() if self.keep < 1.0 else None

    def _decode_prune(self, state: _Prefill, index: int, layers: nn.ModuleList, implementation: str,
                      hidden: torch.Tensor, kwargs: dict, update: dict) -> None:
        """One-token steps only: keep layer l - 1's input; at layer l ask the method (`decode_keep`) which keys
        layers >= l attend to this step, from layer l - 1's cache; put that mask in their kwargs."""
        work, layer = state.decode_work, self._decode_layer
        if state.step_length != 1:
            work.pop("mask", None)
            return
        if index == layer - 1:
            work["input"] = (hidden, update.get("position_embeddings", kwargs.get("position_embeddings")))
            return
        if index == layer:
            plan = state.decode_plans[layer - 1]
            if any(state.decode_plans[i].slots is not plan.slots for i in range(layer - 1, len(layers))):
                raise RuntimeError(f"prune={self.method.name}: decode pruning needs the same cached prompt in "
                                   f"layers {layer - 1}.. (cut only before layer {layer - 1})")
            prompt = plan.slots
            batch = prompt.idx.shape[0]
            valid = torch.cat([prompt.valid, prompt.valid.new_ones(batch, state.generated)], dim=1)
            if "visual" not in work:
                work["visual"] = (prompt.gather(state.visual_rank) >= 0) & prompt.valid
            visual = work["visual"]
            layer_input, rotary = work.pop("input")
            keys = cache_in(kwargs).layers[layer - 1].keys
            attend = self.method.decode_keep(layers[layer - 1], layer_input, rotary, keys, valid, visual,
                                             list(state.n_current), work.setdefault("method", {}),
                                             self.protocol == "official")
            mask = _key_buffer(attend, 0, implementation, hidden.dtype)
            work["mask"] = mask if implementation.startswith("flash") else mask[:, None, None, :]
        update["attention_mask"] = work["mask"]

    def _decode_kwargs(self, state: _Prefill, layer: int, rotary: nn.Module | None, implementation: str,
                       hidden: torch.Tensor) -> dict:
        """Mask (and, under `cache_length` positions, rotary) for this step's tokens at `layer`: keys are the
        prompt slots this layer cached, then every generated token. One-token steps take views of the buffers
        the prefill filled (refilled, twice as long, when an answer outgrows them)."""
        plan = state.decode_plans[layer]
        if state.step_length != 1:
            return _multi_token_kwargs(state, plan, rotary, implementation, hidden)
        generated = state.generated
        if generated > plan.capacity:
            plan.fill(2 * generated, implementation, rotary, hidden)
        update: dict[str, Any] = {"attention_mask": None}
        if plan.keys is not None:
            keys = plan.keys[:, : plan.slots.idx.shape[1] + generated]
            update["attention_mask"] = keys if implementation.startswith("flash") else keys[:, None, None, :]
        if plan.rotary is not None:
            cos, sin, positions = (part[:, generated - 1 : generated] for part in plan.rotary)
            update["position_embeddings"] = (cos, sin)
            update["position_ids"] = positions
        return update


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The model family's adapter, from the model's config."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"no adapter for model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]()


def _validate_layers(layers: Layers, num_layers: int) -> None:
    """Stage layers must exist in the model, increase strictly, and come after the reference layer."""
    valid = f"valid layers are 0..{num_layers - 1}"
    prune = list(layers.prune_layers)
    if not prune:
        raise ConfigError("layers.prune_layers=[] prunes nothing: give at least one layer, or use prune=none")
    for layer in prune:
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layers.prune_layers contains {layer}: the model has {num_layers} layers ({valid})")
    if prune != sorted(set(prune)):
        raise ConfigError(f"layers.prune_layers={prune} must be strictly increasing")
    if not 0 <= layers.reference_layer < num_layers:
        raise ConfigError(f"layers.reference_layer={layers.reference_layer} is outside the model ({valid})")
    if layers.reference_layer > prune[0]:
        raise ConfigError(
            f"layers.reference_layer={layers.reference_layer} comes after the first prune layer {prune[0]}: "
            "the reference must be at or before it"
        )


def _refuse_unsupported_cache(cache: Any) -> None:
    if cache is None:
        return
    if not isinstance(cache, DynamicCache) or getattr(cache, "is_compileable", False):
        raise ValueError(
            f"pruning needs a DynamicCache (layers hold different token counts); got {type(cache).__name__}. "
            "Use the default cache (do not pass cache_implementation='static')."
        )


def _read_to_host(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The given device tensors (integer-valued: ids, masks, grids, sizes) on the host, in ONE transfer."""
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.reshape(-1).to(torch.long) for t in present]).cpu().numpy()
    out, at = [], 0
    with host_side():
        for tensor in tensors:
            if tensor is None:
                out.append(None)
                continue
            out.append(torch.from_numpy(flat[at : at + tensor.numel()]).view(tensor.shape).to(tensor.dtype))
            at += tensor.numel()
    return out


def _prompt_extent(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[int], list[int]]:
    """Per sample (host copies): real prompt tokens and the sequence index of the first one."""
    batch, length = ids.shape
    if mask is None:
        return [length] * batch, [0] * batch
    with host_side():
        real = mask.bool()
        return real.sum(1).tolist(), real.to(torch.int8).argmax(1).tolist()


def _upload_plan(state: _Prefill, stage_layers: Sequence[int], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the device needs of the host's plan, in ONE upload per prefill: the visual rank of every token
    ([B, S], -1 for text) and the tokens each sample keeps at each stage if every stage keeps its plan
    ([B, stages])."""
    batch, length = len(state.layout), state.length
    table = numpy.full((batch, length + len(stage_layers)), -1, dtype=numpy.int64)
    for b, segments in enumerate(state.layout):
        offset = 0
        for seg in segments:
            table[b, list(seg.positions)] = numpy.arange(offset, offset + seg.length)
            offset += seg.length
        n = offset
        for i, layer in enumerate(stage_layers):
            k = state.plans[b][0].get(layer)
            n = n if k is None else min(k, n)
            table[b, length + i] = n
    state.planned = table[:, length:].T.tolist()
    with host_side():
        table = torch.from_numpy(table)
    uploaded = upload(table, device)
    return uploaded[:, :length], uploaded[:, length:]


def _stage_counts(state: _Prefill, stage_index: int, asked: list[int], device: torch.device) -> torch.Tensor:
    """[B] visual tokens each sample keeps at this stage, on the device: the uploaded plan's column, unless an
    earlier stage kept a data-dependent count (then this stage's counts are uploaded on their own)."""
    before = state.planned[stage_index - 1] if stage_index else state.n_visual
    if state.n_current == before:
        return state.keep_counts[:, stage_index]
    with host_side():
        asked = torch.tensor(asked)
    return upload(asked, device)


def _per_segment(frames: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    """Per-frame encoder rows [tokens, C] regrouped per segment of `lengths` frames: [T, tokens, C] each."""
    out, at = [], 0
    for length in lengths:
        out.append(torch.stack(frames[at : at + length]))
        at += length
    return out


def _cached_counts(state: _Prefill, num_layers: int) -> dict[int, list[int]]:
    """Per layer and sample, the prompt tokens its KV cache holds after prefill (crop: the final survivors)."""
    if not state.cached:
        return {layer: [0] * len(state.n_prompt) for layer in range(num_layers)}
    final = state.processed[num_layers - 1]
    if state.crop:
        return {layer: list(final) for layer in range(num_layers)}
    return {layer: state.processed[layer] for layer in range(num_layers)}


def _read_back(state: _Prefill, num_layers: int) -> tuple[list[StageRecord], list[SampleRecord]]:
    """The prefill's stage and sample records, read from the device in ONE transfer the first time they are
    asked for (the prefill itself reads nothing back)."""
    if state._read is not None:
        return state._read
    cuts = state.cuts
    parts = [cut.kept.flatten() for cut in cuts] + [cut.merged for cut in cuts if cut.merged is not None]
    values = torch.cat([part.long() for part in parts]).tolist() if parts else []
    stages, at = [], 0
    for cut in cuts:
        width = cut.kept.shape[1]
        kept = [values[at + b * width : at + b * width + count] for b, count in enumerate(cut.counts)]
        at += cut.kept.numel()
        stages.append(StageRecord(cut.layer, cut.budget, kept, [0] * len(cut.counts), cut.seconds,
                                  aux_flops=list(cut.aux_flops)))
    for cut, stage in zip(cuts, stages, strict=True):
        if cut.merged is not None:
            stage.merged = values[at : at + len(cut.counts)]
            at += len(cut.counts)
    cached = _cached_counts(state, num_layers)
    records = []
    for b, segments in enumerate(state.layout):
        n = state.n_visual[b]
        record = SampleRecord(
            n_visual=n, n_prompt=state.n_prompt[b], grids=[list(seg.grid) for seg in segments],
            processed=[state.processed[layer][b] for layer in range(num_layers)],
            cached=[cached[layer][b] for layer in range(num_layers)],
            kept_per_stage=[len(stage.kept[b]) for stage in stages],
            kept=stages[-1].kept[b] if stages else list(range(n)),
            # flagged by the plan, or a data-dependent official rule kept fewer than it was asked (CDPruner)
            budget_unreachable=state.plans[b][1] or any(len(stage.kept[b]) < stage.budget[b] for stage in stages),
            aux_flops=sum(stage.aux_flops[b] for stage in stages),
        )
        unreduced = state.reduced[b] if state.reduced is not None else None
        records.append(record if unreduced is None else record.unreduced(unreduced))
    state._read = (stages, records)
    return state._read


def _write_rows(hidden: torch.Tensor, rows: torch.Tensor, real: torch.Tensor, new_visual: torch.Tensor,
                rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the merged `rows` [B, K, C] (kept-token order) in the kept tokens' new slots, and count per sample
    the rows that really differ from the tokens' own states (a merge, not a copy)."""
    batch, length, channels = hidden.shape
    keep = rows.shape[1]
    dest = torch.full((batch, keep + 1), length, dtype=torch.long, device=hidden.device)
    dest.scatter_(1, torch.where(new_visual, rank, keep), torch.arange(length, device=hidden.device).expand(batch, -1))
    dest = torch.where(real, dest[:, :keep], length)
    padded = torch.cat([hidden, hidden.new_zeros(batch, 1, channels)], dim=1)
    own = gather_rows(padded, dest).to(rows.dtype)
    changed = ((rows - own).abs().amax(-1) > 1e-6 * (1 + own.abs().amax(-1))) & real
    padded.scatter_(1, dest[..., None].expand(-1, -1, channels), rows.to(hidden.dtype))
    return padded[:, :length], changed.sum(1)


def _key_buffer(valid: torch.Tensor, capacity: int, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, prompt + capacity] key validity for one-token decode steps, in the backend's form (generated tokens
    are always visible to the newest one): bool for sdpa, additive float for eager, int for flash."""
    keys = torch.cat([valid, valid.new_ones(valid.shape[0], capacity)], dim=1)
    if implementation == "eager":
        return torch.zeros((), dtype=dtype, device=valid.device).where(keys, torch.finfo(dtype).min)
    return keys.long() if implementation.startswith("flash") else keys


def _multi_token_kwargs(state: _Prefill, plan: _DecodeSlots, rotary: nn.Module | None, implementation: str,
                        hidden: torch.Tensor) -> dict:
    """A decode step of several tokens (rare: assisted decoding): the mask and positions built for it."""
    prompt = plan.slots
    batch, device = prompt.idx.shape[0], prompt.idx.device
    key_valid = torch.cat([prompt.valid, prompt.valid.new_ones(batch, state.generated)], dim=1)
    allowed = decode_pairs(key_valid, state.step_length)
    update = {"attention_mask": backend_mask(allowed, key_valid, implementation, hidden.dtype, padded=plan.padded)}
    if plan.offset is not None:
        before = state.generated - state.step_length
        positions = plan.offset[:, None] + before + torch.arange(state.step_length, device=device)[None]
        update["position_embeddings"] = rotary(hidden, positions)
        update["position_ids"] = positions
    return update


def _add_deepstack(hidden: torch.Tensor, slots: Slots, features: list[torch.Tensor], rows: torch.Tensor,
                   layer: int) -> torch.Tensor:
    """What Qwen3-VL adds after decoder `layer` (DeepStack: vision-tower features per visual token), added
    only to the visual tokens the slots still hold, so the features follow the pruned tokens."""
    row = slots.gather(rows)
    kept = (row >= 0) & slots.valid
    feature = features[layer].to(hidden.device, hidden.dtype)
    added = feature.index_select(0, row.clamp(min=0).flatten()).view(*row.shape, -1)
    return torch.where(kept[..., None], hidden + added, hidden)


def _compact_positions(slots: Slots, start: torch.Tensor) -> torch.Tensor:
    """[B, L] positions renumbered over each sample's real slots, from its first real token's position."""
    return (start[:, None] + slots.valid.long().cumsum(1) - 1).clamp(min=0)


def _gather_last(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather along the last (sequence) axis for [B|1, S] or [k, B|1, S] position ids."""
    if values.dim() == 2:
        return values.expand(idx.shape[0], -1).gather(1, idx)
    return torch.stack([_gather_last(v, idx) for v in values])


def _crop_cache(cache: DynamicCache, state: _Prefill) -> None:
    """Cut every earlier layer's cache to the final survivors (the official CLSE LLaVA behaviour)."""
    final = state.slots
    for layer, slots in state.layer_slots.items():
        if slots is final:
            continue
        # each final slot's place in this layer's slots (padding slots: any place, they stay masked)
        rel = slots.lookup_all(final.idx).clamp(min=0)
        cache_layer: DynamicLayer = cache.layers[layer]
        index = rel[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
        cache_layer.keys = cache_layer.keys.gather(2, index)
        cache_layer.values = cache_layer.values.gather(2, index)
        state.layer_slots[layer] = final


__all__ = ["Pruner", "adapter_for", "BUDGETS", "SCHEDULES"]
