"""VisPruner: the official code's kept tokens and logits on the tiny LLaVA-1.5-shaped model (576 patches, 32
layers; tests/oracle_vispruner.py), the uniform protocol, and the engine's contracts (identity, batching,
decode, refusals)."""

from __future__ import annotations

import subprocess
import sys

import oracle_vispruner as oracle
import pytest
import torch
from helpers import batch_matches_alone, cached_vs_recomputed, samples
from helpers import first_layer_run as run

from clse_exp import make_pruner
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.methods.vispruner import important_count


@pytest.mark.parametrize(("keep", "ratio"), [(0.5, 0.5), (0.22, 0.5), (0.11, 0.5), (64 / 576, 0.75)])
def test_official_protocol_matches_the_official_code(llava576, keep, ratio):
    """keep 0.22 and 0.11 (127 and 63 tokens: 63 and 31 important, an odd residual) are where the literal
    official code raises; 64 at 0.75 is its README's MME setting (48 important + 16 diverse)."""
    loaded, inputs, x = llava576
    budget = round(keep * 576)
    kept, embeds, logits = run(loaded, inputs, make_pruner("vispruner", keep=keep, budget="final",
                                                           important_ratio=ratio))
    expected = oracle.vispruner(loaded, inputs, x, budget, ratio)
    assert len(kept) == budget and len(expected.important) == important_count(budget, ratio)
    assert kept == expected.kept
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_the_literal_official_code_raises_on_an_odd_residual_only(llava576):
    loaded, inputs, _ = llava576
    features, attentions = oracle.tower_outputs(loaded, inputs["pixel_values"])
    for budget in (128, 64):  # an even residual: the literal expand is the broadcast
        literal = oracle.encode_images(features, attentions, budget, 0.5, literal=True)[0]
        assert torch.equal(literal, oracle.encode_images(features, attentions, budget, 0.5)[0])
    with pytest.raises(IndexError):
        oracle.encode_images(features, attentions, 127, 0.5, literal=True)


def test_uniform_protocol_keeps_the_same_tokens_at_their_own_positions(llava576):
    loaded, inputs, x = llava576
    official, _, official_logits = run(loaded, inputs, make_pruner("vispruner", keep=0.22, budget="final"))
    uniform, embeds, uniform_logits = run(loaded, inputs, make_pruner("vispruner", keep=0.22, budget="final",
                                                                      protocol="uniform"))
    assert uniform == official and len(uniform) == 127  # float32 model: the same arithmetic
    assert embeds.shape[1] == x.embeds.shape[1] - 576 + 127
    assert not torch.allclose(official_logits, uniform_logits, atol=1e-3)  # original vs contiguous positions


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_keep_all_is_identity(tiny_llava, protocol):
    batch = samples(3)
    inputs = tiny_llava.prepare(batch)
    valid = inputs["attention_mask"].bool()
    pruner = make_pruner("vispruner", keep=1.0, protocol=protocol)
    with torch.no_grad():
        stock = tiny_llava.model(**inputs).logits
        with pruner.attach(tiny_llava.model):
            pruned = tiny_llava.model(**prepare(tiny_llava, batch, pruner)).logits
    torch.testing.assert_close(pruned[valid], stock[valid], atol=1e-5, rtol=1e-5)


def test_batch_matches_batch_of_one(tiny_llava):
    batch = samples(3, images_per_sample=(1, 2, 1))
    together = batch_matches_alone(tiny_llava, batch, make_pruner("vispruner", keep=0.22))[0]
    assert [len(kept) for kept in together] == [14, 28, 14]  # round(0.22 * 64) per image
    assert sum(i < 64 for i in together[1]) == 14  # each image keeps its own share


def test_cached_decode_matches_recomputation(tiny_llava):
    pruner = make_pruner("vispruner", keep=0.3)
    cached, recomputed = cached_vs_recomputed(tiny_llava, tiny_llava.prepare(samples(2, images_per_sample=(2, 1))),
                                              pruner)
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


def test_bad_settings_are_refused_in_one_line_before_loading():
    cases = [
        (dict(important_ratio=1.5), r"prune.important_ratio=1.5 must lie in \[0, 1\]"),
        (dict(important_ratio=-0.1), r"prune.important_ratio=-0.1 must lie in \[0, 1\]"),
        (dict(model="tiny_qwen2vl"), r"'qwen2_vl' is not supported \(supported: llava\)"),
        (dict(model="tiny_llava", prune_layers=[2]), r"must be \[0\]"),
    ]
    for knobs, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            make_pruner("vispruner", keep=0.2, **knobs)
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_cli_runs_it_end_to_end(tmp_path):
    command = [sys.executable, "-m", "clse_exp", "model=tiny_llava15", "prune=vispruner", "keep=0.22",
               "dataset.limit=2", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "summary.json").exists()
