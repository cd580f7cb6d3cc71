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
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from clse_exp.compat import cache_in, cache_of
from clse_exp.data.sample import Sample
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
    Selection,
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
    mask2d: torch.Tensor | None = None
    length: int = 0
    visual_rank: torch.Tensor | None = None  # [B, S] rank among the sample's visual tokens, -1 for text
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    start: torch.Tensor | None = None  # [B] position of each sample's first real token
    first_real: torch.Tensor | None = None  # [B] sequence index of each sample's first real token
    slots: Slots | None = None
    compacted: bool = False  # positions were renumbered by a cut (rules.prefill == "compact")
    layer_slots: dict[int, Slots] = field(default_factory=dict)
    captures: dict[int, Capture] = field(default_factory=dict)
    layer_kwargs: tuple[Slots, dict] | None = None
    stages: list[StageRecord] = field(default_factory=list)
    records: list[SampleRecord] = field(default_factory=list)
    deepstack: tuple[list[torch.Tensor], torch.Tensor] | None = None  # features per layer, [B, S] row or -1
    vision: dict[int, list[list[Any]]] | None = None  # encoder layer -> per sample, per encoded segment input
    generated: int = 0
    step_length: int = 0
    decoding: bool = False
    step_cache: dict[Any, Any] = field(default_factory=dict)
    reduced: list[list[tuple[int, int, int]] | None] | None = None  # per sample: unreduced grids (prepare_samples)

    @property
    def n_visual(self) -> list[int]:
        return [sum(seg.length for seg in segments) for segments in self.layout]


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
        self._asked_layers = (reference_layer, None if prune_layers is None else tuple(int(x) for x in prune_layers))
        self.facts: ModelFacts | None = None
        self._vision_pending: dict[int, list[Any]] = {}
        self._vision_modules: tuple[nn.ModuleList | None, nn.Module | None] = (None, None)
        self._encoder_kinds: tuple[str, ...] = ("image",)
        self._encoder_queries_keys = None
        self._state: _Prefill | None = None
        self._reduced: list[list[tuple[int, int, int]] | None] | None = None  # see prepare_samples
        self._last: _Prefill | None = None

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
        try:
            if self.official_counts:
                counts = self.method.official_counts(n_visual, self.keep, self.budget, self.layers, self.facts)
                if counts is not None:
                    return {layer: c for layer, c in zip(layers, counts, strict=True) if c is not None}, False
            stages = plan_stages(n_visual, self.facts.num_layers, layers, self.keep, self.budget, self.shape)
            return {stage.layer: stage.count for stage in stages}, False
        except UnreachableBudget:
            # Only the one-token-per-stage floor is in the way (an image smaller than the budget can express):
            # keep the fewest possible, and say so in the sample's record and the run summary.
            return {layer: 1 for layer in layers}, True

    def plan(self, n_visual: int) -> dict[int, int]:
        """{stage layer: visual tokens kept} for a sample with `n_visual` visual tokens (bound pruners only)."""
        return dict(self._plan(n_visual)[0])

    # ----------------------------------------------------------------------------------- public
    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[Pruner]:
        """Hook `model` (a stock *ForConditionalGeneration) for the duration of the block."""
        adapter = adapter_for(model)
        self.bind(adapter.facts(model.config))
        text_model = adapter.text_model(model)
        layers = adapter.decoder_layers(model)
        implementation = text_model.config._attn_implementation
        rotary = getattr(text_model, "rotary_emb", None)
        self._vision_pending: dict[int, list[Any]] = {}
        self._vision_modules = (None, None)
        handles = self._vision_hooks(adapter, model)
        handles += [
            adapter.multimodal_model(model).register_forward_pre_hook(
                lambda _m, args, kwargs: self._on_multimodal(adapter, model, args, kwargs), with_kwargs=True),
            text_model.register_forward_pre_hook(self._on_text_model, with_kwargs=True),
            text_model.register_forward_hook(self._after_text_model, with_kwargs=True),
        ]
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(
                self._layer_hook(index, layers, text_model.norm, rotary, implementation), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._state = None

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
        encoded = [[seg for seg in segments if seg.kind in self._encoder_kinds] for segments in state.layout]
        call_order = [(kind, b, seg.start) for kind in self._encoder_kinds for b, segments in enumerate(encoded)
                      for seg in segments if seg.kind == kind]
        out = {}
        for layer, items in self._vision_pending.items():
            if len(items) != len(call_order):
                raise RuntimeError(f"captured {len(items)} encoder inputs for {len(call_order)} "
                                   f"{'/'.join(self._encoder_kinds)} segments")
            per_sample: list[list[tuple[int, Any]]] = [[] for _ in encoded]
            for (_, b, start), item in zip(call_order, items, strict=True):
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
                for s in self._last.stages]

    @property
    def records(self) -> list[SampleRecord]:
        """Per sample of the last prefill: tokens each layer processed and cached, kept tokens per stage."""
        return list(self._last.records) if self._last is not None else []

    @property
    def stage_seconds(self) -> float:
        """Wall time spent scoring and cutting in the last prefill."""
        return sum(stage.seconds for stage in self._last.stages) if self._last is not None else 0.0

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
        # every kwarg: families read their layout from different ones (grids, image sizes, encoder outputs)
        layout = adapter.visual_layout(model, input_ids, **{k: v for k, v in kwargs.items() if k != "input_ids"})
        plans = [self._plan(sum(seg.length for seg in segments)) if segments else ({}, False) for segments in layout]
        reduced = self._reduced
        if reduced is not None:
            if len(reduced) != len(layout) or any(grids is not None and len(grids) != len(segments)
                                                  for grids, segments in zip(reduced, layout, strict=True)):
                raise RuntimeError(f"these inputs are not the samples prune={self.method.name} last prepared: build "
                                   "every batch with pruner.prepare_samples (clse_exp.generation.prepare)")
            plans = [({}, False) if grids is not None else plan for grids, plan in zip(reduced, plans, strict=True)]
        self._state = _Prefill(layout=layout, plans=plans, reduced=reduced)
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
            state.visual_rank = _visual_rank(state.layout, embeds.shape[0], state.length, embeds.device)
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
            state.step_cache = {}
        kwargs["attention_mask"] = None  # every layer gets the engine's own mask (see _layer_hook)
        return args, kwargs

    def _after_text_model(self, _module: nn.Module, _args: tuple, kwargs: dict, output: Any) -> None:
        state = self._state
        if state is None or state.decoding:
            return None
        processed = {layer: slots.valid.sum(1).tolist() for layer, slots in state.layer_slots.items()}
        cache = cache_of(output) or cache_in(kwargs)
        if self.rules.kv_policy == "crop" and cache is not None:
            _crop_cache(cache, state)
        state.records = self._sample_records(state, processed, cache is not None)
        state.captures.clear()
        state.decoding = True
        self._last = state
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
                kwargs.update(self._decode_kwargs(state, index, rotary, implementation, args[0]))
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
        cos, sin = kwargs["position_embeddings"]
        state.cos, state.sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == state.length:
            state.position_ids = position_ids
        first_real = state.slots.valid.float().argmax(1)
        state.first_real = first_real
        if state.position_ids is not None and state.position_ids.dim() == 2:
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
        state.stages[-1].seconds = time.perf_counter() - started
        return hidden

    def _select_and_shrink(self, state: _Prefill, layer: int, stage_index: int, hidden: torch.Tensor,
                           layers: nn.ModuleList, norm: nn.Module, rotary: nn.Module | None) -> torch.Tensor:
        visual_rank = state.slots.gather(state.visual_rank)
        cos, sin = self._prefill_rotary(state, rotary, hidden)
        ctx = StageContext(
            layer=layer, stage_index=stage_index, hidden=hidden, slots=state.slots, cos=cos, sin=sin,
            is_visual=(visual_rank >= 0) & state.slots.valid, visual_rank=visual_rank,
            grids_per_sample=[[seg.grid for seg in segments] for segments in state.layout],
            n_visual=state.n_visual, layers=layers, final_norm=norm, captures=state.captures,
            reference_layer=self.layers.reference_layer, seed=self.seed,
            attention_dtype=hidden.dtype if self.protocol == "official" else None, protocol=self.protocol,
            family=self.facts.family, prompt_start=state.first_real, vision=state.vision,
            vision_layers=self._vision_modules[0], projector=self._vision_modules[1],
            encoder_queries_keys=self._encoder_queries_keys,
            segment_spans=[[(seg.start, seg.positions[-1]) for seg in segments] for segments in state.layout],
        )
        keep_rows, budgets, kept, merged, replacements, aux = [], [], [], [], [], []
        for b in range(hidden.shape[0]):
            visual = ctx.visual_positions(b)
            budget = state.plans[b][0].get(layer)
            selection = None
            if budget is not None and budget < len(visual):
                selection = self.method.select(ctx, b, budget)
                if isinstance(selection, torch.Tensor):  # a set of tokens: they keep their original order
                    selection = Selection(selection.sort().values)
            aux.append(selection.aux_flops if selection is not None else 0)
            order, rows = self._arrange(selection, len(visual), visual.device)
            keep_rows.append(_interleave(ctx.text_positions(b), visual[order]))
            budgets.append(len(visual) if budget is None else min(budget, len(visual)))
            kept.append(visual_rank[b, visual[order]].tolist())
            merged.append(0 if rows is None else _changed_rows(rows, hidden[b, visual[order]]))
            replacements.append((visual[order], rows))
        state.stages.append(StageRecord(layer, budgets, kept, merged, aux_flops=aux))
        old = state.slots
        state.slots, rel = shrink(old, keep_rows)
        if self.rules.prefill == "compact":
            state.compacted = True
        state.layer_kwargs = None
        hidden = gather_rows(hidden, rel)
        for b, (positions, rows) in enumerate(replacements):
            if rows is not None:
                hidden[b, state.slots.lookup(old.idx[b, positions], b)] = rows.to(hidden.dtype)
        return hidden

    def _arrange(self, selection: Selection | None, n: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept visual tokens' order in the sequence and their replacement rows (if merged)."""
        if selection is None:
            return torch.arange(n, device=device), None
        order, rows = selection.order.to(device), selection.hidden
        if self.rules.prefill == "original":  # positions follow original order, so the sequence must too
            ascending = order.sort()
            order, rows = ascending.values, None if rows is None else rows[ascending.indices]
        return order, rows

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
                                                    hidden.dtype)
            state.layer_kwargs = (slots, update)
        return state.layer_kwargs[1]

    def _sample_records(self, state: _Prefill, processed: dict[int, list[int]], cached: bool) -> list[SampleRecord]:
        records = []
        num_layers = self.facts.num_layers
        for b, segments in enumerate(state.layout):
            per_layer = [processed[layer][b] for layer in range(num_layers)]
            if cached:
                kept_in_cache = [int(state.layer_slots[layer].valid[b].sum()) for layer in range(num_layers)]
            else:
                kept_in_cache = [0] * num_layers
            n = state.n_visual[b]
            stages = state.stages
            record = SampleRecord(
                n_visual=n, n_prompt=int(state.mask2d[b].sum()) if state.mask2d is not None else state.length,
                grids=[list(seg.grid) for seg in segments], processed=per_layer, cached=kept_in_cache,
                kept_per_stage=[len(stage.kept[b]) for stage in stages],
                kept=stages[-1].kept[b] if stages else list(range(n)),
                budget_unreachable=state.plans[b][1], aux_flops=sum(stage.aux_flops[b] for stage in stages),
            )
            unreduced = state.reduced[b] if state.reduced is not None else None
            records.append(record if unreduced is None else record.unreduced(unreduced))
        return records

    # ----------------------------------------------------------------------------------- decode
    def _decode_kwargs(self, state: _Prefill, layer: int, rotary: nn.Module | None, implementation: str,
                       hidden: torch.Tensor) -> dict:
        """Mask (and, under `cache_length` positions, rotary) for this step's tokens at `layer`: keys are the
        prompt slots this layer cached, then every generated token."""
        prompt = state.layer_slots[layer]
        key = id(prompt)
        if key not in state.step_cache:
            batch, device = prompt.idx.shape[0], prompt.idx.device
            generated = torch.ones(batch, state.generated, dtype=torch.bool, device=device)
            key_valid = torch.cat([prompt.valid, generated], dim=1)
            allowed = decode_pairs(key_valid, state.step_length)
            update = {"attention_mask": backend_mask(allowed, key_valid, implementation, hidden.dtype)}
            if self.rules.decode == "cache_length":
                before = state.generated - state.step_length
                offset = state.start + prompt.valid.sum(1) + before
                positions = offset[:, None] + torch.arange(state.step_length, device=device)[None]
                update["position_embeddings"] = rotary(hidden, positions)
                update["position_ids"] = positions
            state.step_cache[key] = update
        return state.step_cache[key]


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


