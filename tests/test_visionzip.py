"""VisionZip: the official code's tokens, merges and logits (tests/oracle_visionzip.py) on a tiny LLaVA-1.5-shaped
model (576 patches, 32 layers), the uniform protocol, and the engine's contracts (identity, batching, decode)."""

from __future__ import annotations

import subprocess
import sys

import oracle_visionzip as oracle
import pytest
import torch
from helpers import cached_vs_recomputed, greedy, llava576_case, samples
from helpers import first_layer_run as run

from clse_exp import load_model, make_pruner
from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.visionzip import CONTEXTUAL_SHARE, SPLITS, split_budget, split_counts


@pytest.fixture(scope="module")
def llava():
    return llava576_case()


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny_llava", "cpu")


def test_the_share_reproduces_the_published_splits():
    assert {budget: split_counts(budget, CONTEXTUAL_SHARE) for budget in SPLITS} == SPLITS
    assert split_budget(127, 2) == [64, 63] and split_budget(10, 1) == [10]


@pytest.mark.parametrize("budget", [192, 64])
def test_official_protocol_matches_the_official_code(llava, budget):
    loaded, inputs, x = llava
    kept, embeds, logits = run(loaded, inputs, make_pruner("visionzip", keep=budget / 576, budget="final"))
    expected = oracle.visionzip(loaded, inputs, x, *SPLITS[budget])
    assert len(kept) == budget and len(expected.dominant) == SPLITS[budget][0] - 1
    cls_slot, patches = kept[0], kept[1:]  # the [CLS] row leads, in the slot of a merged-away patch
    assert patches == expected.dominant + expected.targets
    assert cls_slot not in patches
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_uniform_protocol_keeps_k_patches_at_their_own_positions(llava):
    loaded, inputs, x = llava
    official, _, official_logits = run(loaded, inputs, make_pruner("visionzip", keep=64 / 576, budget="final"))
    uniform, embeds, uniform_logits = run(loaded, inputs, make_pruner("visionzip", keep=64 / 576, budget="final",
                                                                      protocol="uniform"))
    assert len(uniform) == 64 and uniform == sorted(uniform)
    assert set(official[1:54]) < set(uniform)  # the 53 dominant patches, and the [CLS] slot goes to a 54th
    assert embeds.shape[1] == x.embeds.shape[1] - 576 + 64
    assert not torch.allclose(official_logits, uniform_logits, atol=1e-3)


def test_batch_matches_batch_of_one(tiny):
    batch = samples(3, images_per_sample=(1, 2, 1))
    pruner = make_pruner("visionzip", keep=0.22)
    tokens, scores = greedy(tiny, tiny.prepare(batch), pruner, steps=2)
    together = pruner.trace[0]["kept"]
    two_images = together[1]  # 28 = 14 + 14 tokens, each image merged on its own
    assert len(two_images) == 28 and sum(i < 64 for i in two_images) == 14
    for i, sample in enumerate(batch):
        alone_tokens, alone_scores = greedy(tiny, tiny.prepare([sample]), pruner, steps=2)
        assert pruner.trace[0]["kept"][0] == together[i]
        assert torch.equal(tokens[i], alone_tokens[0])
        torch.testing.assert_close(scores[:, i], alone_scores[:, 0], atol=2e-4, rtol=1e-4)


def test_cached_decode_matches_recomputation(tiny):
    cached, recomputed = cached_vs_recomputed(tiny, tiny.prepare(samples(2, images_per_sample=(2, 1))),
                                             make_pruner("visionzip", keep=0.3))
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


def test_models_without_a_clip_encoder_fail_before_loading():
    with pytest.raises(ConfigError, match=r"qwen2_vl.*supported: llava"):
        make_pruner("visionzip", keep=0.2, model="tiny_qwen2vl")
    with pytest.raises(ConfigError, match=r"must be \[0\]"):
        make_pruner("visionzip", keep=0.2, prune_layers=[2], model="tiny_llava")
    with pytest.raises(ConfigError, match="contextual_share"):
        make_pruner("visionzip", keep=0.2, contextual_share=1.5)


@pytest.mark.slow
def test_the_cli_runs_it_end_to_end(tmp_path):
    command = [sys.executable, "-m", "clse_exp", "model=tiny_llava", "prune=visionzip", "keep=0.22", "dataset.limit=3",
               f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "summary.json").exists()
