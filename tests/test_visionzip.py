"""VisionZip: the official code's tokens, merges and logits on a tiny LLaVA-1.5-shaped model (576 patches, 32
layers; tests/oracle_visionzip.py) and a tiny Qwen2.5-VL (28 layers, windowed tower; tests/oracle_visionzip_qwen.py),
the uniform protocol, and the engine's contracts (identity, batching, decode)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import oracle_visionzip as oracle
import oracle_visionzip_qwen as oracle_qwen
import pytest
import torch
from helpers import QUESTION, batch_matches_alone, cached_vs_recomputed, noise_image, samples
from helpers import first_layer_run as run
from PIL import Image

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.visionzip import (
    CONTEXTUAL_SHARE,
    SPLITS,
    announce_joint_selection,
    split_budget,
    split_counts,
)


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny_qwen2_5vl", "cpu")


def rectangle(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_share_reproduces_the_published_splits():
    assert {budget: split_counts(budget, CONTEXTUAL_SHARE) for budget in SPLITS} == SPLITS
    assert split_budget(127, 2) == [64, 63] and split_budget(10, 1) == [10]


@pytest.mark.parametrize("budget", [192, 64])
def test_official_protocol_matches_the_official_code(llava576, budget):
    loaded, inputs, x = llava576
    kept, embeds, logits = run(loaded, inputs, make_pruner("visionzip", keep=budget / 576, budget="final"))
    expected = oracle.visionzip(loaded, inputs, x, *SPLITS[budget])
    assert len(kept) == budget and len(expected.dominant) == SPLITS[budget][0] - 1
    cls_slot, patches = kept[0], kept[1:]  # the [CLS] row leads, in the slot of a merged-away patch
    assert patches == expected.dominant + expected.targets
    assert cls_slot not in patches
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_uniform_protocol_keeps_k_patches_at_their_own_positions(llava576):
    loaded, inputs, x = llava576
    official, _, official_logits = run(loaded, inputs, make_pruner("visionzip", keep=64 / 576, budget="final"))
    uniform, embeds, uniform_logits = run(loaded, inputs, make_pruner("visionzip", keep=64 / 576, budget="final",
                                                                      protocol="uniform"))
    assert len(uniform) == 64 and uniform == sorted(uniform)
    assert set(official[1:54]) < set(uniform)  # the 53 dominant patches, and the [CLS] slot goes to a 54th
    assert embeds.shape[1] == x.embeds.shape[1] - 576 + 64
    assert not torch.allclose(official_logits, uniform_logits, atol=1e-3)


def test_batch_matches_batch_of_one(tiny_llava):
    batch = samples(3, images_per_sample=(1, 2, 1))
    pruner = make_pruner("visionzip", keep=0.22)
    two_images = batch_matches_alone(tiny_llava, batch, pruner)[0][1]  # 28 = 14 + 14 tokens, each image on its own
    assert len(two_images) == 28 and sum(i < 64 for i in two_images) == 14


@pytest.mark.parametrize("name", ["tiny_llava", "qwen"])
def test_cached_decode_matches_recomputation(name, request):
    loaded = request.getfixturevalue(name)
    cached, recomputed = cached_vs_recomputed(loaded, loaded.prepare(samples(2, images_per_sample=(2, 1))),
                                             make_pruner("visionzip", keep=0.3))
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("keep", "dominant"), [(0.5, 0.45), (0.7, 0.65), (0.11, 0.06)])
def test_qwen_official_protocol_matches_the_official_code(qwen, keep, dominant):
    """A 9 x 7 grid (63 tokens): the tower's 2 x 2 windows cut it unevenly, so the window order matters."""
    inputs = qwen.prepare([Sample("s", QUESTION, "", [rectangle(5, 196, 252)])])
    kept, embeds, logits = run(qwen, inputs, make_pruner("visionzip", keep=keep, budget="final"))
    expected = oracle_qwen.visionzip(qwen, inputs, dominant, 0.05)
    assert len(kept) == int(dominant * 63) + 3
    assert kept == expected.kept
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_qwen2vl_takes_the_same_rule_without_windows():
    qwen2vl = load_model("tiny_qwen2vl", "cpu")
    inputs = qwen2vl.prepare([Sample("s", QUESTION, "", [rectangle(6, 196, 252)])])
    kept, embeds, logits = run(qwen2vl, inputs, make_pruner("visionzip", keep=0.33, budget="final"))
    expected = oracle_qwen.visionzip(qwen2vl, inputs, 0.28, 0.05)
    assert kept == expected.kept and len(kept) == int(0.28 * 63) + 3
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_qwen_uniform_keeps_k_tokens(qwen):
    inputs = qwen.prepare([Sample("s", QUESTION, "", [rectangle(5, 196, 252)])])
    official, _, _ = run(qwen, inputs, make_pruner("visionzip", keep=0.5, budget="final"))
    uniform, embeds, _ = run(qwen, inputs, make_pruner("visionzip", keep=0.5, budget="final", protocol="uniform"))
    assert len(official) == 31 and len(uniform) == 32  # int(0.45 * 63) + 3 vs round(0.5 * 63)
    assert len(set(official) & set(uniform)) == 29  # the 28 official dominant tokens are uniform's top 28
    shared = run(qwen, inputs, make_pruner("visionzip", keep=0.5, budget="final", contextual_share=0.25))[0]
    assert len(shared) == 32 and shared != uniform  # 8 contextual tokens instead of 3


def test_qwen_batch_with_images_and_video_matches_batch_of_one(qwen):
    video = Sample("v", "What changes between the frames?", "no", [], video=[noise_image(i) for i in range(4)])
    batch = [*samples(2, images_per_sample=(2, 1), sizes=(224, 168)), video]
    pruner = make_pruner("visionzip", keep=0.3)
    together = batch_matches_alone(qwen, batch, pruner)[0]
    assert [len(kept) for kept in together] == [int(0.25 * n) + int(0.05 * n) for n in (128, 36, 128)]


def test_qwen_selection_beyond_one_image_is_announced_once(qwen, caplog):
    announce_joint_selection.cache_clear()
    with caplog.at_level("WARNING"):
        one = qwen.prepare([Sample("s", QUESTION, "", [rectangle(5, 196, 252)])])
        run(qwen, one, make_pruner("visionzip", keep=0.5))
        assert "selected jointly" not in caplog.text  # one image: the official code's own case
        two = qwen.prepare(samples(1, images_per_sample=(2,)))
        for _ in range(2):
            run(qwen, two, make_pruner("visionzip", keep=0.5))
    assert caplog.text.count("selected jointly") == 1


def test_models_without_a_known_encoder_fail_before_loading():
    with pytest.raises(ConfigError, match=r"qwen3_vl.*supported: llava, qwen2_vl, qwen2_5_vl"):
        make_pruner("visionzip", keep=0.2, model="tiny_qwen3vl")
    with pytest.raises(ConfigError, match=r"keep=0.03.*at least 0.05"):
        make_pruner("visionzip", keep=0.03, model="tiny_qwen2_5vl")
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
