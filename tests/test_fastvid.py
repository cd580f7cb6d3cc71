"""FastVID: the official LLaVA-OneVision rule's kept tokens, merged embeddings and logits against an independent
transcription (tests/oracle_fastvid.py) on a tiny seeded LLaVA-OneVision (8 frames of 6 x 6 tokens), the uniform
protocol's exact counts (LLaVA-OneVision and Qwen2.5-VL), batching, refusals and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import oracle_fastvid as oracle
import pytest
import torch
from helpers import batch_matches_alone, cached_vs_recomputed, first_layer_run, noise_image
from official_oracles import stock_inputs
from omegaconf import OmegaConf

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.methods.fastvid import FastVID

FRAMES = 8
TOKENS = 36  # 6 x 6 pooled tokens per frame at image_size 168


def clip(groups: tuple[int, ...] = (3, 3, 2), size: int = 112) -> list:
    """Frames repeating a few noise images, so adjacent frames of a group are alike and DySeg finds segments."""
    return [noise_image(60 + g, size) for g, count in enumerate(groups) for _ in range(count)]


@pytest.fixture(scope="module")
def onevision():
    cfg = OmegaConf.load("clse_exp/conf/model/tiny_llava_onevision.yaml")
    cfg.tiny.image_size = 168
    loaded = load_model(cfg, "cpu")
    batch = [Sample("v", "What moves?", "", [], video=clip())]
    inputs = prepare(loaded, batch, None)
    return loaded, inputs, stock_inputs(loaded, inputs)


def official_noise(n_visual: int, count: int, seed: int = 0) -> torch.Tensor:
    """The density jitter as the engine's per-sample generator draws it (seed, stage 0, n visual tokens)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n_visual)
    return torch.rand(count, generator=generator) * 1e-6


CASES = [  # keep, knobs: the official defaults (8 one-frame segments), then multi-frame segments and anchors
    (0.25, {}),
    (0.2, {"dyseg_c": 3}),
    (0.5, {"dyseg_c": 2, "dtm_p": 2, "stprune_d": 0.5, "dtm_beta": 0.3}),
    (0.3, {"dyseg_c": 4, "dyseg_tau": 0.99999, "dtm_p": 1}),
]


@pytest.mark.parametrize(("keep", "knobs"), CASES)
def test_official_protocol_matches_the_official_code(onevision, keep, knobs):
    loaded, inputs, x = onevision
    kept, embeds, logits = run_official(loaded, inputs, keep, knobs)
    o = FastVID.Options()
    retain = int(TOKENS * keep)
    salient = retain - int(retain * knobs.get("stprune_d", o.stprune_d))
    expected = oracle.fastvid(loaded, x, FRAMES, official_noise(FRAMES * TOKENS, FRAMES * (TOKENS - salient)), keep,
                              c=knobs.get("dyseg_c", o.dyseg_c), tau=knobs.get("dyseg_tau", 0.9),
                              d=knobs.get("stprune_d", o.stprune_d), p=knobs.get("dtm_p", o.dtm_p),
                              beta=knobs.get("dtm_beta", o.dtm_beta))
    if knobs:
        assert max(expected.segments) > 1  # the multi-frame branch runs
    assert kept == expected.kept
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def run_official(loaded, inputs, keep, knobs):
    return first_layer_run(loaded, inputs, make_pruner("fastvid", keep=keep, budget="final", **knobs))


def test_dtm_beta_weights_the_merge_only(onevision):
    """beta moves the merged rows (anchor vs members), never which tokens are kept."""
    loaded, inputs, _ = onevision
    kept, embeds, _ = run_official(loaded, inputs, 0.3, {"dyseg_c": 3})
    other, other_embeds, _ = run_official(loaded, inputs, 0.3, {"dyseg_c": 3, "dtm_beta": 0.1})
    assert kept == other and not torch.allclose(embeds, other_embeds)


