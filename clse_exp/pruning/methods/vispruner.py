"""VisPruner (Zhang et al., ICCV 2025): a few important tokens by CLIP [CLS] attention, then diverse tokens
from the rest by repeatedly dropping near-duplicates, before the projector; nothing is merged.

Official code (Theia-4869/VisPruner@aefa01a, cited VP:<file>:<lines>), LLaVA-1.5:
- Signals: `hidden_states[-2]` and `attentions[-2]` of the CLIP tower (mm_vision_select_layer = -2), i.e. the
  attention of the penultimate layer and that layer's output as features; [CLS] row, patch columns, softmax
  over all keys in the tower's dtype (eager CLIPAttention of transformers 4.37.2), [CLS] dropped from the
  features (VP:llava/model/multimodal_encoder/clip_encoder.py:36-52,64-68).
- Counts: T = visual_token_num per image (`--visual_token_num`); important = int(T * important_ratio)
  (default 0.5, the README's MME example 0.75), diverse = T - important (VP:llava/model/llava_arch.py:148-151;
  llava/eval/model_vqa_loader.py:151-152; README.md:68-76).
- Important: the head MEAN of the [CLS] attention, patches ranked by argsort descending; the first
  `important` are kept and the others, in that ranked order, are the residual list (llava_arch.py:154-157).
- Diverse (llava_arch.py:160-176): features L2-normalised (layer -2's output, the tower's dtype). While the
  residual list holds R > diverse tokens: r = min(8, R - diverse); split the list into its even and odd
  entries (A, B); score each A token by its largest cosine to any B token; drop the r A tokens of highest
  score; the list becomes [surviving A in descending score order, then all of B]. The order matters: the next
  round's A/B split is read from it.
- Output: a mask over the patches (important + final residual), so the kept tokens go through the projector
  in their ORIGINAL order and are fed as a shorter sequence, contiguous positions (llava_arch.py:178-186,272;
  the sequence is rebuilt with arange positions, 370-377). Several images of one prompt each keep T
  (the concatenated images are one batch, 198-212).

Departures (documented, not silent):
- The official code indexes the surviving A entries with a batch index expanded to R // 2 - r columns, one
  fewer than the ceil(R / 2) - r survivors when R is odd: the shapes do not broadcast and it raises an
  IndexError (llava_arch.py:174). R keeps its parity between rounds but the last, so this happens exactly
  when N - important is odd (and exceeds diverse; on a tiny residual, R // 2 - r <= 1, it broadcasts
  instead), e.g. T = 127 or 63 of N = 576 at ratio 0.5; its published budgets (64/128/192 at 0.5, 64 at
  0.75) are even. We take the evident rule there, every surviving A entry, and log it once per process.
- Ties in either argsort resolve to the lower index (stable sort); the official argsort is unstable.
- Budget: a sample keeps k = round(keep * N) tokens split evenly over its images (the earlier images take
  the remainder when it does not divide), i.e. T per image as the official flag sets it.
`uniform` keeps the same rule and exactly k tokens, at their original positions, computed in float32.
Batching: every image of the batch is one row of a stack, selected at once; the de-duplication rounds run for
the longest residual list, and an image that is done keeps its list.
Other families: the official repository also patches LLaVA-NeXT (its any-resolution tiles), which the
engine exposes under no family; they are refused before any weights load.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import BatchSelection, Layers, MethodOptions, ModelFacts, PruningMethod, Rules
from clse_exp.pruning.methods.divprune import pre_llm_rules
from clse_exp.pruning.methods.visionzip import (
    cls_attention_per_head,
    device_ints,
    image_grid,
    require_clip_encoder,
)
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import gather_rows, positions_of

DROP_PER_ROUND = 8  # near-duplicates removed per round at most (VP:llava_arch.py:163)
log = logging.getLogger(__name__)


def important_count(k: int, ratio: float) -> int:
    """Important tokens among an image's k kept ones: int(k * ratio), the official truncation (VP:150)."""
    return int(k * ratio)


