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
from clse_exp.pruning.methods.base import Layers, MethodOptions, ModelFacts, PruningMethod
from clse_exp.pruning.schedule import plan_stages
from clse_exp.pruning.signals import StageContext


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
        if ctx.protocol == "official":
            return self._official(ctx, b, k)
        return self._exact(ctx, b, k)

    def _pivots_of(self, ctx: StageContext, b: int, official: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual pivot positions into the visual tokens, text pivot slot positions), by key L1 norm."""
        visual = ctx.visual_positions(b)
        text_after = ctx.text_positions(b)
        text_after = text_after[text_after > visual.max()]
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

    def _official(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        visual = ctx.visual_positions(b)
        visual_pivots, text_pivots = self._pivots_of(ctx, b, official=True)
        per_pivot = max(0, (k - len(visual_pivots)) // self._pivots)
        features = ctx.normed_hidden(b, torch.arange(ctx.hidden.shape[1], device=visual.device))
        # the official code numbers tokens by their index in its (batch-1, unpadded) prompt
        seq_of_visual = ctx.sequence_index(b, visual).tolist()
        pivot_seq = [seq_of_visual[i] for i in visual_pivots.tolist()] + ctx.sequence_index(b, text_pivots).tolist()
        slot_of_seq = {seq: slot for seq, slot in zip(ctx.sequence_index(b, torch.cat([visual, text_pivots])).tolist(),
                                                      torch.cat([visual, text_pivots]).tolist(), strict=True)}
        chosen = set(pivot_seq)
        candidates = set(seq_of_visual) - {seq_of_visual[i] for i in visual_pivots.tolist()}
        for pivot in list(set(pivot_seq)):  # CPython's set order, as the official loop iterates it
            pool = list(candidates)
            if not pool or per_pivot == 0:
                break
            rows = torch.tensor([slot_of_seq[seq] for seq in pool], device=visual.device)
            cos = -F.cosine_similarity(features[slot_of_seq[pivot]][None], features[rows], dim=-1)
            picks = [pool[i] for i in cos.topk(min(per_pivot, len(pool))).indices.tolist()]
            chosen.update(picks)
            candidates.difference_update(picks)
        chosen.difference_update(ctx.sequence_index(b, text_pivots).tolist())
        position_of = {seq: i for i, seq in enumerate(seq_of_visual)}
        return torch.tensor(sorted(position_of[seq] for seq in chosen), device=visual.device)

    def _exact(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        visual = ctx.visual_positions(b)
        visual_pivots, text_pivots = self._pivots_of(ctx, b, official=False)
        visual_pivots = visual_pivots[:k]
        features = F.normalize(ctx.normed_hidden(b).float(), dim=-1)
        pivot_features = torch.cat([features[visual_pivots],
                                    F.normalize(ctx.normed_hidden(b, text_pivots).float(), dim=-1)])
        available = torch.ones(len(visual), dtype=torch.bool, device=visual.device)
        available[visual_pivots] = False
        chosen = [visual_pivots]
        remaining = k - len(visual_pivots)
        per_pivot = math.ceil(remaining / len(pivot_features)) if remaining > 0 else 0
        for pivot in pivot_features:
            take = min(per_pivot, remaining, int(available.sum()))
            if take <= 0:
                break
            similarity = (features @ pivot).masked_fill(~available, float("inf"))
            picks = similarity.topk(take, largest=False).indices
            available[picks] = False
            chosen.append(picks)
            remaining -= take
        return torch.cat(chosen)