def test_official_counts_below_keep_are_flagged(onevision):
    """int(P * keep) per frame: 0.02 of 36 tokens keeps none of the video (as the official code would)."""
    loaded, inputs, _ = onevision
    for keep, count in ((0.02, 0), (0.25, 8 * 9), (0.3, 8 * 10)):
        pruner = make_pruner("fastvid", keep=keep, budget="final")
        kept, _, _ = first_layer_run(loaded, inputs, pruner)
        assert len(kept) == count
        assert pruner.records[0].budget_unreachable == (count != round(keep * FRAMES * TOKENS))


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_cached_decode_matches_recomputation(onevision, protocol):
    loaded, inputs, _ = onevision
    cached, recomputed = cached_vs_recomputed(loaded, inputs, make_pruner("fastvid", keep=0.3, protocol=protocol,
                                                                          dyseg_c=3))
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.6, 0.95])
@pytest.mark.parametrize("knobs", [{}, {"dyseg_c": 2}])
def test_uniform_keeps_exactly_round_keep_n_at_original_positions(onevision, keep, knobs):
    loaded, inputs, x = onevision
    pruner = make_pruner("fastvid", keep=keep, protocol="uniform", **knobs)
    kept, embeds, _ = first_layer_run(loaded, inputs, pruner)
    assert len(kept) == len(set(kept)) == round(keep * FRAMES * TOKENS)
    assert embeds.shape[1] == x.embeds.shape[1] - FRAMES * TOKENS + len(kept)  # the newline stays
    assert pruner.rules.prefill == "original" and pruner.rules.decode == "original"


@pytest.fixture(scope="module")
def qwen():
    loaded = load_model("tiny_qwen2_5vl", "cpu")
    batch = [Sample("v", "What moves?", "", [], video=clip((6, 6, 4), 168))]  # 8 temporal patches of 6 x 6
    inputs = prepare(loaded, batch, None)
    return loaded, inputs, stock_inputs(loaded, inputs)


QWEN_CASES = [  # the Qwen port's defaults (8 one-frame segments), segments, sub-segments and anchors
    (0.27, {}),
    (0.3, {"dyseg_c": 3}),
    (0.3, {"dyseg_c": 3, "dyseg_ignore": 1.0, "dtm_p": 2}),
    (0.5, {"dyseg_c": 2, "dyseg_ignore": 1.0, "stprune_d": 0.5, "dtm_beta": 0.3, "dyseg_tau": -1.0}),
]


@pytest.mark.parametrize(("keep", "knobs"), QWEN_CASES)
def test_official_qwen2_5_vl_matches_the_official_code(qwen, keep, knobs):
    loaded, inputs, x = qwen
    assert inputs["video_grid_thw"].tolist() == [[8, 12, 12]]
    kept, embeds, logits = first_layer_run(loaded, inputs, make_pruner("fastvid", keep=keep, budget="final", **knobs))
    generator = torch.Generator().manual_seed(x.n_visual)  # the engine's per-sample generator (seed 0, stage 0)
    names = {"dyseg_c": "c", "dyseg_tau": "tau", "dyseg_ignore": "ignore", "stprune_d": "d", "dtm_p": "p",
             "dtm_beta": "beta"}
    expected = oracle.qwen_fastvid(loaded, inputs, x, generator, keep, **{names[k]: v for k, v in knobs.items()})
    if knobs:
        assert max(expected.segments) > 1
    assert kept == expected.kept
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["tiny_qwen2_5vl", "tiny_qwen2vl"])
def test_uniform_runs_on_qwen(model):
    loaded = load_model(model, "cpu")
    batch = [Sample("v", "What moves?", "", [], video=clip((2, 2), 112))]
    pruner = make_pruner("fastvid", keep=0.3, protocol="uniform", dyseg_c=2)
    kept, _, logits = first_layer_run(loaded, prepare(loaded, batch, pruner), pruner)
    n_visual = sum(t * h * w for t, h, w in [seg.grid for seg in loaded.layout(prepare(loaded, batch, None))[0]])
    assert len(kept) == round(0.3 * n_visual) and torch.isfinite(logits).all()


