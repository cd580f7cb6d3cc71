"""VidCom2: the official code's kept tokens and logits on every family it has a port for (tests/oracle_vidcom2.py),
the uniform protocol's exact counts, batching, decoding, refusals and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import oracle_vidcom2 as oracle
import pytest
import torch
from helpers import batch_matches_alone, cached_vs_recomputed, greedy, noise_image
from helpers import first_layer_run as run

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.methods.vidcom2 import VidCom2, official_frame_counts, webster_mask, within_frame_rank

FAMILIES = ("tiny_llava_onevision", "tiny_qwen2vl", "tiny_qwen2_5vl", "tiny_qwen3vl")
OV = "tiny_llava_onevision"  # 3 x 3 pooled tokens per frame, 28 layers
MODELS: dict = {}


def model(name: str):
    if name not in MODELS:
        MODELS[name] = load_model(name, "cpu")
    return MODELS[name]


def video(frames: int = 8, size: int = 112, seed: int = 50, question: str = "What moves?") -> Sample:
    return Sample(f"v{frames}-{seed}", question, "", [], video=[noise_image(seed + i, size) for i in range(frames)])


def pruned(name: str, batch: list[Sample], **knobs):
    loaded = model(name)
    pruner = make_pruner("vidcom2", model=name, **knobs)
    return (*run(loaded, prepare(loaded, batch, pruner), pruner), pruner)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("keep", [0.3, 0.5])
def test_official_protocol_matches_the_official_code(name, keep):
    batch = [video(8)]
    kept, _, logits, pruner = pruned(name, batch, keep=keep)
    loaded = model(name)
    expected = oracle.vidcom2(loaded, loaded.prepare(batch), keep)
    assert kept == expected.kept
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the cut matters: the stock model answers otherwise
        stock = loaded.model(**loaded.prepare(batch)).logits[0, -1]
    assert not torch.allclose(stock, logits, atol=1e-4)


@pytest.mark.parametrize("knobs", [dict(channel_ratio=1.0), dict(temperature=1.0), dict(channel_ratio=0.25)])
def test_official_knobs_match_the_official_code(knobs):
    batch = [video(8)]
    kept, _, logits, _ = pruned(OV, batch, keep=0.4, **knobs)
    default = pruned(OV, batch, keep=0.4)[0]
    names = {"channel_ratio": "ratio", "temperature": "temp"}
    expected = oracle.vidcom2(model(OV), model(OV).prepare(batch), 0.4, **{names[k]: v for k, v in knobs.items()})
    assert kept == expected.kept and kept != default  # each knob changes the kept tokens
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [OV, "tiny_qwen3vl"])
@pytest.mark.parametrize("keep", [0.2, 0.37])
def test_uniform_keeps_exactly_round_keep_n_at_original_positions(name, keep):
    batch = [video(8)]
    kept, embeds, logits, pruner = pruned(name, batch, keep=keep, protocol="uniform")
    n = pruner.records[0].n_visual
    assert len(kept) == round(keep * n) and kept == sorted(kept)
    assert not pruner.records[0].budget_unreachable
    official, _, official_logits, official_pruner = pruned(name, batch, keep=keep)
    if len(official) == len(kept):  # the official per-frame counts add up to k: Webster gives the same counts
        assert kept == official
        if name == OV:  # original positions (uniform) vs a shorter sequence (official)
            assert not torch.allclose(logits, official_logits, atol=1e-4)


def test_webster_apportionment_is_exact_and_capped():
    torch.manual_seed(0)
    rank = within_frame_rank(torch.rand(5, 9))
    weights = torch.tensor([1.8, 0.8, 0.8, 0.8, 0.8])
    for k in range(46):
        mask = webster_mask(rank, weights, k)
        per_frame = mask.sum(1)
        assert int(per_frame.sum()) == k and bool((per_frame <= 9).all())
        assert bool((mask == (rank < per_frame[:, None])).all())  # each frame's most distinct tokens
    counts = official_frame_counts(weights, 0.25, 9)  # round(min(0.25 w, 1) 9) = 4, 2, 2, 2, 2 (half to even)
    assert counts.tolist() == [4, 2, 2, 2, 2]
    assert webster_mask(rank, weights, 12).sum(1).tolist() == counts.tolist()


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_batch_matches_batch_of_one(protocol):
    batch = [video(8, 112, 50), video(8, 96, 70, "Which object moves the most in this clip?")]
    together = batch_matches_alone(model(OV), batch, make_pruner("vidcom2", model=OV, keep=0.3, protocol=protocol))
    if protocol == "uniform":
        assert [len(kept) for kept in together[0]] == [round(0.3 * 72)] * 2


def test_batch_matches_batch_of_one_on_qwen():
    batch = [video(8, 112, 50), video(8, 140, 70, "Which object moves the most in this clip?")]
    batch_matches_alone(model("tiny_qwen2_5vl"), batch, make_pruner("vidcom2", model="tiny_qwen2_5vl", keep=0.3))


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_clips_of_one_shape_scored_together_keep_what_they_keep_alone(protocol):
    """The batch's clips are grouped by shape (and uniform share) and scored at once: two same-shape videos, a
    shorter one, and a prompt holding an image beside a video (two clips of different shapes)."""
    mixed = Sample("mixed", "What changes?", "", [noise_image(5, 84)], video=[noise_image(30 + i, 112)
                                                                             for i in range(4)])
    batch = [video(8, 112, 50), video(8, 112, 90), video(4, 96, 70), mixed]
    name = "tiny_qwen2vl"
    batch_matches_alone(model(name), batch, make_pruner("vidcom2", model=name, keep=0.3, protocol=protocol))


def test_cached_decode_matches_recomputation():
    loaded = model(OV)
    pruner = make_pruner("vidcom2", model=OV, keep=0.3)
    cached, recomputed = cached_vs_recomputed(loaded, loaded.prepare([video(8), video(8, 96, 80)]), pruner)
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


def test_keep_all_is_the_stock_model():
    loaded = model(OV)
    batch = [video(6)]
    stock_tokens, stock_scores = greedy(loaded, loaded.prepare(batch), steps=3)
    pruner = make_pruner("vidcom2", model=OV, keep=1.0)
    tokens, scores = greedy(loaded, prepare(loaded, batch, pruner), pruner, steps=3)
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(scores, stock_scores, atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused_in_one_line_before_loading():
    cases = [
        (dict(channel_ratio=0.0), r"prune.channel_ratio=0.0 must lie in \(0, 1\]"),
        (dict(channel_ratio=1.5), r"prune.channel_ratio=1.5 must lie in \(0, 1\]"),
        (dict(temperature=0.0), r"prune.temperature=0.0 must be > 0"),
        (dict(model="tiny_llava"), r"'llava' is not supported \(supported: llava_onevision, qwen2_vl, qwen2_5_vl, "
                                   r"qwen3_vl\)"),
        (dict(model="tiny_video_llava"), r"'video_llava' is not supported"),
        (dict(model=OV, prune_layers=[2]), r"must be \[0\]"),
        (dict(model=OV, schedule="paper"), r"no official count rule"),
    ]
    for knobs, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            make_pruner("vidcom2", keep=0.25, **knobs)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="this dataset holds none") as error:
        VidCom2().check_inputs(videos=False)
    assert "\n" not in str(error.value)
    VidCom2().check_inputs(videos=True)


def test_the_cli_runs_it_end_to_end(tmp_path):
    command = [sys.executable, "-m", "clse_exp", f"model={OV}", "prune=vidcom2", "keep=0.25", "dataset=synthetic",
               "dataset.variant=video", "dataset.limit=2", "logger=none", "eval.reference=false",
               f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    retention = json.loads((tmp_path / "summary.json").read_text())["retention"]
    assert retention["asked"] == 0.25
    # 4 frames of 3 x 3: the official per-frame counts may keep 8 or 10 where round(0.25 * 36) = 9 (flagged), and
    # the run log says why
    assert abs(retention["average"] - 0.25) <= 0.5 * 4 / 36
    if retention["budget_unreachable_samples"]:
        assert "prune=vidcom2 protocol=official keeps the official per-frame counts" in (
            tmp_path / "clse_exp.log").read_text()
