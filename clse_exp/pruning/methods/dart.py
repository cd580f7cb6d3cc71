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

import torch
import torch.nn.functional as F

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import BatchSelection, Layers, MethodOptions, ModelFacts, PruningMethod
from clse_exp.pruning.schedule import plan_stages
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import gather_rows


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

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        """The official rule is one cut (before layer K); `uniform` plans several."""
        if official and len(layers.prune_layers) > 1:
            raise ConfigError(f"prune=dart protocol=official cuts once (the official code prunes before one layer K), "
                              f"but layers.prune_layers={list(layers.prune_layers)} has {len(layers.prune_layers)}; "
                              "give one layer, or protocol=uniform for several stages")

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
        """Sample b's kept tokens as a set (row b of the batched choice; nothing is merged)."""
        return super().select(ctx, b, k).order

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Both protocols for the whole batch: key norms, pivot top-k and features at once, then the pivot loop
        once per step, each sample taking its own count (nothing once its pivots are done). A sample's steps
        are its pivots in visit order: `uniform` visual pivots by norm rank, then text pivots; `official` the
        CPython set order of their sequence indices, read on the host once for the batch."""
        official = ctx.protocol == "official"
        valid = ctx.visual_valid
        width = valid.shape[1]
        device = valid.device
        norms = self._key_norms(ctx, official)
        last = ctx.visual_slots.masked_fill(~valid, -1).max(1, keepdim=True).values
        after = ctx.slots.valid & ~ctx.is_visual & (torch.arange(norms.shape[1], device=device)[None] > last)
        afters = self._text_after_counts(ctx, after)
        plans = [None if k is None or k >= n else self._plan(official, n, k, a)
                 for k, n, a in zip(budgets, ctx.n_current, afters, strict=True)]
        n_visual = min(self.options.visual_pivots, width)
        n_text = max(min(self.options.text_pivots, a) for a in afters)
        visual_pivots = norms.gather(1, ctx.visual_slots).masked_fill(~valid, float("-inf")).topk(n_visual).indices
        text_pivots = norms.masked_fill(~after, float("-inf")).topk(n_text).indices  # slot positions
        pivot_slots = torch.cat([ctx.visual_slots.gather(1, visual_pivots), text_pivots], 1)
        normed = ctx.final_norm(ctx.hidden)
        if not official:
            normed = F.normalize(normed.float(), dim=-1)
        features, pivot_features = gather_rows(normed, ctx.visual_slots), gather_rows(normed, pivot_slots)

        cut = [plan for plan in plans if plan is not None]
        steps = max((-(-c // p) for _, _, p, c in cut if p), default=0)
        sizes = [[min(max(c - s * p, 0), p) for _, _, p, c in cut] for s in range(steps)]  # each step's takes
        # a sample with fewer visual pivots than the batch's top-k, or taking fewer than the step's top-k, needs
        # its counts on the device; otherwise every top-k is each cut sample's own and no mask is needed
        ragged = any(plan[0] < n_visual for plan in cut) or any(min(t) < max(t) for t in sizes)
        if ragged:
            visual, texts, per, cap = self._device_plan(official, ctx, valid, after)
            ranks = torch.arange(max([steps, n_visual, *map(max, sizes)]), device=device)
            takes = (cap[:, None] - ranks[:steps] * per[:, None]).clamp(min=0).minimum(per[:, None])  # [B, steps]
            visual_pivots = torch.where(ranks[:n_visual] < visual[:, None], visual_pivots, width)
        if official:
            rows = self._set_order(ctx, pivot_slots, plans, n_visual, steps, pivot_features)
        else:  # each sample's visual pivots (at most k of them) by norm rank, then its text pivots
            rows = pivot_features[:, :steps]
            if ragged:  # move each sample's text pivots up to follow its own visual pivots
                column = torch.arange(n_visual + n_text, device=device)
                rank = torch.where(column < n_visual, column, column - n_visual + visual[:, None])
                real = torch.where(column < n_visual, column < visual[:, None], column - n_visual < texts[:, None])
                rows = gather_rows(pivot_features, rank.masked_fill(~real, len(column)).argsort(1)[:, :steps])
            similarity = features @ rows.transpose(1, 2)  # [B, N, steps]

        closed = F.pad(~valid, (0, 1), value=True)  # the last column takes the picks a sample does not make
        closed.scatter_(1, visual_pivots, True)
        for s, size in enumerate(max(t) for t in sizes):
            if official:  # the lowest cosine similarity to the pivot: the official top-k of its negation
                scores = -F.cosine_similarity(rows[:, s, None], features, dim=-1)
                picks = scores.masked_fill(closed[:, :width], float("-inf")).topk(size).indices
            else:
                scores = similarity[:, :, s].masked_fill(closed[:, :width], float("inf"))
                picks = scores.topk(size, largest=False).indices
            if ragged:  # picks past a sample's own count go to the spare column
                picks = torch.where(ranks[:size] < takes[:, s, None], picks, width)
            closed.scatter_(1, picks, True)

        counts = [n if plan is None else plan[0] + plan[3] for n, plan in zip(ctx.n_current, plans, strict=True)]
        kept = valid & closed[:, :width]
        if len(cut) < len(plans):  # a sample with nothing to cut keeps every token
            kept = valid & (closed[:, :width] | (ctx.keep_counts >= valid.sum(1))[:, None])
        order = torch.where(kept, torch.arange(width, device=device), width).sort(1).values
        return BatchSelection(order[:, : max(counts)], counts, width)

    def _plan(self, official: bool, n: int, k: int, after: int) -> tuple[int, int, int, int]:
        """A cut sample's counts on the host: (visual pivots kept, text pivots, tokens per pivot step, tokens
        all steps take). Official: (k - visual pivots) // pivots per pivot until the candidates run out;
        uniform: at most k visual pivots, the rest of k shared out rounded up, so k is met exactly."""
        visual, texts = min(self.options.visual_pivots, n), min(self.options.text_pivots, after)
        if official:
            per = max(0, (k - visual) // self._pivots)
            return visual, texts, per, min(n - visual, (visual + texts) * per)
        visual = min(visual, k)
        return visual, texts, -(-(k - visual) // max(1, visual + texts)), k - visual

    def _device_plan(self, official: bool, ctx: StageContext, valid: torch.Tensor, after: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_plan` for every sample at once on the device ([B] each), from the counts the device holds
        (`ctx.keep_counts`), so no host count is uploaded; a sample that keeps every token takes nothing."""
        n, k = valid.sum(1), ctx.keep_counts
        visual, texts = n.clamp(max=self.options.visual_pivots), after.sum(1).clamp(max=self.options.text_pivots)
        if official:
            per = ((k - visual) // self._pivots).clamp(min=0) * (k < n)
            return visual, texts, per, (n - visual).minimum((visual + texts) * per)
        visual = visual.minimum(k)
        rest = (k - visual) * (k < n)
        return visual, texts, -(-rest // (visual + texts).clamp(min=1)), rest

    def _set_order(self, ctx: StageContext, pivot_slots: torch.Tensor, plans: list[tuple[int, int, int, int] | None],
                   n_visual: int, steps: int, pivot_features: torch.Tensor) -> torch.Tensor:
        """[B, steps, C]: each cut sample's pivot features in the CPython set order of the pivots' sequence
        indices, as the official loop visits them (filler rows after). The indices are read once for the
        batch; the rows are picked as views and stacked, so the order reaches the device without an upload."""
        index = ctx.slots.idx.gather(1, pivot_slots).tolist()  # the one read: the set order is the host's
        rows = []
        for b, (plan, row) in enumerate(zip(plans, index, strict=True)):
            order = []
            if plan is not None:
                columns = [*range(plan[0]), *range(n_visual, n_visual + plan[1])]
                first = ctx.first_slot[b] if ctx.first_slot else 0
                seqs = [row[c] - first for c in columns]  # indices in the sample's own unpadded prompt
                column_of = dict(zip(seqs, columns, strict=True))
                order = [column_of[seq] for seq in set(seqs)]  # CPython's set order, as the official loop's
            rows += [pivot_features[b, c] for c in (order + [0] * steps)[:steps]]
        return torch.stack(rows).view(len(plans), steps, -1) if rows else pivot_features[:, :0]

    def _text_after_counts(self, ctx: StageContext, after: torch.Tensor) -> list[int]:
        """Per sample, the real text tokens after its last current visual token (`after` marks them). Known on
        the host while no visual token was cut (the last grid token stands; text is never cut): the tokens
        after it up to the prompt's end. Otherwise read from the device, once for the batch."""
        if ctx.segment_spans and ctx.first_slot and ctx.n_current == ctx.n_visual:
            return [ctx.first_slot[b] + ctx.n_visual[b] + ctx.n_text[b] - 1 - ctx.segment_spans[b][-1][1]
                    if ctx.segment_spans[b] else ctx.n_text[b] for b in range(len(ctx.n_current))]
        return after.sum(1).tolist()

    def _key_norms(self, ctx: StageContext, official: bool) -> torch.Tensor:
        """[B, L] L1 norm of layer K-1's post-RoPE keys (heads concatenated) at every current slot. Official:
        after the GQA head repeat (every kv head counted H / H_kv times), in the keys' dtype; uniform: float32,
        each kv head once."""
        keys = ctx.keys_batch()
        if official:
            attn = ctx.layers[ctx.layer - 1].self_attn
            keys = keys.view(*keys.shape[:2], -1, attn.head_dim).repeat_interleave(attn.num_key_value_groups, dim=2)
            norms = keys.flatten(2).norm(p=1, dim=-1)
        else:
            norms = keys.float().abs().sum(-1)
        return norms
