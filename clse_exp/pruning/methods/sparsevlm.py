"""SparseVLM v1.5 (Zhang et al., ICML 2025): text raters chosen from the prompt rank the visual tokens by their
attention in three decoder layers; the best-scored pruned tokens are recycled into DPC-kNN cluster means.

Official code (Gumpest/SparseVLMs, branch v1.5 @734d900, llava/model/language_model/), the rules reproduced
under `protocol=official`:
- Raters, once per prefill from the LLM input embeddings (modelling_sparse_llama.py:193-204): V = the visual
  tokens, T = every token after the image; m = softmax over T of V Tᵀ, averaged over V; raters are the T
  tokens with m above its mean. Here T is every text token after the first visual token (several images
  form one visual span); if no token beats the mean, all of T rate.
- Stages (modelling_sparse_llama.py:69, 223, 250-323): layers 2, 6 and 15 of 32 run on every current token
  and their OUTPUT is cut, i.e. cuts before layers 3, 7 and 16 scored with the attention of the layer
  before the cut, recomputed from its input at the current positions. Other depths scale the cut layers.
- Score (score.py:17-32, modelling_sparse_llama.py:564-578): causal softmax over all keys, mean over heads,
  rater rows, visual columns, mean over raters. Keep topk(min(n_l, v - 1)) (score.py:33-36), v = current
  visual count, merged tokens included.
- Counts (score.py:5-15): `keep * 576` is the official budget (its "equivalent tokens": the visual count
  after each layer's cut, averaged over the layers, merged tokens included); budgets 192/128/64 on a
  576-token image use the tables [300, 200, 110] / [303, 110, 36] / [66, 30, 17]. Other budgets and image
  sizes take the tables as fractions of 576, linear in `keep` between the three budgets and the keep-all
  point (1, 1, 1), proportional below 64; counts round(n * fraction).
- Recycling (modelling_sparse_llama.py:281-313, utils.py:247-311): of the m pruned tokens, the
  int(0.3 m) + 1 best-scored (in descending score order) are clustered by DPC-kNN into int(m2 / 10) + 1
  clusters (distance L2 / sqrt(C) on the stage layer's OUTPUT, k = cluster count, density noise 1e-6;
  centres = top density x distance-to-denser; nearest centre; mean with 1e-6 in the denominator). The
  cluster means follow the kept tokens, in centre order; each occupies its centre token's slot (the trace
  lists the centre). The density noise draws from `ctx.generator` (official: the global RNG, fp16; here
  float32), so a sample draws the same in any batch. Equal scores (e.g. the one centre of a few recycled
  tokens, whose densities are all 1 + noise) go to the lower position, which no padding changes.
- Positions (modelling_sparse_llama.py:308, 317, 553-554): renumbered contiguously after every cut; at
  decode each layer continues from its own cache length; every layer caches what it ran on (ragged).
  M-RoPE families keep their original (3-D) positions; a cluster mean takes its centre's.
Video (branch video @f05b898, Video-LLaVA; cited SVvid): one stage that cuts layer 1's output
(videollava/model/language_model/modeling_sparse_llama.py:69,197-236) and keeps as many tokens as the RANK of
the rater x visual block of that layer's head-mean attention, top by the raters' mean, or all when the rank is
not below the visual count (score.py:5-22); then the same recycling (modeling_sparse_llama.py:240-275).
`count_rule=rank` runs it (default layers: that one cut, scaled by depth); `keep` then sets no count. As
committed, that branch calls attn_postprocess_rank with 5 of its 6 arguments, so it needs that fix to run.
`protocol=uniform`: the same raters, scores and recycling, but each stage's count (kept + merged) is the
planner's exact count, positions stay original (a merged token at its centre's), and scores are averaged in
float32. `recycle=false` drops recycling (plain top-k, as v2.0 does).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref

import torch
import torch.nn.functional as F

from clse_exp.efficiency.counts import host_side, upload
from clse_exp.errors import ConfigError, choose_one
from clse_exp.pruning.attention import query_attention
from clse_exp.pruning.methods.base import (
    BatchSelection,
    Layers,
    MethodOptions,
    ModelFacts,
    PruningMethod,
    Rules,
)
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import gather_rows, positions_of

OFFICIAL_DEPTH = 32
OFFICIAL_CUTS = (3, 7, 16)  # the official stages cut the outputs of layers 2, 6 and 15
TABLE_TOKENS = 576
TABLES = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
RECYCLED_FRACTION = 0.3
TOKENS_PER_CLUSTER = 10
DENSITY_NOISE = 1e-6
MERGE_EPS = 1e-6
COUNT_RULES = ("table", "rank")
OFFICIAL_VIDEO_CUT = 2  # the video branch scores layer 1 and cuts its output (SVvid modeling_sparse_llama.py:69)
log = logging.getLogger(__name__)


@functools.cache
def announce_rank_rule() -> None:
    """Say once per process that the rank rule replaces the budget."""
    log.warning("prune.count_rule=rank: each sample keeps as many tokens as the rank of its rater x visual "
                "attention (SparseVLM's video branch), plus recycled clusters; keep sets no count (it only "
                "switches pruning on), and the records give each sample's retention")


def recycled_count(pruned: int) -> int:
    """Pruned tokens kept for merging: the official int(0.3 m) + 1 (float product, truncated)."""
    return int(pruned * RECYCLED_FRACTION) + 1


def cluster_count(recycled: int) -> int:
    """Clusters the recycled tokens form: the official int(m2 / 10) + 1."""
    return int(recycled / TOKENS_PER_CLUSTER) + 1


def table_fractions(keep: float) -> tuple[float, float, float]:
    """Per-stage counts as fractions of the visual count: the official tables at budgets 192/128/64 of 576,
    linear in `keep` between them and (1, 1, 1) at keep = 1, proportional to the 64 row below it."""
    anchors = [(budget / TABLE_TOKENS, tuple(c / TABLE_TOKENS for c in row)) for budget, row in sorted(TABLES.items())]
    anchors.append((1.0, (1.0, 1.0, 1.0)))
    low_keep, low_row = anchors[0]
    if keep <= low_keep:
        return tuple(f * keep / low_keep for f in low_row)
    for (a, row_a), (b, row_b) in zip(anchors, anchors[1:], strict=False):
        if keep <= b:
            t = (keep - a) / (b - a)
            return tuple(x + t * (y - x) for x, y in zip(row_a, row_b, strict=True))
    return anchors[-1][1]


def best(values: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] indices of each row's `count` largest values, ties to the lower index: a top-k whose picks do
    not depend on how far a row is padded, so a sample picks alike alone and in a batch."""
    return values.sort(dim=-1, descending=True, stable=True).indices[:, :count]