@functools.cache
def announce_odd_residual() -> None:
    """Say once per process that a budget reached the case where the official code raises."""
    log.warning("prune=vispruner protocol=official: an odd number of residual tokens, where the official code "
                "(aefa01a) raises an IndexError; every surviving even-position token is kept (its evident rule)")


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, lengths: list[int], counts: list[int]
                      ) -> torch.Tensor:
    """VisPruner's diverse tokens for G images at once: from each row of `residual` [G, R] (patch indices, ranked;
    the first lengths[g] real) keep counts[g], dropping per round up to DROP_PER_ROUND even-position entries
    whose best cosine to an odd-position entry is highest. `unit` [G, n, C] holds the normalised features.
    Rounds run for the longest image; an image that is done keeps its list. Returns [G, R] lists whose first
    counts[g] entries are the kept ones (their order carries no meaning)."""
    rounds = max((-(-(length - count) // DROP_PER_ROUND) for length, count in zip(lengths, counts, strict=True)),
                 default=0)
    if rounds <= 0:
        return residual
    width, device = residual.shape[1], residual.device
    evens_w, odds_w = (width + 1) // 2, width // 2
    # per round r and image: its list length max(L - 8 r, count), the entries it drops (0: done), where its
    # surviving evens end, and which even / odd positions of the list are past its end
    start, count = device_ints(lengths + counts, device).view(2, 1, -1, 1)
    shrunk = torch.arange(0, DROP_PER_ROUND * rounds, DROP_PER_ROUND, device=device)[:, None, None]
    length = torch.maximum(start - shrunk, count)
    drop = (length - count).clamp(min=0, max=DROP_PER_ROUND)
    half = (length + 1) // 2
    active = drop > 0
    split = torch.where(active, half - drop, 0)
    column = torch.arange(width, device=device)
    even_past = column[:evens_w] >= half  # [rounds, G, evens_w]
    odd_past = column[:odds_w] >= length // 2
    from_even = column < split
    # a surviving even entry comes from the ranked evens past the dropped ones; then the odds in order (an image
    # that is done: split 0, and its "odd" source is the identity)
    even_at = (column + drop).clamp(max=max(evens_w - 1, 0))
    source = torch.where(active, 2 * (column - split) + 1, column).clamp(min=0, max=width - 1)
    for r in range(rounds):
        rows = gather_rows(unit, residual)
        similarity = rows[:, 0::2] @ rows[:, 1::2].transpose(1, 2)  # evens x odds
        redundancy = similarity.masked_fill(odd_past[r][:, None], float("-inf")).max(dim=2).values
        ranked = redundancy.masked_fill(even_past[r], float("-inf")).argsort(dim=1, descending=True, stable=True)
        survivors = residual[:, 0::2].gather(1, ranked.gather(1, even_at[r]))
        residual = torch.where(from_even[r], survivors, residual.gather(1, source[r]))
    return residual


class VisPruner(PruningMethod):
    name = "vispruner"

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "vispruner"
        important_ratio: float = 0.5  # share of the kept tokens chosen by [CLS] attention (the rest: diverse)

    def validate(self) -> None:
        ratio = self.options.important_ratio
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"prune.important_ratio={ratio} must lie in [0, 1] (official default 0.5: half "
                              "the kept tokens by [CLS] attention, half diverse)")

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        require_clip_encoder(self.name, facts, layers)

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        return pre_llm_rules(protocol, facts)

    def capture_layers(self, layers: Layers) -> set[int]:
        return set()

    def vision_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """Layer -2's input (its [CLS] attention is recomputed) and layer -1's input (layer -2's output: the
        features LLaVA-1.5 feeds, vision_feature_layer = -2)."""
        return (-2, -1)

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor:
        """Sample b's kept tokens as a set (row b of the batched choice; nothing is merged)."""
        return super().select(ctx, b, k).order

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Every image of the batch at once, each keeping its own split of its sample's budget."""
        official = ctx.protocol == "official"
        grid = image_grid(ctx, budgets, (-2, -1))
        x, features = grid.inputs
        n, device = grid.patches, ctx.hidden.device  # device_map: the tower may sit elsewhere
        dtype = x.dtype if official else torch.float32  # official: the tower's own precision
        score = cls_attention_per_head(ctx.vision_layers[-2], x, dtype)[0].mean(dim=1).to(device)
        ranked = score.argsort(dim=1, descending=True, stable=True)
        important = [important_count(k, self.options.important_ratio) for k in grid.budgets]
        diverse = [k - i for k, i in zip(grid.budgets, important, strict=True)]
        lengths = [n - i if d else 0 for i, d in zip(important, diverse, strict=True)]
        if official and any(r % 2 and r > d for r, d in zip(lengths, diverse, strict=True)):
            announce_odd_residual()
        features = features[:, 1:].to(device, dtype)
        unit = features / features.norm(dim=-1, keepdim=True)
        first, diverse_n = device_ints(important + diverse, device).view(2, -1, 1)
        least, most, widest = min(important), max(important), max(diverse)
        even = len(set(zip(important, diverse, strict=True))) == 1  # every image splits its budget alike
        if even:
            residual = ranked[:, least:]
        else:
            residual = ranked.gather(1, (torch.arange(n - least, device=device) + first).clamp(max=n - 1))
        residual = remove_duplicates(unit, residual, lengths, diverse)
        # each image's kept patches, ranked[:important] then residual[:diverse], marked in its row; an image's
        # rows side by side are its sample's visual tokens
        kept = [ranked[:, :most], residual[:, :widest]]
        if not even:
            column = torch.arange(max(most, widest), device=device)
            kept = [torch.where(column[:most] < first, kept[0], n),
                    torch.where(column[:widest] < diverse_n, kept[1], n)]
        chosen = torch.zeros(len(grid.budgets), n + 1, dtype=torch.bool, device=device)
        chosen = chosen.scatter_(1, torch.cat(kept, dim=1), True)[:, :n].reshape(len(budgets), -1)
        width = ctx.visual_slots.shape[1]
        if any(k is None for k in budgets):
            whole = device_ints([int(k is None) for k in budgets], device).bool()[:, None]
            chosen |= whole & ctx.visual_valid
        counts = [n_b if k is None else k for k, n_b in zip(budgets, ctx.n_current, strict=True)]
        order = positions_of(chosen, max(counts))  # ascending: the kept patches in their own order
        if len(set(counts)) > 1:  # a row with fewer takes the filler
            order = torch.where(chosen.gather(1, order), order, width)
        return BatchSelection(order, counts, width, None, [0] * len(budgets))
