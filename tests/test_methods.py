"""Each method's selection on hand-made inputs with a known answer."""

from __future__ import annotations

import pytest
import torch

from clse_exp.errors import ConfigError
from clse_exp.pruning.methods import METHODS, get_method
from clse_exp.pruning.methods.divprune import max_min_diverse
from clse_exp.pruning.signals import Capture, StageContext
from clse_exp.pruning.slots import Slots
from clse_exp.pruning.spectral import clse_scores


def context(hidden: torch.Tensor, n_text_before: int = 2, n_text_after: int = 3, reference=None, grid=None,
            layer: int = 2, stage_index: int = 0) -> StageContext:
    """One sample: [text x n_before, visual x N, text x n_after]."""
    n_visual, channels = hidden.shape
    length = n_text_before + n_visual + n_text_after
    full = torch.randn(1, length, channels, generator=torch.Generator().manual_seed(0))
    full[0, n_text_before : n_text_before + n_visual] = hidden
    rank = torch.full((1, length), -1)
    rank[0, n_text_before : n_text_before + n_visual] = torch.arange(n_visual)
    slots = Slots(torch.arange(length)[None], torch.ones(1, length, dtype=torch.bool))
    captures = {}
    if reference is not None:
        ref_full = full.clone()
        ref_full[0, n_text_before : n_text_before + n_visual] = reference
        captures[0] = Capture(ref_full, slots, torch.ones(1, length, 4), torch.zeros(1, length, 4))
    return StageContext(
        layer=layer, stage_index=stage_index, hidden=full, slots=slots, cos=torch.ones(1, length, 4),
        sin=torch.zeros(1, length, 4), is_visual=rank >= 0, visual_rank=rank,
        grids_per_sample=[[grid or (1, 1, n_visual)]], n_visual=[n_visual], layers=torch.nn.ModuleList(),
        final_norm=torch.nn.Identity(), captures=captures, reference_layer=0,
    )


def with_attention(ctx: StageContext, visual_attention: list[float], current: bool = False) -> StageContext:
    full = torch.zeros(1, ctx.hidden.shape[1])
    full[0, ctx.visual_positions(0)] = torch.tensor(visual_attention)
    layer = ctx.layer if current else ctx.layer - 1
    ctx.captures.setdefault(layer, Capture(ctx.hidden, ctx.slots, ctx.cos, ctx.sin))
    ctx._cache[("last", layer)] = full
    return ctx


def set_keys(ctx: StageContext, keys: torch.Tensor) -> None:
    """Layer K-1's post-RoPE keys as the context would compute them, [1, L, kv_heads * head_dim]."""
    ctx.captures.setdefault(ctx.layer - 1, Capture(ctx.hidden, ctx.slots, ctx.cos, ctx.sin))
    ctx._cache[("keys", ctx.layer - 1)] = keys


def test_fastv_keeps_most_attended():
    ctx = with_attention(context(torch.randn(5, 4)), [0.1, 0.5, 0.05, 0.3, 0.05])
    assert sorted(get_method("fastv")().select(ctx, 0, 2).tolist()) == [1, 3]


def test_pdrop_uses_the_pruning_layers_own_attention():
    ctx = with_attention(context(torch.randn(4, 4)), [0.9, 0.0, 0.0, 0.1])
    ctx = with_attention(ctx, [0.0, 0.2, 0.7, 0.1], current=True)
    assert sorted(get_method("pdrop")().select(ctx, 0, 2).tolist()) == [1, 2]


def _brute_force_max_min(features: torch.Tensor, k: int) -> list[int]:
    unit = torch.nn.functional.normalize(features, dim=-1)
    dist = 1 - unit @ unit.T
    n = len(features)
    nearest = [min(dist[i, j].item() for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: nearest[i])]
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: min(dist[i, j].item() for j in picks)))
    return picks


def test_divprune_picks_one_token_per_cluster():
    directions = torch.eye(3)
    features = torch.cat([d + 0.01 * torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
                          for i, d in enumerate(directions)])
    picks = get_method("divprune")().select(context(features), 0, 3).tolist()
    assert sorted(p // 4 for p in picks) == [0, 1, 2]


def test_divprune_matches_brute_force():
    features = torch.randn(20, 6, generator=torch.Generator().manual_seed(3))
    assert max_min_diverse(features, 7).tolist() == _brute_force_max_min(features, 7)


def test_dart_keeps_pivot_and_least_similar_tokens():
    # Token 0 has the largest key norm (the pivot); tokens 3 and 4 point away from it.
    hidden = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.05], [-1.0, 0.1], [0.0, 1.0], [0.8, 0.2]])
    ctx = context(hidden, n_text_after=0)
    keys = torch.zeros(1, ctx.hidden.shape[1], 2)
    keys[0, ctx.visual_positions(0)] = torch.tensor([[5.0, 5.0]] + [[0.1, 0.1]] * 5)
    set_keys(ctx, keys)
    method = get_method("dart")(visual_pivots=1, text_pivots=0)
    assert sorted(method.select(ctx, 0, 3).tolist()) == [0, 3, 4]


def test_dart_meets_the_budget_exactly():
    ctx = context(torch.randn(40, 8, generator=torch.Generator().manual_seed(1)))
    set_keys(ctx, torch.randn(1, ctx.hidden.shape[1], 8, generator=torch.Generator().manual_seed(2)))
    for k in (1, 5, 9, 17, 39):
        picks = get_method("dart")().select(ctx, 0, k)
        assert len(picks) == k == len(set(picks.tolist()))


def test_random_is_seeded_and_distinct():
    ctx = context(torch.randn(30, 4))
    first = get_method("random")().select(ctx, 0, 10).tolist()
    assert first == get_method("random")().select(context(torch.randn(30, 4)), 0, 10).tolist()
    assert len(set(first)) == 10
    ctx.seed = 1
    assert get_method("random")().select(ctx, 0, 10).tolist() != first


@pytest.mark.parametrize("score_type", ["clse", "clse_attn", "attn"])
def test_clse_first_stage_scores_equal_the_pure_function(score_type):
    gen = torch.Generator().manual_seed(4)
    ref, cur = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    attention = torch.rand(16, generator=gen)
    ctx = with_attention(context(cur, reference=ref, grid=(1, 4, 4)), attention.tolist())
    expected = clse_scores(ref[None], cur[None], (1, 4, 4), attn=attention[None], score_type=score_type)[0]
    torch.testing.assert_close(get_method("clse")(score_type=score_type).scores(ctx, 0), expected)


def test_clse_later_stages_rank_by_attention():
    ctx = with_attention(context(torch.randn(6, 4), stage_index=1), [0.0, 0.1, 0.6, 0.0, 0.3, 0.0])
    assert sorted(get_method("clse")().select(ctx, 0, 2).tolist()) == [2, 4]


def test_unknown_method_and_option_name_the_choices():
    with pytest.raises(ConfigError, match="choose one of: none, cdpruner, clse"):
        get_method("fastvv")
    with pytest.raises(ConfigError, match="cutoff_ratio"):
        get_method("clse")(cutof_ratio=0.2)
    with pytest.raises(ConfigError, match="clse_attn"):
        get_method("clse")(score_type="spectral")


def test_every_method_is_registered_with_a_config():
    from clse_exp.config import group_options

    assert set(group_options("prune")) == set(METHODS) | {"none"}
    assert all(name == cls.name for name, cls in METHODS.items())
