"""DyCoke: the official code's TTM tokens and every decode step's logits on the tiny seeded LLaVA-OneVision
(tests/oracle_dycoke.py), the uniform protocol's exact counts, batching, refusals and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import oracle_dycoke as oracle
import pytest
import torch
from helpers import batch_matches_alone, cached_vs_recomputed, greedy, noise_image
from official_oracles import stock_inputs

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.methods.dycoke import DyCoke, official_per_frame

MODEL = "tiny_llava_onevision"  # 3 x 3 tokens per pooled frame, 28 layers
PER_FRAME = 9
STEPS = 5


def video(frames: int, question: str = "What moves?", seed: int = 50) -> Sample:
    return Sample(f"v{frames}", question, "", [], video=[noise_image(seed + i, 112) for i in range(frames)])


@pytest.fixture(scope="module")
def ov():
    return load_model(MODEL, "cpu")


def run(loaded, batch, **knobs):
    pruner = make_pruner("dycoke", model=MODEL, **knobs)
    tokens, scores = greedy(loaded, prepare(loaded, batch, pruner), pruner, steps=STEPS)
    return pruner, tokens, scores


# (knobs, merging ratio the oracle runs with, oracle kwargs). 12 frames: pairs (0, 1) .. (10, 11), frames 2 and 6
# compared two apart (the range stops before the last group). keep=0.5 derives m = 2 per pruned frame, as 0.7 does.
OFFICIAL = {
    "derived": (dict(keep=0.5), 1 - 2.5 / PER_FRAME, {}),
    "merge_ratio": (dict(keep=0.5, merge_ratio=0.6), 0.6, {}),
    "always_prune": (dict(keep=0.4, similarity_threshold=2.0, decode_ratio=0.5, decode_layer=5), 1 - 1.5 / PER_FRAME,
                     dict(threshold=2.0, dycoke_p=0.5, dycoke_l=5)),
    "no_decode": (dict(keep=0.5, decode_pruning=False), 1 - 2.5 / PER_FRAME, dict(decode=False)),
}


@pytest.mark.parametrize(("case", "implementation"), [(case, "sdpa") for case in sorted(OFFICIAL)]
                         + [("always_prune", "eager")])
def test_official_protocol_matches_the_official_code(case, implementation):
    ov = load_model(MODEL, "cpu")
    ov.model.set_attn_implementation(implementation)
    knobs, ratio, extra = OFFICIAL[case]
    batch = [video(12)]
    pruner, tokens, scores = run(ov, batch, **knobs)
    inputs = ov.prepare(batch)
    expected = oracle.dycoke(ov, inputs, stock_inputs(ov, inputs), 12, PER_FRAME, ratio, steps=STEPS, **extra)
    assert pruner.trace[0]["kept"][0] == expected.kept  # the official order (ascending similarity per frame)
    assert tokens[0].tolist() == expected.tokens
    for step in range(STEPS):
        torch.testing.assert_close(scores[step, 0], expected.logits[step], atol=1e-4, rtol=1e-4)
    if case == "always_prune":  # every step pruned: the decode stage is exercised at each of them
        assert all(selection is not None for selection in expected.selections)
    if case == "derived":  # the default gate: the first step prunes, the later (similar) ones keep every key
        assert expected.selections[0] is not None and expected.selections[1:] == [None] * (STEPS - 2)


def test_decode_pruning_changes_the_decode_steps_only(ov):
    batch = [video(8)]
    on = run(ov, batch, keep=0.5, similarity_threshold=2.0)
    off = run(ov, batch, keep=0.5, decode_pruning=False)
    assert on[0].trace[0]["kept"] == off[0].trace[0]["kept"]
    torch.testing.assert_close(on[2][0], off[2][0])  # the prefill's logits
    assert not torch.allclose(on[2][1:], off[2][1:], atol=1e-5)


def test_four_frames_skip_the_stage_where_the_official_code_raises(ov):
    batch = [video(4)]
    inputs = ov.prepare(batch)
    x = stock_inputs(ov, inputs)
    with pytest.raises(RuntimeError, match="non-empty"):
        oracle.dycoke(ov, inputs, x, 4, PER_FRAME, 0.7, steps=1, literal=True)
    pruner, tokens, scores = run(ov, batch, keep=0.5)
    expected = oracle.dycoke(ov, inputs, x, 4, PER_FRAME, 1.0, steps=STEPS)  # frames 0 and 2 whole: 18 of 36
    assert pruner.trace[0]["kept"][0] == expected.kept == list(range(9)) + list(range(18, 27))
    torch.testing.assert_close(scores[:, 0], torch.stack(expected.logits), atol=1e-4, rtol=1e-4)


def test_cached_decode_matches_recomputation_without_decode_pruning(ov):
    pruner = make_pruner("dycoke", model=MODEL, keep=0.5, decode_pruning=False)
    cached, recomputed = cached_vs_recomputed(ov, ov.prepare([video(8)]), pruner)
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


def test_official_count_rule():
    # 12 frames of 196: 4 whole frames, 8 pruned; m is the per-frame count whose size is nearest to k
    assert official_per_frame(12 * 196, 196, round(0.5 * 12 * 196)) == 196 * 2 // 8
    assert official_per_frame(12 * 196, 196, 100) == 0  # below the whole frames: the floor
    assert official_per_frame(32 * 196, 196, 32 * 196) == 196


@pytest.mark.parametrize(("frames", "keep"), [(8, 0.5), (8, 0.37), (12, 0.8), (6, 0.6), (8, 0.2), (5, 0.05)])
def test_uniform_keeps_exactly_round_keep_n_at_original_positions(ov, frames, keep):
    pruner, _, _ = run(ov, [video(frames)], keep=keep, protocol="uniform")
    kept = pruner.trace[0]["kept"][0]
    n = frames * PER_FRAME
    assert len(kept) == round(keep * n) and kept == sorted(kept)
    whole = [set(range(t * PER_FRAME, (t + 1) * PER_FRAME)) for t in range(0, frames, 4)]
    if len(kept) >= PER_FRAME * len(whole):  # frames t % 4 == 0 stay whole; below that only they keep tokens
        assert all(frame <= set(kept) for frame in whole)
    else:
        assert set(kept) <= set().union(*whole)
    assert not pruner.records[0].budget_unreachable


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_batch_matches_batch_of_one(ov, protocol):
    # one processor call takes videos of one frame count; the prompts differ in length (left padding)
    batch = [video(8), video(8, "Which object moves the most in this clip?", seed=80)]
    pruner = make_pruner("dycoke", model=MODEL, keep=0.5, protocol=protocol, similarity_threshold=2.0)
    together = batch_matches_alone(ov, batch, pruner, steps=3)[0]
    assert [len(kept) for kept in together] == ([37, 37] if protocol == "official" else [36, 36])


def test_bad_settings_are_refused_in_one_line_before_loading():
    cases = [
        (dict(merge_ratio=1.5), r"prune.merge_ratio=1.5 must lie in \[0, 1\]"),
        (dict(decode_ratio=-0.1), r"prune.decode_ratio=-0.1 must lie in \[0, 1\]"),
        (dict(decode_layer=0), r"prune.decode_layer=0 must be at least 1"),
        (dict(decode_layer=28), r"prune.decode_layer=28 is outside the model"),
        (dict(tokens_per_frame=0), r"prune.tokens_per_frame=0 must be a positive count"),
        (dict(merge_ratio=0.7, protocol="uniform"), r"official-protocol knobs"),
        (dict(model="tiny_llava"), r"'llava' is not supported \(supported: llava_onevision\)"),
        (dict(model="tiny_qwen2vl"), r"'qwen2_vl' is not supported"),
        (dict(prune_layers=[2]), r"must be \[0\]"),
        (dict(decode_pruning=False, decode_ratio=0.5), r"prune.decode_ratio=0.5 has no effect"),
        (dict(decode_pruning=False, similarity_threshold=2.0), r"prune.similarity_threshold=2.0 has no effect"),
    ]
    for knobs, message in cases:
        knobs.setdefault("model", MODEL)
        with pytest.raises(ConfigError, match=message) as error:
            make_pruner("dycoke", keep=0.5, **knobs)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="this dataset has no videos") as error:
        DyCoke().check_inputs(videos=False)
    assert "\n" not in str(error.value)


def test_an_image_prompt_is_refused(ov):
    batch = [Sample("i", "What is it?", "", [noise_image(3, 84)])]
    pruner = make_pruner("dycoke", model=MODEL, keep=0.5)
    with pytest.raises(ConfigError, match="holds an image"), torch.no_grad(), pruner.attach(ov.model):
        ov.model(**prepare(ov, batch, pruner))


def test_the_cli_runs_it_end_to_end(tmp_path):
    command = [sys.executable, "-m", "clse_exp", f"model={MODEL}", "prune=dycoke", "keep=0.5", "dataset=synthetic",
               "dataset.variant=video", "dataset.limit=2", "logger=none", "eval.reference=false",
               f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    retention = json.loads((tmp_path / "summary.json").read_text())["retention"]
    assert retention["average"] == 0.5 and retention["budget_unreachable_samples"] == 0


def test_keep_all_is_the_stock_model_at_every_step(ov):
    batch = [video(8)]
    stock_tokens, stock_scores = greedy(ov, ov.prepare(batch), steps=STEPS)
    pruner, tokens, scores = run(ov, batch, keep=1.0, similarity_threshold=2.0)
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(scores, stock_scores, atol=1e-5, rtol=1e-5)