def _visual_rank(layout: list[list[VisualSegment]], batch: int, length: int, device: torch.device) -> torch.Tensor:
    rank = torch.full((batch, length), -1, dtype=torch.long, device=device)
    for b, segments in enumerate(layout):
        offset = 0
        for seg in segments:
            rank[b, list(seg.positions)] = torch.arange(offset, offset + seg.length, device=device)
            offset += seg.length
    return rank


def _interleave(text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Slot positions of the kept tokens in sequence order: text slots where they were, and the kept visual
    tokens, in their given order, in the places the sorted kept visual slots occupy."""
    merged = torch.cat([text, visual]).sort().values
    is_visual = torch.isin(merged, visual)
    merged[is_visual] = visual
    return merged


def _changed_rows(rows: torch.Tensor, own: torch.Tensor) -> int:
    """How many replacement rows really differ from the tokens' own states (a merge, not a copy)."""
    own = own.to(rows.dtype)
    return int(((rows - own).abs().amax(-1) > 1e-6 * (1 + own.abs().amax(-1))).sum())


def _add_deepstack(hidden: torch.Tensor, slots: Slots, features: list[torch.Tensor], rows: torch.Tensor,
                   layer: int) -> torch.Tensor:
    """What Qwen3-VL adds after decoder `layer` (DeepStack: vision-tower features per visual token), added
    only to the visual tokens the slots still hold, so the features follow the pruned tokens."""
    row = slots.gather(rows)
    kept = (row >= 0) & slots.valid
    hidden = hidden.clone()
    hidden[kept] = hidden[kept] + features[layer].to(hidden.device, hidden.dtype)[row[kept]]
    return hidden


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
        rel = torch.stack([slots.lookup(final.idx[b].masked_fill(~final.valid[b], int(slots.idx[b][slots.valid[b]][0])),
                                        b) for b in range(final.idx.shape[0])])
        cache_layer: DynamicLayer = cache.layers[layer]
        index = rel[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
        cache_layer.keys = cache_layer.keys.gather(2, index)
        cache_layer.values = cache_layer.values.gather(2, index)
        state.layer_slots[layer] = final


__all__ = ["Pruner", "adapter_for", "BUDGETS", "SCHEDULES"]