def test_qwen_batch_matches_batch_of_one(qwen):
    loaded = qwen[0]
    batch = [Sample("v", "What moves?", "", [], video=clip((6, 6, 4), 168)),
             Sample("w", "Which object moves the most in this clip?", "", [], video=clip((2, 4, 2), 112))]
    batch_matches_alone(loaded, batch, make_pruner("fastvid", keep=0.3, dyseg_c=3))


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_batch_matches_batch_of_one(onevision, protocol):
    loaded = onevision[0]
    batch = [Sample("v", "What moves?", "", [], video=clip()),
             Sample("w", "Which object moves the most in this clip?", "", [], video=clip((2, 4, 2), 96))]
    together = batch_matches_alone(loaded, batch, make_pruner("fastvid", keep=0.3, protocol=protocol, dyseg_c=3))
    if protocol == "uniform":
        assert [len(kept) for kept in together[0]] == [round(0.3 * FRAMES * TOKENS)] * 2


def test_bad_settings_are_refused_in_one_line_before_loading():
    cases = [
        (dict(dyseg_c=0), r"prune.dyseg_c=0 is invalid"),
        (dict(dyseg_tau=1.5), r"prune.dyseg_tau=1.5 is invalid"),
        (dict(stprune_d=-0.1), r"prune.stprune_d=-0.1 is invalid"),
        (dict(dtm_p=0), r"prune.dtm_p=0 is invalid"),
        (dict(dtm_beta=2.0), r"prune.dtm_beta=2.0 is invalid"),
        (dict(dyseg_ignore=2.0), r"prune.dyseg_ignore=2.0 is invalid"),
        (dict(model="tiny_qwen2vl"), r"protocol=official: model family 'qwen2_vl' is not supported "
                                     r"\(supported: llava_onevision, qwen2_5_vl\)"),
        (dict(model="tiny_llava", protocol="uniform"), r"family 'llava' is not supported \(supported: "
                                                       r"llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl\)"),
        (dict(model="tiny_llava_onevision", dyseg_ignore=0.9), r"prune.dyseg_ignore=0.9 has no effect"),
        (dict(model="tiny_qwen2_5vl", protocol="uniform", dyseg_ignore=0.9), r"prune.dyseg_ignore=0.9 has no effect"),
        (dict(model="tiny_llava_onevision", prune_layers=[2]), r"must be \[0\]"),
    ]
    for knobs, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            make_pruner("fastvid", keep=0.2, **knobs)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"prunes videos only") as error:
        FastVID().check_inputs(videos=False)
    assert "\n" not in str(error.value)
    FastVID().check_inputs(videos=True)


