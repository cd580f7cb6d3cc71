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
  float32), so a sample draws the same in any batch.
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
from clse_exp.pruning.methods.base import (
    BatchSelection,
    Layers,
    MethodOptions,
    ModelFacts,
    PruningMethod,
    Rules,
    Selection,
    pack,
)
from clse_exp.pruning.signals import StageContext
from clse_exp.pruning.slots import positions_of

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


def dpc_knn_merge(x: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of x [m, C] into `clusters` means (float32): (means [clusters, C] in centre order,
    centres [clusters] as indices into x). Density exp(-mean squared distance to the k = `clusters` nearest,
    self included) plus `noise`; a centre maximises density x distance to the nearest denser token."""
    x = x.float()
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[1] ** 0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp() + noise.to(x.device)
    denser = density[None, :] > density[:, None]  # [i, j]: token j is denser than token i
    to_denser = torch.where(denser, distance, distance.max()).min(-1).values
    centres = (to_denser * density).topk(clusters).indices
    assign = distance[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    members = F.one_hot(assign, clusters).T.to(x.dtype)  # [clusters, m]
    weight = 1.0 / (members.sum(1) + MERGE_EPS)
    return members @ (x * weight[assign, None]), centres


def rater_positions(ctx: StageContext, b: int) -> torch.Tensor:
    """Current slot positions of sample b's text raters, chosen from the LLM input embeddings (layer 0's
    captured input) of ALL its original visual tokens, so every stage uses the same raters. Candidates are
    the text tokens after the first visual token, outside the visual spans (a video frame's CLS token is
    not text)."""
    first = ctx.captures[0]
    text = ctx.text_positions(b)
    text_index = ctx.slots.idx[b, text]
    visual = first.slots.valid[b] & ~torch.isin(first.slots.idx[b], text_index)  # text is never cut
    if int(visual.sum()) != ctx.n_visual[b]:
        raise RuntimeError("sparsevlm reads the visual tokens at layer 0's input, before any cut")
    after = ctx.outside_segments(b, text[text_index > first.slots.idx[b][visual].min()])
    if len(after) == 0:
        return text
    relevance = (first.hidden[b, visual] @ ctx.hidden_at(0, b, after).T).softmax(-1).mean(0)
    raters = after[relevance > relevance.mean()]
    return raters if len(raters) else after


def rater_positions_batch(ctx: StageContext, samples: list[int]) -> dict[int, torch.Tensor]:
    """`rater_positions` for the `samples`, reading the device once for all of them: the candidates' count is
    known on the host from the visual spans; only the raters (those above the mean relevance, a data-dependent
    number) are read, with each sample's visual count at layer 0 to check it. Contexts built without the
    engine's spans take the per-sample rule."""
    if not samples:
        return {}
    if not ctx.segment_spans or not ctx.first_slot or not all(ctx.segment_spans[b] for b in samples):
        return {b: rater_positions(ctx, b) for b in samples}
    first = ctx.captures[0]
    raters, checks, masks = {}, [], {}
    for b in samples:
        text = ctx.text_positions(b)
        text_index = ctx.slots.idx[b, text]
        visual = first.slots.valid[b] & ~torch.isin(first.slots.idx[b], text_index)  # text is never cut
        checks.append(visual.sum()[None])
        visual = positions_of(visual[None], ctx.n_visual[b])[0]
        spans = ctx.segment_spans[b]
        inside = torch.zeros_like(text_index, dtype=torch.bool)
        for start, last in spans:
            inside |= (text_index >= start) & (text_index <= last)
        candidate = (text_index > first.slots.idx[b].gather(0, visual).min()) & ~inside
        # the text after the first visual token, outside every span: all of it, less that inside the spans and
        # that before the first span (whose first token is the first visual token)
        inside_text = sum(last - start + 1 for start, last in spans) - ctx.n_visual[b]
        count = ctx.n_text[b] - inside_text - (spans[0][0] - ctx.first_slot[b])
        raters[b] = text[positions_of(candidate[None], count)[0]] if count > 0 else text
        if count > 0:
            relevance = (first.hidden[b, visual] @ ctx.hidden_at(0, b, raters[b]).T).softmax(-1).mean(0)
            masks[b] = relevance > relevance.mean()
    host = torch.cat(checks + [mask.long().sum()[None] for mask in masks.values()]).tolist()  # the stage's read
    if host[: len(samples)] != [ctx.n_visual[b] for b in samples]:
        raise RuntimeError("sparsevlm reads the visual tokens at layer 0's input, before any cut")
    for (b, mask), chosen in zip(masks.items(), host[len(samples):], strict=True):
        if chosen:  # else every candidate rates
            raters[b] = raters[b][positions_of(mask[None], chosen)[0]]
    return raters


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
    def scores(self, ctx: StageContext, b: int) -> torch.Tensor:
        """[n_b] mean attention of the raters over the current visual tokens in the layer before the cut."""
        return self.rater_attention(ctx, b).mean(0)

    def rater_attention(self, ctx: StageContext, b: int) -> torch.Tensor:
        """[raters, n_b] the raters' head-mean attention over the current visual tokens, layer before the cut."""
        return ctx.attention_rows(b, rater_positions(ctx, b), ctx.layer - 1)

    def select(self, ctx: StageContext, b: int, k: int) -> torch.Tensor | Selection:
        """official: k is the top-k count and the clusters come on top; uniform: k is kept + clusters. The rank
        rule replaces k by the rank of the rater attention, clusters on top, under either protocol."""
        relation = self.rater_attention(ctx, b)
        if self.options.count_rule == "rank":
            k = int(torch.linalg.matrix_rank(relation.float()))  # SVvid score.py:11-13
        plan = self._plan(ctx, relation.shape[-1], k)
        noise = None if plan is None else torch.rand(plan[2], generator=ctx.generator(b)) * DENSITY_NOISE
        return self._choose(ctx, b, k, relation, plan, noise)

    def select_batch(self, ctx: StageContext, budgets: list[int | None]) -> BatchSelection:
        """`select` for every sample, with one read of the device per prefill (the raters, whose number the data
        sets; the rank rule's counts in one more per stage) and the density noise drawn on the host and uploaded
        once per stage."""
        samples = [b for b, k in enumerate(budgets) if k is not None]
        raters = self._raters(ctx, samples)
        relations = {b: ctx.attention_rows(b, raters[b], ctx.layer - 1) for b in samples}
        counts = {b: budgets[b] for b in samples}
        if self.options.count_rule == "rank" and samples:  # SVvid score.py:11-13: the rank sets the count
            ranks = torch.stack([torch.linalg.matrix_rank(relations[b].float()) for b in samples]).tolist()
            counts = dict(zip(samples, ranks, strict=True))
        plans = {b: self._plan(ctx, ctx.n_current[b], counts[b]) for b in samples}
        drawn = [b for b in samples if plans[b] is not None]
        noise: dict[int, torch.Tensor] = {}
        if drawn:
            with host_side():  # the official global RNG draw, from each sample's own generator
                draws = [torch.rand(plans[b][2], generator=ctx.generator(b)) * DENSITY_NOISE for b in drawn]
            uploaded = upload(torch.cat(draws), ctx.hidden.device)
            noise = dict(zip(drawn, uploaded.split([len(d) for d in draws]), strict=True))
        selections: list[Selection | None] = [None] * len(budgets)
        for b in samples:
            choice = self._choose(ctx, b, counts[b], relations[b], plans[b], noise.get(b))
            selections[b] = Selection(choice.sort().values) if isinstance(choice, torch.Tensor) else choice
        return pack(selections, ctx)

    def _raters(self, ctx: StageContext, samples: list[int]) -> dict[int, torch.Tensor]:
        """Current slot positions of the samples' raters. They depend on layer 0's input only, so the first stage
        of a prefill finds them (`rater_positions_batch`, one read) and keeps their ORIGINAL indices, tied to that
        prefill's layer-0 capture; later stages look them up (text is never cut)."""
        first = ctx.captures[0]
        cache = getattr(self, "_rater_cache", None)
        known = cache[1] if cache is not None and cache[0]() is first else {}
        fresh = rater_positions_batch(ctx, [b for b in samples if b not in known])
        known = known | {b: ctx.slots.idx[b, positions] for b, positions in fresh.items()}
        self._rater_cache = (weakref.ref(first), known)
        return {b: fresh[b] if b in fresh else ctx.slots.lookup(known[b], b) for b in samples}

    def _plan(self, ctx: StageContext, n: int, k: int) -> tuple[int, int, int] | None:
        """(kept by score, clusters, recycled tokens) of a sample with n current tokens asked for k (the rank
        under the rank rule), all on the host; None when nothing is recycled."""
        rank_rule = self.options.count_rule == "rank"
        if (rank_rule and k >= n) or not self.options.recycle:
            return None
        kept, clusters = (k, None) if ctx.protocol == "official" or rank_rule else split_exact(k, n)
        recycled = recycled_count(n - kept)
        return kept, cluster_count(recycled) if clusters is None else clusters, recycled

    def _choose(self, ctx: StageContext, b: int, k: int, relation: torch.Tensor, plan: tuple[int, int, int] | None,
                noise: torch.Tensor | None) -> torch.Tensor | Selection:
        """The selection from the raters' attention `relation` and the host's `plan`; nothing read back."""
        scores = relation.mean(0)
        n = len(scores)
        if self.options.count_rule == "rank" and k >= n:  # score.py:19-21: nothing pruned, nothing recycled
            return torch.arange(n, device=scores.device)
        if plan is None:
            return scores.topk(k).indices
        kept_count, clusters, recycled_tokens = plan
        kept = scores.topk(kept_count).indices.sort().values
        pruned = torch.ones(n, dtype=torch.bool, device=scores.device).index_fill_(0, kept, False)
        pruned = positions_of(pruned[None], n - kept_count)[0]
        recycled = pruned[scores[pruned].topk(recycled_tokens).indices]
        features = ctx.hidden_states(b)
        means, centres = dpc_knn_merge(features[recycled], clusters, noise)
        order = torch.cat([kept, recycled[centres]])
        return Selection(order, torch.cat([features[kept], means.to(features.dtype)]))