def dpc_knn_merge(x: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of x [m, C] into `clusters` means (float32): (means [clusters, C] in centre order,
    centres [clusters] as indices into x); one sample of `dpc_knn_merge_batch`."""
    count = torch.full((1,), x.shape[0], device=x.device)
    means, centres = dpc_knn_merge_batch(x[None], count, torch.full_like(count, clusters), clusters, noise[None])
    return means[0], centres[0]


def dpc_knn_merge_batch(x: torch.Tensor, tokens: torch.Tensor, clusters: torch.Tensor, width: int,
                        noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of every sample at once (float32). x [B, M, C] holds tokens[b] rows per sample (the
    rest is filler), `clusters` [B] the sample's cluster count (at most `width`, known on the host), noise
    [B, M] the density noise. Returns (means [B, width, C] in centre order, centres [B, width] as indices into
    x); entries past a sample's cluster count are filler. Density exp(-mean squared distance to the k =
    cluster count nearest, self included) plus the noise; a centre maximises density x distance to the
    nearest denser token."""
    x = x.float()
    real = torch.arange(x.shape[1], device=x.device)[None] < tokens[:, None]  # [B, M]
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[2] ** 0.5
    nearest = distance.masked_fill(~real[:, None], float("inf")).topk(width, dim=-1, largest=False).values
    taken = torch.arange(width, device=x.device)[None] < clusters[:, None]  # [B, width]
    spread = torch.where(taken[:, None], nearest**2, 0).sum(-1) / clusters[:, None]
    density = (-spread).exp() + noise
    denser = (density[:, None, :] > density[:, :, None]) & real[:, None]  # [b, i, j]: token j is denser than i
    pairs = real[:, :, None] & real[:, None]
    farthest = distance.masked_fill(~pairs, float("-inf")).flatten(1).amax(1)
    to_denser = torch.where(denser, distance, farthest[:, None, None]).amin(-1)
    centres = best((to_denser * density).masked_fill(~real, float("-inf")), width)
    to_centres = distance.gather(1, centres[..., None].expand(-1, -1, x.shape[1]))  # [B, width, M]
    assign = to_centres.masked_fill(~taken[..., None], float("inf")).argmin(1)
    assign = torch.cat([assign, assign.new_zeros(len(assign), 1)], dim=1)  # a spare column for filler centres
    own = torch.where(taken, centres, x.shape[1])
    assign = assign.scatter_(1, own, torch.arange(width, device=x.device).expand_as(own))[:, :-1]
    cluster = torch.arange(width, device=x.device)[None, :, None]
    members = ((assign[:, None] == cluster) & real[:, None]).to(x.dtype)  # [B, width, M]
    weight = 1.0 / (members.sum(2) + MERGE_EPS)
    return members @ (x * weight.gather(1, assign)[..., None]), centres


def find_raters(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's text raters, chosen from the LLM input embeddings (layer 0's captured input) of ALL its
    original visual tokens: ([B, R] their ORIGINAL indices first, in order, then filler; [B] their count).
    Candidates are the text tokens after the first visual token, outside the visual spans (a video frame's CLS
    token is not text); all text rates when there is none. Nothing is read back: the spans are uploaded, once,
    only when some span holds text."""
    first = ctx.captures[0]
    index, real = first.slots.idx, first.slots.valid
    batch, length = index.shape[0], first.slots.length or index.shape[1]
    # text is never cut, so layer 0's text tokens are the current ones, and its visual tokens all the others
    text_now = torch.where(ctx.slots.valid & ~ctx.is_visual, ctx.slots.idx, length)
    is_text = torch.zeros(batch, length + 1, dtype=torch.bool, device=index.device).scatter_(1, text_now, True)
    text = real & is_text[:, :-1].gather(1, index)
    visual = real & ~text
    start = torch.where(visual, index, length).amin(1, keepdim=True)
    candidate = text & (index > start)
    spans = ctx.segment_spans if ctx.segment_spans and all(ctx.segment_spans) else None
    if spans is not None and any(sum(last - s + 1 for s, last in spans[b]) > ctx.n_visual[b] for b in range(batch)):
        with host_side():
            inside = torch.zeros(batch, length, dtype=torch.bool)
            for b, sample in enumerate(spans):
                for s, last in sample:
                    inside[b, s : last + 1] = True
        candidate &= ~upload(inside, index.device).gather(1, index)
    some = candidate.any(1, keepdim=True)
    candidate = torch.where(some, candidate, text)
    # widths from the host: the candidates after the first span, less the text inside the spans (else all text)
    if spans is None or not ctx.first_slot:
        width = max(ctx.n_text)
    else:
        counts = [ctx.n_text[b] - (sum(last - s + 1 for s, last in spans[b]) - ctx.n_visual[b])
                  - (spans[b][0][0] - ctx.first_slot[b]) for b in range(batch)]
        width = max(c if c > 0 else t for c, t in zip(counts, ctx.n_text, strict=True))
    slots = positions_of(candidate, width)
    count = candidate.sum(1, keepdim=True)
    present = visual.sum(1, keepdim=True)
    usable = torch.arange(width, device=index.device)[None] < count
    seen = gather_rows(first.hidden, positions_of(visual, max(ctx.n_visual)))
    logits = seen @ gather_rows(first.hidden, slots).transpose(1, 2)  # [B, visual, candidates]
    relevance = logits.masked_fill(~usable[:, None], float("-inf")).softmax(-1)
    rows = torch.arange(seen.shape[1], device=index.device)[None, :, None] < present[..., None]
    relevance = torch.where(rows, relevance, 0).sum(1) / present
    above = usable & (relevance > torch.where(usable, relevance, 0).sum(1, keepdim=True) / count)
    chosen = torch.where(some & above.any(1, keepdim=True), above, usable)  # none above the mean: all rate
    origin = index.gather(1, slots.gather(1, positions_of(chosen, width)))
    return origin, chosen.sum(1)


def split_exact(total: int, visual: int) -> tuple[int, int]:
    """(kept, clusters) whose sum is exactly `total` under the recycling rule (most kept first); when even
    keeping none would form more clusters than `total`, keep none and form `total` clusters."""
    for kept in range(total - 1, -1, -1):
        clusters = cluster_count(recycled_count(visual - kept))
        if kept + clusters <= total:  # kept + clusters grows by 0 or 1 per kept token, so this is equality
            return kept, total - kept
    return 0, total


class SparseVLM(PruningMethod):
    name = "sparsevlm"
    has_official_counts = True

    @dataclasses.dataclass
    class Options(MethodOptions):
        name: str = "sparsevlm"
        recycle: bool = True  # merge the best-scored pruned tokens into cluster means (v1.5); false: top-k only
        count_rule: str = "table"  # table: v1.5's per-stage counts; rank: the video branch's data-driven count

    # ------------------------------------------------------------------------------ knowledge
    def validate(self) -> None:
        choose_one("prune.count_rule", self.options.count_rule, COUNT_RULES)
        if self.options.count_rule == "rank":
            announce_rank_rule()

    def default_layers(self, facts: ModelFacts) -> Layers:
        """Cuts before layers 3, 7, 16 of 32 (rank rule: before layer 2); other depths at the same fractions
        (at least layer 1)."""
        depth = facts.num_layers
        official = (OFFICIAL_VIDEO_CUT,) if self.options.count_rule == "rank" else OFFICIAL_CUTS
        cuts = sorted({min(depth - 1, max(1, round(c * depth / OFFICIAL_DEPTH))) for c in official})
        return Layers(0, tuple(cuts))

    def default_shape(self, n_stages: int) -> list[float] | None:
        return [c / TABLES[192][0] for c in TABLES[192]] if n_stages == 3 else None

    def _tables_apply(self, layers: Layers, facts: ModelFacts) -> bool:
        return len(layers.prune_layers) == 3 and layers.prune_layers == self.default_layers(facts).prune_layers

    def check_budget(self, keep: float, budget: str, layers: Layers, facts: ModelFacts, official: bool) -> None:
        if layers.prune_layers[0] < 1:
            raise ConfigError(f"prune=sparsevlm scores with the attention of the layer before each cut; "
                              f"layers.prune_layers={list(layers.prune_layers)} must start at 1 or later")
        if official and budget == "final" and self._tables_apply(layers, facts):
            raise ConfigError("prune=sparsevlm under protocol=official (or schedule=paper) reads keep as the "
                              "official equivalent-token budget (keep * 576 = 192/128/64); budget=final needs "
                              "protocol=uniform")

    def official_counts(self, n_visual: int, keep: float, budget: str, layers: Layers,
                        facts: ModelFacts) -> list[int] | None:
        """Per stage, the official top-k count min(n_l, v - 1) (recycling adds its clusters on top)."""
        if self.options.count_rule == "rank" or not self._tables_apply(layers, facts):
            return None
        table = TABLES.get(round(keep * TABLE_TOKENS))
        if n_visual == TABLE_TOKENS and table is not None:
            targets = list(table)
        else:
            targets = [max(1, round(n_visual * f)) for f in table_fractions(keep)]
        counts, current = [], n_visual
        for target in targets:
            kept = max(1, min(target, current - 1))
            counts.append(kept)
            if self.options.recycle and kept < current:
                current = kept + cluster_count(recycled_count(current - kept))
            else:
                current = kept
        return counts

    def keep_ignored(self, official: bool) -> str | None:
        if self.options.count_rule != "rank":
            return None
        return ("prune.count_rule=rank keeps as many tokens as the rank of each sample's rater x visual attention "
                "(plus recycled clusters), which no keep or budget sets")

    def rules(self, protocol: str, facts: ModelFacts) -> Rules:
        if protocol == "official" and not facts.mrope:
            return Rules(prefill="compact", decode="cache_length")
        return Rules()

    def capture_layers(self, layers: Layers) -> set[int]:
        return super().capture_layers(layers) | {0}

    # ------------------------------------------------------------------------------ selection

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """Every sample at once: the raters' attention, the top-k, the recycled tokens and their DPC-kNN clusters
        as padded tensors. The host reads the device only for the rank rule's counts (one read per stage) and
        uploads once per stage the counts it planned (kept, clusters, recycled) with the density noise, drawn
        from each sample's own generator."""
        n = ctx.n_current
        valid = ctx.visual_valid
        present = valid.sum(1)
        relation, raters = self._relation(ctx, valid)
        scores = relation.sum(1) / raters[:, None]  # the raters' mean
        asked = [n_b if k is None else k for k, n_b in zip(budgets, n, strict=True)]
        ranks = None
        if self.options.count_rule == "rank" and any(k is not None for k in budgets):  # SVvid score.py:11-13
            tolerance = torch.maximum(raters, present) * torch.finfo(torch.float32).eps  # matrix_rank's default
            ranks = torch.linalg.matrix_rank(relation, rtol=tolerance)
            asked = [n_b if k is None else rank for k, n_b, rank in zip(budgets, n, ranks.tolist(), strict=True)]
        plans = [None if k is None else self._plan(ctx, n_b, a) for k, n_b, a in zip(budgets, n, asked, strict=True)]
        kept = [min(a, n_b) if plan is None else plan[0] for a, n_b, plan in zip(asked, n, plans, strict=True)]
        clusters = [0 if plan is None else plan[1] for plan in plans]
        if any(plans):
            recycled = [0 if plan is None else plan[2] for plan in plans]
            kept_now, clusters_now, recycled_now, noise = self._upload_plan(ctx, kept, clusters, recycled)
        elif ranks is not None:  # a sample that is cut keeps min(rank, n) tokens, the others all of theirs
            kept_now = torch.where(ctx.keep_counts < present, torch.minimum(ranks, present), present)
        else:
            kept_now = ctx.keep_counts
        width = valid.shape[1]
        chosen = self._top(scores, valid, kept_now, max(kept, default=0), width)
        counts = [k + c for k, c in zip(kept, clusters, strict=True)]
        if not any(plans):
            return BatchSelection(chosen, counts, width, None, [0] * len(n))
        features = gather_rows(ctx.hidden, ctx.visual_slots)  # [B, N, C] the stage layer's output
        extra = max(clusters)
        spare = max(kept, default=0) + extra  # a column past every real entry, for the filler's writes
        at = torch.arange(extra, device=valid.device)
        at = torch.where(at[None] < clusters_now[:, None], kept_now[:, None] + at, spare)
        order = F.pad(chosen, (0, extra + 1), value=width)
        rows = F.pad(gather_rows(features, chosen.clamp(max=width - 1)), (0, 0, 0, extra + 1))
        pruned = max(n_b - k for n_b, k, plan in zip(n, kept, plans, strict=True) if plan is not None)
        recycled = self._recycled(scores, valid, present, chosen, kept_now, pruned, max(recycled))
        means, centres = dpc_knn_merge_batch(gather_rows(features, recycled), recycled_now, clusters_now, extra, noise)
        order.scatter_(1, at, recycled.gather(1, centres))
        rows.scatter_(1, at[..., None].expand(-1, -1, rows.shape[2]), means.to(rows.dtype))
        top = max(counts)
        return BatchSelection(order[:, :top], counts, width, rows[:, :top], [0] * len(n))

    def _top(self, scores: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor, most: int, width: int
             ) -> torch.Tensor:
        """[B, most] each sample's kept[b] best-scored tokens in ascending position, then the filler `width`
        (scores are attention, finite, so a sample that keeps all of its tokens ranks them above the filler)."""
        picks = best(scores.masked_fill(~valid, float("-inf")), most)
        return torch.where(torch.arange(most, device=picks.device)[None] < kept[:, None], picks, width).sort(1).values

    def _recycled(self, scores: torch.Tensor, valid: torch.Tensor, present: torch.Tensor, chosen: torch.Tensor,
                  kept: torch.Tensor, pruned: int, most: int) -> torch.Tensor:
        """[B, most] the best-scored pruned tokens in descending score order (official: the pruned tokens in
        ascending position, then their top-k), `pruned` the largest pruned count of a sample that recycles."""
        is_kept = torch.zeros(valid.shape[0], valid.shape[1] + 1, dtype=torch.bool, device=valid.device)
        is_kept = is_kept.scatter_(1, chosen, True)[:, :-1]
        positions = positions_of(valid & ~is_kept, pruned)
        real = torch.arange(pruned, device=valid.device)[None] < (present - kept)[:, None]
        ranked = scores.gather(1, positions).masked_fill(~real, float("-inf"))
        return positions.gather(1, best(ranked, most))

    def _upload_plan(self, ctx: StageContext, kept: list[int], clusters: list[int], recycled: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The host's per-sample counts (kept by score, clusters, recycled tokens) and each recycling sample's
        density noise (the official global RNG draw, from its own generator) on the device, in one upload:
        ([B] kept, [B] clusters, [B] recycled, [B, max recycled] noise)."""
        with host_side():
            table = torch.zeros(len(kept), 3 + max(recycled))
            table[:, :3] = torch.tensor([kept, clusters, recycled], dtype=torch.float32).T  # exact below 2**24
            for b, m in enumerate(recycled):
                if m:
                    table[b, 3 : 3 + m] = torch.rand(m, generator=ctx.generator(b)) * DENSITY_NOISE
        table = upload(table, ctx.hidden.device)
        counts = table[:, :3].long()
        return counts[:, 0], counts[:, 1], counts[:, 2], table[:, 3:]

    def _relation(self, ctx: StageContext, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R, N] the raters' head-mean attention over the current visual tokens in the layer before the cut,
        zero outside a sample's raters and visual tokens; [B] each sample's rater count)."""
        origin, raters = self._raters(ctx)
        layer = ctx.layer - 1
        capture = ctx.captures[layer]
        last = capture.slots.idx.shape[1] - 1  # where the filler queries go: their rows are zeroed below
        real = torch.arange(origin.shape[1], device=origin.device)[None] < raters[:, None]
        queries = torch.where(real, capture.slots.lookup_all(origin), last)
        visual = ctx.visual_slots
        if capture.slots is not ctx.slots:
            visual = capture.slots.lookup_all(ctx.slots.idx.gather(1, visual)).clamp(min=0)
        attention = query_attention(ctx.layers[layer], capture.hidden, capture.cos, capture.sin, capture.slots.valid,
                                    queries, ctx.attention_dtype)
        relation = attention.gather(2, visual[:, None].expand(-1, origin.shape[1], -1))
        return torch.where(real[..., None] & valid[:, None], relation, 0), raters

    def _raters(self, ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R] ORIGINAL indices of each sample's raters first, then filler; [B] their count). They depend on
        layer 0's input only: the first stage of a prefill finds them, later ones reuse them (text is never
        cut)."""
        first = ctx.captures[0]
        cache = getattr(self, "_rater_cache", None)
        if cache is None or cache[0]() is not first:
            self._rater_cache = (weakref.ref(first), *find_raters(ctx))
        return self._rater_cache[1], self._rater_cache[2]

    def _plan(self, ctx: StageContext, n: int, k: int) -> tuple[int, int, int] | None:
        """(kept by score, clusters, recycled tokens) of a sample with n current tokens asked for k (the rank
        under the rank rule), all on the host; None when nothing is recycled."""
        rank_rule = self.options.count_rule == "rank"
        if (rank_rule and k >= n) or not self.options.recycle:
            return None
        kept, clusters = (k, None) if ctx.protocol == "official" or rank_rule else split_exact(k, n)
        recycled = recycled_count(n - kept)
        return kept, cluster_count(recycled) if clusters is None else clusters, recycled
