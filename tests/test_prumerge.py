"""PruMerge+: the official code's tokens, merges and logits (tests/oracle_prumerge.py) on a tiny LLaVA-1.5-shaped
model (576 patches, 32 layers), the budgeted count rule, the uniform protocol, and the engine's contracts."""

from __future__ import annotations

import subprocess
import sys

import oracle_prumerge as oracle
import pytest
import torch
from helpers import batch_matches_alone, cached_vs_recomputed, samples
from helpers import first_layer_run as run

from clse_exp import make_pruner
from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.prumerge_plus import budgeted_tokens


def stride(outliers: int, n: int) -> int:
    return int(int(1 / (outliers / n)) / 3)


def budgeted_layout(scores: torch.Tensor, k: int) -> tuple[int, int]:
    """The budgeted rule by brute force: (outliers, grid stride) whose official layout holds k - 1 patches."""
    n = len(scores)
    ranked = scores.argsort(descending=True).tolist()

    def size(m: int, s: int) -> int:
        top = set(ranked[:m])
        return m + len([g for g in range(0, n - 1, s) if g not in top])

    official = {m: size(m, stride(m, n)) for m in range(1, n + 1) if stride(m, n) >= 1}
    exact = [m for m, total in official.items() if total == k - 1]
    if exact:
        return exact[0], stride(exact[0], n)
    m = max(m for m, total in official.items() if total < k - 1)
    s = stride(m, n)
    while size(m, s) != k - 1:
        m += 1
    return m, s


def check(kept: list[int], embeds: torch.Tensor, logits: torch.Tensor, expected: oracle.Merged) -> None:
    extra_slot, patches = kept[-1], kept[:-1]  # the extra token comes last, in the slot of a pruned patch
    assert patches == expected.kept
    assert extra_slot not in patches
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_adaptive_count_matches_the_official_code(llava576):
    loaded, inputs, x = llava576
    kept, embeds, logits = run(loaded, inputs, make_pruner("prumerge_plus", keep=0.5, adaptive=True))
    expected = oracle.prumerge_plus(loaded, inputs, x)
    assert len(kept) == len(expected.kept) + 1 < 0.5 * 576
    check(kept, embeds, logits, expected)


@pytest.mark.parametrize("budget", [127, pytest.param(64, marks=pytest.mark.slow)])
def test_budgeted_count_matches_the_official_code_at_its_outliers_and_stride(llava576, budget):
    loaded, inputs, x = llava576
    kept, embeds, logits = run(loaded, inputs, make_pruner("prumerge_plus", keep=budget / 576, budget="final"))
    assert len(kept) == budget
    outliers, grid = budgeted_layout(oracle.last_layer(loaded, inputs["pixel_values"])[0][0], budget)
    check(kept, embeds, logits, oracle.prumerge_plus(loaded, inputs, x, outliers=outliers, stride=grid))


@pytest.mark.slow
def test_budget_at_the_adaptive_count_keeps_the_adaptive_tokens(llava576):
    loaded, inputs, _ = llava576
    adaptive, _, adaptive_logits = run(loaded, inputs, make_pruner("prumerge_plus", keep=0.5, adaptive=True))
    budgeted, _, logits = run(loaded, inputs, make_pruner("prumerge_plus", keep=len(adaptive) / 576, budget="final"))
    assert budgeted == adaptive
    torch.testing.assert_close(logits, adaptive_logits)


def test_budget_rule_meets_every_count():
    for n in (64, 576):
        ranked = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        for kept in range(0, n - 1, 1 if n == 64 else 7):
            tokens = budgeted_tokens(ranked, n, kept).tolist()
            assert len(tokens) == kept == len(set(tokens))


def test_uniform_protocol_keeps_the_same_tokens_at_their_own_positions(llava576):
    loaded, inputs, _ = llava576
    official, _, official_logits = run(loaded, inputs, make_pruner("prumerge_plus", keep=0.22, budget="final"))
    uniform, _, uniform_logits = run(loaded, inputs, make_pruner("prumerge_plus", keep=0.22, budget="final",
                                                                 protocol="uniform"))
    assert len(uniform) == 127 and uniform == sorted(official)
    assert not torch.allclose(official_logits, uniform_logits, atol=1e-3)


def test_batch_matches_batch_of_one(tiny_llava):
    batch = samples(3, images_per_sample=(1, 2, 1))
    pruner = make_pruner("prumerge_plus", keep=0.22)
    together = batch_matches_alone(tiny_llava, batch, pruner)[0]
    assert [len(kept) for kept in together] == [14, 28, 14]
    assert sum(i < 64 for i in together[1]) == 14  # each image merged on its own


def test_cached_decode_matches_recomputation(tiny_llava):
    pruner = make_pruner("prumerge_plus", keep=0.3)
    inputs = tiny_llava.prepare(samples(2, images_per_sample=(2, 1)))
    cached, recomputed = cached_vs_recomputed(tiny_llava, inputs, pruner)
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


def test_bad_settings_fail_before_loading():
    with pytest.raises(ConfigError, match=r"qwen2_vl.*supported: llava"):
        make_pruner("prumerge_plus", keep=0.2, model="tiny_qwen2vl")
    with pytest.raises(ConfigError, match="protocol=official"):
        make_pruner("prumerge_plus", keep=0.2, adaptive=True, protocol="uniform", model="tiny_llava")


@pytest.mark.slow
def test_the_cli_runs_it_end_to_end(tmp_path):
    command = [sys.executable, "-m", "clse_exp", "model=tiny_llava", "prune=prumerge_plus", "keep=0.22",
               "dataset.limit=3", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "summary.json").exists()
