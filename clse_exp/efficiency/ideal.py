"""The ideal pruned prefill: the stock decoder layers run on exactly the tokens each layer kept, and nothing else.

A pruned prefill can be no faster than this, so `pruned / ideal - 1` is what the engine itself costs (hooks,
scoring, gathers, masks). For one call the text model's forward is swapped for a plain loop over its stock
layers; the vision tower, embeddings, rotary positions, KV cache and lm_head stay stock. Layers before the
first cut run on every token; each later segment runs on its kept rows, gathered once at the cut (hidden
states, rotary cos/sin, text positions), with no mask but SDPA's own causal one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from clse_exp.compat import CACHE_NAMES, cache_in
from clse_exp.models import VisualSegment
from clse_exp.pruning.record import SampleRecord
from clse_exp.pruning.slots import gather_rows

_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
_CACHE_FIELD = next(name for name in CACHE_NAMES if name in _OUTPUT_FIELDS)


class IdealUnavailable(ValueError):
    """This prefill has no ideal counterpart here (padding, unequal counts per sample, DeepStack features)."""


@dataclass(frozen=True)
class Segments:
    """Where the token set changes: before layer `starts[s]` the sequence becomes `rows[s]` ([B, n_s] original
    sequence positions, ascending), gathered from the previous segment's sequence at `relative[s]`."""

    starts: tuple[int, ...] = ()
    rows: tuple[torch.Tensor, ...] = ()
    relative: tuple[torch.Tensor, ...] = ()

    def counts(self, num_layers: int, length: int) -> list[int]:
        """Tokens each layer runs on (the same for every sample)."""
        counts, current = [], length
        for layer in range(num_layers):
            if layer in self.starts:
                current = self.rows[self.starts.index(layer)].shape[1]
            counts.append(current)
        return counts


def segments_from_trace(trace: Sequence[dict], layout: Sequence[Sequence[VisualSegment]], length: int,
                        records: Sequence[SampleRecord] = (), device: torch.device | str = "cpu") -> Segments:
    """The segments of a pruned prefill, from the pruner's trace (kept ORIGINAL visual indices per stage) and
    the prompt's visual layout: every text token stays, the kept visual tokens join them in sequence order.

    Every sample must keep as many tokens as the others (the stock layers take no padding mask here); with
    `records`, the counts are checked against the tokens each layer really processed.
    """
    visual = [torch.tensor([p for seg in segments for p in seg.positions], dtype=torch.long) for segments in layout]
    text = [torch.tensor(sorted(set(range(length)) - set(v.tolist())), dtype=torch.long) for v in visual]
    starts, rows, relative = [], [], []
    previous = torch.arange(length).expand(len(layout), length)
    for stage in trace:
        kept = [torch.cat([t, v[torch.tensor(k, dtype=torch.long)]]).sort().values
                for t, v, k in zip(text, visual, stage["kept"], strict=True)]
        if len({len(k) for k in kept}) != 1:
            raise IdealUnavailable(f"the ideal forward needs equal token counts per sample; the stage at layer "
                                   f"{stage['layer']} keeps {[len(k) for k in kept]}")
        current = torch.stack(kept)
        starts.append(int(stage["layer"]))
        rows.append(current.to(device))
        relative.append(torch.searchsorted(previous.contiguous(), current).to(device))
        previous = current
    segments = Segments(tuple(starts), tuple(rows), tuple(relative))
    for b, record in enumerate(records):
        counts = segments.counts(len(record.processed), length)
        if counts != list(record.processed):
            raise IdealUnavailable(f"sample {b}: the trace gives per-layer counts {counts}, the engine processed "
                                   f"{record.processed} (padding, or a merge that changed counts?)")
    return segments


@contextmanager
def ideal_text_model(text_model: nn.Module, segments: Segments, mrope: bool) -> Iterator[None]:
    """While inside, `text_model` runs `segments` as a plain loop over its stock layers (prefill only)."""

    def forward(*args: Any, **kwargs: Any) -> BaseModelOutputWithPast:
        return _ideal_forward(text_model, segments, mrope, *args, **kwargs)

    text_model.forward = forward
    try:
        yield
    finally:
        del text_model.forward


def _ideal_forward(text_model: nn.Module, segments: Segments, mrope: bool, input_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                   **kwargs: Any) -> BaseModelOutputWithPast:
    if any(kwargs.get(name) is not None for name in ("deepstack_visual_embeds", "visual_pos_masks")):
        raise IdealUnavailable("the ideal forward does not add Qwen3-VL DeepStack features; no ideal time for qwen3_vl")
    if isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all()):
        raise IdealUnavailable("the ideal forward runs unpadded batches only (a causal mask and nothing else)")
    cache = cache_in(kwargs)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("the ideal forward times a prefill; it was called with a filled cache (a decode step)")
    hidden = inputs_embeds if inputs_embeds is not None else text_model.embed_tokens(input_ids)
    batch, length = hidden.shape[:2]
    if position_ids is None:
        position_ids = torch.arange(length, device=hidden.device)[None].expand(batch, -1)
    if mrope and position_ids.dim() == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    text_positions = position_ids if not mrope else None
    if mrope and position_ids.shape[0] == 4:  # text positions first, as the stock Qwen-VL text models read them
        text_positions, position_ids = position_ids[0], position_ids[1:]
    cos, sin = text_model.rotary_emb(hidden, position_ids)
    cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
    full_cos, full_sin, full_positions = cos, sin, text_positions
    cuts = dict(zip(segments.starts, zip(segments.rows, segments.relative, strict=True), strict=True))
    layer_kwargs = {"use_cache": use_cache, **({"cache": cache} if cache is not None else {})}
    for index, layer in enumerate(text_model.layers):
        if index in cuts:
            rows, relative = cuts[index]
            hidden = gather_rows(hidden, relative)
            cos, sin = gather_rows(full_cos, rows), gather_rows(full_sin, rows)
            if full_positions is not None:
                text_positions = full_positions.expand(batch, -1).gather(1, rows)
        hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=text_positions,
                       **layer_kwargs)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    hidden = text_model.norm(hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{_CACHE_FIELD: cache})
