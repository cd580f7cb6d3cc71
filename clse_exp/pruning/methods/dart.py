"""DART (Wen et al., 2025): keep pivots plus the tokens least similar to them (duplication-aware).

Official code (ZichenWen1/DART, read at xqy1111111/DART@5a19452, the author's last commit;
llava/model/language_model/modeling_llama_self.py:397-449): before layer K=2, pivots are the 4 visual and
the 4 post-image text tokens with the largest L1 norm of layer K-1's post-RoPE keys (heads concatenated);
each pivot, visited in Python `set` order of their sequence indices, takes the M // 8 remaining visual
tokens with the LOWEST cosine similarity to it in the final-norm feature space, so it keeps
4 + 8 * (M // 8) tokens (M = 128 keeps 132). The Qwen2-VL port counts int(N * (1 - r) / 8) per pivot.
`uniform` visits pivots in norm-rank order and meets the budget exactly.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import (
    BatchSelection,
    Layers,
    MethodOptions,
    ModelFacts,
    PruningMethod,
    Selection,
    pack,
)
from clse_exp.pruning.schedule import plan_stages
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import positions_of


class DART(PruningMethod):
    name = "dart"
    has_official_counts = True

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "dart"
        visual_pivots: int = 4
        text_pivots: int = 4

    def validate(self) -> None:
        if self.options.visual_pivots < 1 or self.options.text_pivots < 0:
            raise ConfigError(
                f"prune.visual_pivots={self.options.visual_pivots} / prune.text_pivots={self.options.text_pivots}: "
                "need visual_pivots >= 1 and text_pivots >= 0"
            )

    def default_layers(self, facts: ModelFacts) -> Layers:
        return Layers(0, (2,) if facts.num_layers > 2 else (1,))

    def official_counts(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> list[int]:
        """4 + 8 * (M // 8) kept tokens: M is the budget (final: keep * N; average: the planner's count)."""
        _, per_pivot = self._official_terms(n_visual, keep, budget, layers, facts)
        return [min(n_visual, self.options.visual_pivots + self._pivots * per_pivot)]

    def count_departure(self, n_visual: int, keep: float, budget: str, layers: Layers, facts: ModelFacts,
                        counts: list[int | None]) -> str | None:
        """The two ways the official formula degenerates: a budget below one token per pivot (only the visual
        pivots are kept), or more pivots and picks than the image has tokens (the cut shrinks or vanishes)."""
        target, per_pivot = self._official_terms(n_visual, keep, budget, layers, facts)
        asked, kept = max(1, round(target)), counts[0]
        if kept == asked:
            return None
        formula = self.options.visual_pivots + self._pivots * per_pivot
        if formula > n_visual:
            return (f"its official count {self.options.visual_pivots} + {self._pivots} * {per_pivot} = {formula} "
                    f"exceeds an image's {n_visual} visual tokens, so it keeps {kept} where keep asks for {asked}")
        if per_pivot == 0:
            return (f"a budget of {asked} tokens is less than one per pivot ({self._pivots} pivots: "
                    f"visual_pivots + text_pivots), so its official rule keeps only the {kept} visual pivots")
        return None

    def _official_terms(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> tuple[float, int]:
        """(the budget M, tokens per pivot) of the official rule (LLaVA: round(M) // P; Qwen2-VL: int(M / P))."""
        if budget == "final":
            target = keep * n_visual
        else:
            target = plan_stages(n_visual, facts.num_layers, layers.prune_layers, keep, budget)[0].count
        return target, int(target / self._pivots) if facts.mrope else round(target) // self._pivots

    @property
    def _pivots(self) -> int:
        return self.options.visual_pivots + self.options.text_pivots

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        after = self._text_after_counts(ctx)[b]
        if ctx.protocol == "official":
            visual_pivots, text_pivots = self._pivots_of(ctx, b, after, official=True)
            seqs = ctx.sequence_index(b, torch.cat([ctx.visual_positions(b)[visual_pivots], text_pivots])).tolist()
            return self._official(ctx, b, k, visual_pivots, text_pivots, seqs)
        return self._exact(ctx, b, k, after)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Per sample as `select`, with every count known on the host; under `official` the pivots' sequence
        indices (whose CPython set order the official loop follows) are read for the whole batch at once."""
        afters = self._text_after_counts(ctx)
        if ctx.protocol != "official":
            return pack([None if k is None else Selection(self._exact(ctx, b, k, afters[b]).sort().values)
                         for b, k in enumerate(budgets)], ctx)
        pivots = {b: self._pivots_of(ctx, b, afters[b], official=True) for b, k in enumerate(budgets) if k is not None}
        rows = [ctx.sequence_index(b, torch.cat([ctx.visual_positions(b)[v], t])) for b, (v, t) in pivots.items()]
        width = max((len(row) for row in rows), default=0)
        stacked = torch.stack([F.pad(row, (0, width - len(row))) for row in rows]) if rows else None
        host = [] if stacked is None else stacked.tolist()  # the one read: the set order is the host's
        seqs = {b: row[: len(v) + len(t)] for (b, (v, t)), row in zip(pivots.items(), host, strict=True)}
        return pack([None if k is None else Selection(self._official(ctx, b, k, *pivots[b], seqs[b]))
                     for b, k in enumerate(budgets)], ctx)

    def _text_after_counts(self, ctx: StageContext) -> list[int]:
        """Per sample, the real text tokens after its last current visual token. Known on the host while no
        visual token was cut (the last grid token stands; text is never cut): the tokens after it up to the
        prompt's end. Otherwise (an earlier cut) read from the device, once for the batch."""
        batch = len(ctx.n_current)
        if ctx.segment_spans and ctx.first_slot and ctx.n_current == ctx.n_visual:
            return [ctx.first_slot[b] + ctx.n_visual[b] + ctx.n_text[b] - 1 - ctx.segment_spans[b][-1][1]
                    if ctx.segment_spans[b] else ctx.n_text[b] for b in range(batch)]
        last = ctx.visual_slots.masked_fill(~ctx.visual_valid, -1).max(1, keepdim=True).values
        after = torch.arange(ctx.slots.idx.shape[1], device=last.device)[None] > last
        return (ctx.slots.valid & ~ctx.is_visual & after).sum(1).tolist()

    def _pivots_of(self, ctx: StageContext, b: int, after: int, official: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual pivot positions into the visual tokens, text pivot slot positions), by key L1 norm; `after`:
        how many of the sample's text tokens follow its last visual token (known on the host)."""
        visual = ctx.visual_positions(b)
        text_after = ctx.text_positions(b)[ctx.n_text[b] - after :]
        keys = ctx.keys(b, torch.cat([visual, text_after]))
        if official:  # the official keys are taken after the GQA head repeat: every kv head counted H/H_kv times
            attn = ctx.layers[ctx.layer - 1].self_attn
            keys = keys.view(len(keys), -1, attn.head_dim).repeat_interleave(attn.num_key_value_groups, dim=1)
            norms = keys.flatten(1).norm(p=1, dim=-1)
        else:
            norms = keys.float().abs().sum(-1)
        visual_pivots = norms[: len(visual)].topk(min(self.options.visual_pivots, len(visual))).indices
        text_pivots = text_after[:0]
        if len(text_after) and self.options.text_pivots:
            text_pivots = text_after[norms[len(visual):].topk(min(self.options.text_pivots, len(text_after))).indices]
        return visual_pivots, text_pivots

    def _official(self, ctx: StageContext, b: int, k: int, visual_pivots: torch.Tensor, text_pivots: torch.Tensor,
                  pivot_seq: list[int]) -> torch.Tensor:
        """The official loop: each pivot, in CPython's set order of the pivots' sequence indices (`pivot_seq`,
        read on the host), takes the per_pivot remaining visual tokens least similar to it. Candidates are a
        device mask and their count is tracked on the host, so nothing else is read back."""
        visual = ctx.visual_positions(b)
        n = len(visual)
        per_pivot = max(0, (k - len(visual_pivots)) // self._pivots)
        pivot_slots = torch.cat([visual[visual_pivots], text_pivots])
        features = ctx.normed_hidden(b, torch.cat([visual, pivot_slots]))
        visual_features, pivot_features = features[:n], features[n:]
        row_of = {seq: i for i, seq in enumerate(pivot_seq)}
        chosen = torch.zeros(n, dtype=torch.bool, device=visual.device).index_fill_(0, visual_pivots, True)
        candidates, count = ~chosen, n - len(visual_pivots)
        for pivot in list(set(pivot_seq)):  # CPython's set order, as the official loop iterates it
            if count == 0 or per_pivot == 0:
                break
            take = min(per_pivot, count)
            cos = -F.cosine_similarity(pivot_features[row_of[pivot]][None], visual_features, dim=-1)
            picks = cos.masked_fill(~candidates, float("-inf")).topk(take).indices
            chosen.index_fill_(0, picks, True)
            candidates.index_fill_(0, picks, False)
            count -= take
        return positions_of(chosen[None], n - count)[0]

    def _exact(self, ctx: StageContext, b: int, k: int, after: int) -> torch.Tensor:
        visual = ctx.visual_positions(b)
        visual_pivots, text_pivots = self._pivots_of(ctx, b, after, official=False)
        visual_pivots = visual_pivots[:k]
        features = F.normalize(ctx.normed_hidden(b).float(), dim=-1)
        pivot_features = torch.cat([features[visual_pivots],
                                    F.normalize(ctx.normed_hidden(b, text_pivots).float(), dim=-1)])
        available = torch.ones(len(visual), dtype=torch.bool, device=visual.device)
        available[visual_pivots] = False
        count = len(visual) - len(visual_pivots)  # available tokens, tracked on the host
        chosen = [visual_pivots]
        remaining = k - len(visual_pivots)
        per_pivot = math.ceil(remaining / len(pivot_features)) if remaining > 0 else 0
        for pivot in pivot_features:
            take = min(per_pivot, remaining, count)
            if take <= 0:
                break
            similarity = (features @ pivot).masked_fill(~available, float("inf"))
            picks = similarity.topk(take, largest=False).indices
            available[picks] = False
            chosen.append(picks)
            remaining -= take
            count -= take
        return torch.cat(chosen)