def test_the_cli_runs_it_end_to_end(tmp_path):
    command = [sys.executable, "-m", "clse_exp", "model=tiny_llava_onevision", "prune=fastvid", "keep=0.25",
               "dataset=synthetic", "dataset.variant=video", "dataset.limit=2", "logger=none",
               "eval.reference=false", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    retention = json.loads((tmp_path / "summary.json").read_text())["retention"]
    assert retention["asked"] == 0.25 and retention["visual_tokens_in"] == 36  # 4 frames of 3 x 3
    # the official rule keeps int(9 * 0.25) = 2 tokens per frame: 8 of 36, flagged, with the reason logged
    assert retention["final"] == pytest.approx(8 / 36) and retention["budget_unreachable_samples"] == 2
    assert "int(P * keep) tokens per frame" in result.stdout + result.stderr


# ------------------------------------------------------------------------------ Qwen3-VL (the uniform port)
# The engine matches encoder inputs to layout segments one to one; Qwen3-VL's adapter hands one encoder input
# per temporal patch, its (1, h, w) segment.
def qwen3_video(seed: int = 60) -> Sample:
    return Sample("v", "What moves?", "", [], video=[noise_image(seed + i, 112) for i in range(8)])


def last_block_salience(loaded, inputs) -> torch.Tensor:
    """[4, 16] per temporal patch of the 8-frame video (64 rows of 16-px patches, 16 merged tokens): the frame's
    mean post-RoPE query of the last vision block attends each token's mean key (its 4 consecutive rows), softmax
    over the frame in float32, mean over heads (the Qwen port's salience)."""
    visual = loaded.model.model.visual
    block = visual.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"],
                                             rope=kwargs["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        loaded.model(**inputs)
    handle.remove()
    x, (cos, sin) = seen["x"], seen["rope"]
    heads = block.attn.num_heads
    q, k, _ = block.attn.qkv(block.norm1(x)).view(len(x), 3, heads, -1).unbind(1)  # [rows, heads, D]

    def rope(t):
        half = t.shape[-1] // 2
        turned = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t.float() * cos[:, None].float() + turned.float() * sin[:, None].float()

    q, k = rope(q).view(4, 64, heads, -1), rope(k).view(4, 16, 4, heads, -1).mean(2)  # frames, tokens, heads, D
    logits = torch.einsum("fhd,fphd->fhp", q.mean(1), k) / q.shape[-1] ** 0.5
    return torch.softmax(logits, dim=-1).mean(1)


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_qwen3_vl_port_keeps_the_last_vision_blocks_salient_tokens(keep):
    loaded = load_model("tiny_qwen3vl", "cpu")
    batch = [qwen3_video()]
    inputs = prepare(loaded, batch, None)
    assert inputs["video_grid_thw"].tolist() == [[4, 8, 8]]
    salience = last_block_salience(loaded, inputs)
    x = stock_inputs(loaded, inputs)
    # stprune_d=0: every kept token is salient, round(keep * 64) spread evenly, nothing merged
    pruner = make_pruner("fastvid", model="tiny_qwen3vl", keep=keep, protocol="uniform", stprune_d=0.0)
    kept, embeds, _ = first_layer_run(loaded, inputs, pruner)
    per_frame = round(keep * 64) // 4
    expected = sorted(16 * f + i for f in range(4) for i in salience[f].topk(per_frame).indices.tolist())
    assert sorted(kept) == expected
    visual = x.visual.tolist()
    rows = [i for i in range(x.embeds.shape[1]) if i not in visual or visual.index(i) in expected]
    torch.testing.assert_close(embeds, x.embeds[:, rows])  # unmerged input embeddings at the kept tokens
    # with the default d = 0.4, each frame's 8 - int(8 * 0.4) = 5 most salient tokens are among those kept
    pruner = make_pruner("fastvid", model="tiny_qwen3vl", keep=0.5, protocol="uniform")
    kept, _, _ = first_layer_run(loaded, inputs, pruner)
    assert len(kept) == 32
    assert {16 * f + i for f in range(4) for i in salience[f].topk(5).indices.tolist()} <= set(kept)


def test_qwen3_vl_batch_matches_batch_of_one():
    loaded = load_model("tiny_qwen3vl", "cpu")
    batch = [qwen3_video(), Sample("w", "Which object moves the most in this clip?", "", [], video=clip((2, 4, 2)))]
    together = batch_matches_alone(loaded, batch, make_pruner("fastvid", model="tiny_qwen3vl", keep=0.3,
                                                              protocol="uniform", dyseg_c=3))
    assert [len(kept) for kept in together[0]] == [round(0.3 * 64)] * 2


def test_official_is_refused_on_the_ported_families_in_one_line():
    for model, family in (("tiny_qwen2vl", "qwen2_vl"), ("tiny_qwen3vl", "qwen3_vl")):
        with pytest.raises(ConfigError, match=rf"protocol=official: model family '{family}' is not supported "
                           r"\(supported: llava_onevision, qwen2_5_vl\); protocol=uniform runs the port on "
                           "qwen2_vl, qwen3_vl$") as error:
            make_pruner("fastvid", model=model, keep=0.2)
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_cli_runs_the_qwen3_vl_port(tmp_path):
    command = [sys.executable, "-m", "clse_exp", "model=tiny_qwen3vl", "prune=fastvid", "keep=0.25",
               "protocol=uniform", "dataset=synthetic", "dataset.variant=video", "dataset.limit=2", "logger=none",
               "eval.reference=false", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    retention = json.loads((tmp_path / "summary.json").read_text())["retention"]
    n = retention["visual_tokens_in"]
    assert abs(retention["average"] - 0.25) <= 0.5 / n + 1e-9 and retention["budget_unreachable_samples"] == 0
