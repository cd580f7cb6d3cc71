"""The pruning engine: forward pre-hooks on a stock transformers VLM, attached for a call, removed after.

A method is a list of stages; a stage runs before decoder layer K and keeps, per sample, a budget of
visual tokens. The engine (never the method) keeps every later layer and every decode step consistent:
hidden states, rotary (cos, sin) gathered at the ORIGINAL positions, position ids, attention masks it
builds itself from the slots each layer holds, and the KV cache (`ragged` or `crop`).
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
from clse_exp.config import validate_layers
from clse_exp.errors import ConfigError
from clse_exp.models import ADAPTERS, ModelAdapter, VisualSegment
from clse_exp.pruning.masks import allowed_pairs, backend_mask
from clse_exp.pruning.schedule import Stage, plan_stages
from clse_exp.pruning.signals import Capture, StageContext
from clse_exp.pruning.slots import Slots, shrink

KV_POLICIES = ("ragged", "crop")
PAPER_FAMILIES = {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl", "llava": "llava", "video_llava": "llava"}


@dataclass
class _Prefill:
    """Everything the engine learns in one prefill call and needs at every later layer and decode step."""

    layout: list[list[VisualSegment]]
    mask2d: torch.Tensor | None = None
    length: int = 0
    visual_rank: torch.Tensor | None = None  # [B, S] rank among the sample's visual tokens, -1 for text
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    slots: Slots | None = None
    layer_slots: dict[int, Slots] = field(default_factory=dict)
    layer_inputs: dict[int, Capture] = field(default_factory=dict)
    layer_kwargs: tuple[Slots, dict] | None = None
    trace: list[dict] = field(default_factory=list)
    generated: int = 0
    step_length: int = 0
    decoding: bool = False
    step_masks: dict[int, Any] = field(default_factory=dict)

    @property
    def n_visual(self) -> list[int]:
        return [sum(seg.length for seg in segments) for segments in self.layout]


class Pruner:
    """Applies `method` at `stages(n_visual)` while attached; see `attach`.

    Stages run before each of `prune_layers`. The budget (`keep`, `budget`, `schedule`, `shape`; see
    clse_exp.pruning.schedule) is planned per sample from its own visual-token count, so samples with
    different image sizes in one batch each get their own counts. A stage that would not reduce a
    sample's tokens keeps them all.
    """

    def __init__(self, method: Any, prune_layers: Sequence[int], reference_layer: int = 0, keep: float = 1.0,
                 budget: str = "average", schedule: str = "auto", shape: Sequence[float] | None = None,
                 kv_policy: str = "ragged", seed: int = 0, time_stages: bool = False) -> None:
        if kv_policy not in KV_POLICIES:
            raise ConfigError(f"kv_policy={kv_policy!r} is not valid; choose one of: {', '.join(KV_POLICIES)}")
        self.method, self.prune_layers, self.reference_layer = method, list(prune_layers), reference_layer
        self.keep, self.budget, self.schedule = keep, budget, schedule
        self.shape = list(shape) if shape is not None else None
        self.kv_policy, self.seed, self.time_stages = kv_policy, seed, time_stages
        self.num_layers: int | None = None
        self._state: _Prefill | None = None
        self._last: _Prefill | None = None

    def bind(self, num_layers: int, model_type: str) -> None:
        """Check the stage layers against the model depth and fix the per-sample plan for it."""
        validate_layers(self.reference_layer, self.prune_layers, num_layers)
        self.num_layers = num_layers
        family = PAPER_FAMILIES.get(model_type)

        @lru_cache(maxsize=256)
        def plan(n_visual: int) -> tuple[Stage, ...]:
            try:
                return tuple(plan_stages(n_visual, num_layers, self.prune_layers, self.keep, budget=self.budget,
                                         schedule=self.schedule, shape=self.shape, paper_family=family))
            except ConfigError:
                layers_floor = self.prune_layers[0] / num_layers  # layers before the first cut see every token
                if self.budget != "average" or self.schedule != "auto" or self.keep < layers_floor:
                    raise  # no image size can meet this budget with these layers: the config is wrong
                # Only the one-token-per-stage floor is in the way (a tiny image): keep the fewest possible and
                # let the sample's achieved retention say so, rather than end a long run on one odd sample.
                return tuple(Stage(layer, 1) for layer in self.prune_layers)

        self.plan = plan

    # ----------------------------------------------------------------------------------- public
    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[Pruner]:
        """Hook `model` (a stock *ForConditionalGeneration) for the duration of the block."""
        adapter = _adapter_for(model)
        text_model = adapter.text_model(model)
        layers = adapter.decoder_layers(model)
        self.bind(len(layers), model.config.model_type)
        implementation = text_model.config._attn_implementation
        handles = [
            adapter.multimodal_model(model).register_forward_pre_hook(
                lambda _m, args, kwargs: self._on_multimodal(adapter, model, args, kwargs), with_kwargs=True),
            text_model.register_forward_pre_hook(self._on_text_model, with_kwargs=True),
            text_model.register_forward_hook(self._after_text_model, with_kwargs=True),
        ]
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(
                self._layer_hook(index, layers, text_model.norm, implementation), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._state = None

    @property
    def trace(self) -> list[dict]:
        """Per stage of the last prefill: layer, per-sample budget, per-sample kept ORIGINAL visual indices."""
        return self._last.trace if self._last is not None else []

    @property
    def stage_seconds(self) -> float:
        """Wall time spent scoring and cutting in the last prefill."""
        return sum(stage.get("seconds", 0.0) for stage in self.trace)

    def layer_visual_counts(self) -> list[list[int]]:
        """Per sample, how many visual tokens each decoder layer processed in the last prefill."""
        counts = []
        for b, n in enumerate(self._last.n_visual):
            row, current = [], n
            for layer in range(self.num_layers):
                for stage in self.trace:
                    if stage["layer"] == layer:
                        current = len(stage["kept"][b])
                row.append(current)
            counts.append(row)
        return counts

    def trace_records(self) -> list[dict]:
        """Per sample of the last prefill: visual count, grids, kept counts per stage, final kept ORIGINAL
        indices, and the exact layer-averaged and final retention it achieved."""
        records = []
        for b, per_layer in enumerate(self.layer_visual_counts()):
            n = self._last.n_visual[b]
            records.append({
                "n_visual": n,
                "grids": [list(seg.grid) for seg in self._last.layout[b]],
                "kept_per_stage": [len(stage["kept"][b]) for stage in self.trace],
                "kept": self.trace[-1]["kept"][b] if self.trace else list(range(n)),
                "visual_per_layer": per_layer,
                "retention": {"average": sum(per_layer) / (n * len(per_layer)) if n else 1.0,
                              "final": per_layer[-1] / n if n else 1.0},
            })
        return records

    # ------------------------------------------------------------------------------------ hooks
    def _on_multimodal(self, adapter: ModelAdapter, model: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_in(kwargs)
        _refuse_unsupported_cache(cache)
        if cache is not None and cache.get_seq_length() > 0:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("pruning needs input_ids (the visual token spans are read from them)")
        grids = {k: kwargs.get(k) for k in ("image_grid_thw", "video_grid_thw", "position_ids")}
        self._state = _Prefill(layout=adapter.visual_layout(model, input_ids, **grids))
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
        else:
            state.decoding = True
            state.generated += embeds.shape[1]
            state.step_length = embeds.shape[1]
            state.step_masks = {}
        kwargs["attention_mask"] = None  # every layer gets the engine's own mask (see _layer_hook)
        return args, kwargs

    def _after_text_model(self, _module: nn.Module, _args: tuple, kwargs: dict, output: Any) -> None:
        state = self._state
        if state is None or state.decoding:
            return None
        cache = cache_of(output) or cache_in(kwargs)
        if self.kv_policy == "crop" and cache is not None:
            _crop_cache(cache, state)
        state.layer_inputs.clear()
        state.decoding = True
        self._last = state
        return None

    def _layer_hook(self, index: int, layers: nn.ModuleList, norm: nn.Module, implementation: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if state is None:
                return None
            if state.decoding:
                kwargs["attention_mask"] = self._decode_mask(state, index, implementation, args[0].dtype)
                return args, kwargs
            hidden = args[0]
            if index == 0:
                self._start_prefill(state, hidden, kwargs)
            if index in self.prune_layers:
                hidden = self._run_stage(state, index, self.prune_layers.index(index), hidden, layers, norm)
            state.layer_slots[index] = state.slots
            kwargs.update(self._prefill_kwargs(state, implementation, hidden.dtype))
            if index == self.reference_layer or index + 1 in self.prune_layers:
                cos, sin = kwargs["position_embeddings"]
                state.layer_inputs[index] = Capture(hidden, state.slots, cos, sin)
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

    def _run_stage(self, state: _Prefill, layer: int, stage_index: int, hidden: torch.Tensor,
                   layers: nn.ModuleList, norm: nn.Module) -> torch.Tensor:
        """Select, shrink the slots, gather hidden states; the stage's wall time goes into the trace
        (synchronized on CUDA when `time_stages`, so the benchmark's overhead numbers are real)."""
        if self.time_stages and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        started = time.perf_counter()
        hidden = self._select_and_shrink(state, layer, stage_index, hidden, layers, norm)
        if self.time_stages and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        state.trace[-1]["seconds"] = time.perf_counter() - started
        return hidden

    def _select_and_shrink(self, state: _Prefill, layer: int, stage_index: int, hidden: torch.Tensor,
                           layers: nn.ModuleList, norm: nn.Module) -> torch.Tensor:
        is_visual = state.slots.gather(state.visual_rank) >= 0
        is_visual &= state.slots.valid
        ctx = StageContext(
            layer=layer, stage_index=stage_index, hidden=hidden, slots=state.slots,
            cos=state.slots.gather(state.cos), sin=state.slots.gather(state.sin), is_visual=is_visual,
            visual_rank=state.slots.gather(state.visual_rank),
            grids_per_sample=[[seg.grid for seg in segments] for segments in state.layout],
            n_visual=state.n_visual, layers=layers, final_norm=norm,
            reference=state.layer_inputs.get(self.reference_layer),
            previous_layer_input=state.layer_inputs.get(layer - 1), seed=self.seed,
        )
        keep_rows, budgets, kept = [], [], []
        for b, n in enumerate(state.n_visual):
            visual = ctx.visual_positions(b)
            budget = self._budget(n, layer)
            if budget is None or budget >= len(visual):
                chosen = visual
            else:
                picks = self.method.select(ctx, b, budget)
                chosen = visual[picks.sort().values]
            keep = torch.cat([ctx.text_positions(b), chosen]).sort().values
            keep_rows.append(keep)
            budgets.append(len(visual) if budget is None else min(budget, len(visual)))
            kept.append(ctx.visual_rank[b, chosen].tolist())
        state.trace.append({"layer": layer, "budget": budgets, "kept": kept})
        state.slots, rel = shrink(state.slots, keep_rows)
        state.layer_kwargs = None
        return hidden.gather(1, rel[..., None].expand(-1, -1, hidden.shape[-1]))

    def _budget(self, n_visual: int, layer: int) -> int | None:
        if n_visual == 0:
            return None
        return next((stage.count for stage in self.plan(n_visual) if stage.layer == layer), None)

    def _prefill_kwargs(self, state: _Prefill, implementation: str, dtype: torch.dtype) -> dict:
        """Rotary, positions and mask for the current slots; rebuilt only when the slots change."""
        if state.layer_kwargs is None or state.layer_kwargs[0] is not state.slots:
            slots = state.slots
            update = {"position_embeddings": (slots.gather(state.cos), slots.gather(state.sin))}
            if state.position_ids is not None:
                update["position_ids"] = _gather_last(state.position_ids, slots.idx)
            allowed = allowed_pairs(slots.idx, slots.idx, slots.valid)
            update["attention_mask"] = backend_mask(allowed, slots.valid, implementation, dtype)
            state.layer_kwargs = (slots, update)
        return state.layer_kwargs[1]

    # ----------------------------------------------------------------------------------- decode
    def _decode_mask(self, state: _Prefill, layer: int, implementation: str, dtype: torch.dtype) -> Any:
        """Columns: the prompt slots this layer cached, then every generated token; rows: this step's tokens."""
        prompt = state.layer_slots[layer]
        key = id(prompt)
        if key not in state.step_masks:
            batch, device = prompt.idx.shape[0], prompt.idx.device
            generated = torch.arange(state.length, state.length + state.generated, device=device).expand(batch, -1)
            key_pos = torch.cat([prompt.idx, generated], dim=1)
            key_valid = torch.cat([prompt.valid, torch.ones_like(generated, dtype=torch.bool)], dim=1)
            allowed = allowed_pairs(generated[:, -state.step_length:], key_pos, key_valid)
            state.step_masks[key] = backend_mask(allowed, key_valid, implementation, dtype)
        return state.step_masks[key]


def _adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"no adapter for model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]()


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
        lookup = torch.zeros(slots.idx.shape[0], state.length, dtype=torch.long, device=slots.idx.device)
        for b in range(slots.idx.shape[0]):  # only real slots: pad slots may repeat a real token's index
            lookup[b, slots.idx[b][slots.valid[b]]] = slots.valid[b].nonzero().flatten()
        rel = lookup.gather(1, final.idx).masked_fill(~final.valid, 0)
        cache_layer: DynamicLayer = cache.layers[layer]
        index = rel[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
        cache_layer.keys = cache_layer.keys.gather(2, index)
        cache_layer.values = cache_layer.values.gather(2, index)
        state.layer_slots[layer] = final
