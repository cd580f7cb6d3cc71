"""HoliTom: the official LLaVA-OneVision rule's windows, kept tokens (outer merge and inner merge), merged embeddings
and logits against an independent transcription (tests/oracle_holitom.py) on a tiny seeded LLaVA-OneVision (8 frames
of 6 x 6 pooled tokens), the official SigLIP signal as the adapter exposes it (alone and per video in a batch),
the uniform protocol's exact counts, batching, refusals and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import oracle_holitom as oracle
import pytest
import torch
from helpers import batch_matches_alone, cached_vs_recomputed, first_layer_run, noise_image
from official_oracles import stock_inputs
from omegaconf import OmegaConf
from PIL import Image

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.methods.base import Layers, ModelFacts
from clse_exp.pruning.methods.holitom import HoliTom, pool_like_frames, sequential_average, siglip_attention

FRAMES = 8
TOKENS = 36  # 6 x 6 pooled tokens per frame at image_size 168
DEPTH = 28
INNER = 18  # the official HOLITOM_k on 28 layers


def clip(groups: tuple[int, ...] = (3, 3, 2), size: int = 112) -> list:
    """Groups of frames sharing a noise image with a changing corner: partly static windows."""
    frames = []
    for g, count in enumerate(groups):
        base = np.array(noise_image(60 + g, size))
        for i in range(count):
            frame = base.copy()
            frame[:40, :40] = np.random.default_rng(100 * g + i).integers(0, 256, (40, 40, 3))
            frames.append(Image.fromarray(frame))
    return frames


@pytest.fixture(scope="module")
def onevision():
    cfg = OmegaConf.load("clse_exp/conf/model/tiny_llava_onevision.yaml")
    cfg.tiny.image_size = 168
    loaded = load_model(cfg, "cpu")
    inputs = prepare(loaded, [Sample("v", "What moves?", "", [], video=clip())], None)
    return loaded, inputs, stock_inputs(loaded, inputs)


def jitter(n_visual: int, seed: int = 0):
    """The engine's per-sample generator at stage 0 (seed, stage 0, n visual tokens), drawn in call order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n_visual)
    return lambda shape: torch.rand(shape, generator=generator)


def retain(keep: float, stages: tuple[int, ...], r: float = 0.5) -> float:
    """RETAIN_RATIO standing for `keep` (layer-averaged): the outer stage runs before every layer, the inner cut
    keeps 1 - r from layer K on."""
    return keep if len(stages) == 1 else keep * DEPTH / (stages[1] + (DEPTH - stages[1]) * (1 - r))


def run_with_inner(loaded, inputs, pruner):
    """(kept per stage, first decoder input, last logits) of a pruned forward."""
    kept, embeds, logits = first_layer_run(loaded, inputs, pruner)
    return [stage["kept"][0] for stage in pruner.trace], embeds, logits


CASES = [  # keep, knobs, layers: official defaults; partial windows with clustering of dynamic tokens; w/o M
    (0.25, {}, (0, INNER)),
    (0.3, {"tau": 0.995, "d": 0.5, "k": 3, "beta": 0.3, "llm_ratio": 0.4}, (0, 5)),
    (0.15, {"tau": 0.99, "max_window_size": 2}, (0,)),
]


@pytest.mark.parametrize(("keep", "knobs", "stages"), CASES)
def test_official_protocol_matches_the_official_code(onevision, keep, knobs, stages):
    loaded, inputs, x = onevision
    pruner = make_pruner("holitom", keep=keep, prune_layers=list(stages), **knobs)
    kept, embeds, logits = run_with_inner(loaded, inputs, pruner)
    outer_knobs = {key: knobs[key] for key in ("tau", "d", "k", "beta", "max_window_size") if key in knobs}
    outer_knobs = {("D" if key == "d" else "K" if key == "k" else key): v for key, v in outer_knobs.items()}
    expected = oracle.holitom(loaded, x, FRAMES, oracle.siglip_attention(loaded, inputs["pixel_values_videos"]),
                              retain(keep, stages, knobs.get("llm_ratio", 0.5)),
                              k_layer=stages[1] if len(stages) > 1 else None, r=knobs.get("llm_ratio", 0.5),
                              rand=jitter(FRAMES * TOKENS), newline_candidate=False, gaps=False, **outer_knobs)
    assert any(end > s for s, end in expected.windows) and any(end == s for s, end in expected.windows) or not knobs
    assert kept[0] == expected.outer  # in the official sequence order (positions are compacted)
    torch.testing.assert_close(embeds, expected.embeds, atol=1e-4, rtol=1e-4)
    if len(stages) > 1:
        assert sorted(kept[1]) == expected.inner
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_literal_official_positions_differ_only_after_the_inner_cut(onevision):
    """The literal code (newline a candidate, gaps after layer K) runs; without the inner cut it is the same."""
    loaded, inputs, x = onevision
    attn = oracle.siglip_attention(loaded, inputs["pixel_values_videos"])
    outer_only = [oracle.holitom(loaded, x, FRAMES, attn, 0.3, rand=jitter(FRAMES * TOKENS), gaps=g) for g in (0, 1)]
    torch.testing.assert_close(outer_only[0].logits, outer_only[1].logits)
    literal = oracle.holitom(loaded, x, FRAMES, attn, 0.3, k_layer=INNER, rand=jitter(FRAMES * TOKENS))
    assert torch.isfinite(literal.logits).all() and literal.inner is not None


def test_siglip_signal_matches_the_towers_own_attention(onevision):
    loaded, inputs, _ = onevision
    pixels = inputs["pixel_values_videos"]
    expected = oracle.siglip_attention(loaded, pixels)
    layer = loaded.model.model.vision_tower.encoder.layers[-1]
    with torch.no_grad():
        got = pool_like_frames(siglip_attention(layer, oracle.last_layer_input(loaded, pixels)))
    assert got.shape == (FRAMES, TOKENS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_the_adapters_encoder_signal_is_official_per_video_in_a_batch(onevision):
    """Two different videos in one batch, read through the real adapter: the engine regroups the tower's per-frame
    rows into one item per video, so each sample keeps the tokens and gives the logits of the oracle on its video
    alone (with the other video's signal the oracle keeps other tokens, so a mix-up would show)."""
    loaded = onevision[0]
    samples = [Sample("v", "What moves?", "", [], video=clip()),
               Sample("w", "Which object moves the most in this clip?", "", [], video=clip((2, 4, 2), 96))]
    keep, stages = 0.25, (0, INNER)
    pruner = make_pruner("holitom", keep=keep, prune_layers=list(stages))
    with torch.no_grad(), pruner.attach(loaded.model):
        logits = loaded.model(**prepare(loaded, samples, pruner)).logits[:, -1]
    kept = [stage["kept"] for stage in pruner.trace]
    alone = [prepare(loaded, [sample], None) for sample in samples]
    attns = [oracle.siglip_attention(loaded, inputs["pixel_values_videos"]) for inputs in alone]
    for b, inputs in enumerate(alone):
        x = stock_inputs(loaded, inputs)
        expected = oracle.holitom(loaded, x, FRAMES, attns[b], retain(keep, stages), k_layer=INNER,
                                  rand=jitter(FRAMES * TOKENS), newline_candidate=False, gaps=False)
        assert kept[0][b] == expected.outer, f"sample {b}"
        assert sorted(kept[1][b]) == expected.inner, f"sample {b}"
        torch.testing.assert_close(logits[b], expected.logits, atol=2e-4, rtol=1e-4)
        start = int(x.visual[0])
        video = x.embeds[0, start : start + FRAMES * TOKENS].view(FRAMES, TOKENS, -1)
        _, swapped, _ = oracle.outer(video, attns[1 - b], retain(keep, stages), rand=jitter(FRAMES * TOKENS))
        assert swapped != expected.outer, f"sample {b}: the other video's signal keeps the same tokens"


def test_sequential_average_is_the_official_loop():
    torch.manual_seed(0)
    kept, pruned = torch.randn(3, 5), torch.randn(6, 5)
    target = torch.tensor([2, 0, 2, 2, 1, 0])
    expected = kept.clone()
    for i, j in enumerate(target.tolist()):
        expected[j] = (expected[j] + pruned[i]) / 2
    torch.testing.assert_close(sequential_average(kept, pruned, target), expected)


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.6, 0.95])
@pytest.mark.parametrize("knobs", [{}, {"tau": 0.995, "d": 0.5}])
def test_uniform_keeps_exact_counts_at_original_positions(onevision, keep, knobs):
    loaded, inputs, x = onevision
    n = FRAMES * TOKENS
    single = make_pruner("holitom", keep=keep, protocol="uniform", budget="final", prune_layers=[0], **knobs)
    kept, embeds, _ = first_layer_run(loaded, inputs, single)
    assert len(kept) == len(set(kept)) == round(keep * n)
    assert embeds.shape[1] == x.embeds.shape[1] - n + len(kept)  # the newline stays
    assert single.rules.prefill == "original" and single.rules.decode == "original"
    both = make_pruner("holitom", keep=keep, protocol="uniform", **knobs)
    kept, _, _ = run_with_inner(loaded, inputs, both)
    assert [len(k) for k in kept] == list(both.plan(n).values())


def test_uniform_keep_all_is_identity(onevision):
    loaded, inputs, _ = onevision
    pruner = make_pruner("holitom", keep=1.0, protocol="uniform", prune_layers=[0, 4])
    with torch.no_grad():
        stock = loaded.model(**inputs).logits
        with pruner.attach(loaded.model):
            pruned = loaded.model(**prepare(loaded, [Sample("v", "What moves?", "", [], video=clip())], pruner)).logits
    torch.testing.assert_close(pruned, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_batch_matches_batch_of_one(onevision, protocol):
    loaded = onevision[0]
    batch = [Sample("v", "What moves?", "", [], video=clip()),
             Sample("w", "Which object moves the most in this clip?", "", [], video=clip((2, 4, 2), 96))]
    pruner = make_pruner("holitom", keep=0.3, protocol=protocol, prune_layers=[0, 4], tau=0.9, d=0.3)
    together = batch_matches_alone(loaded, batch, pruner)
    if protocol == "uniform":
        assert [len(kept) for kept in together[0]] == [pruner.plan(FRAMES * TOKENS)[0]] * 2


@pytest.mark.slow
def test_cached_decode_matches_recomputation(onevision):
    loaded = onevision[0]
    inputs = prepare(loaded, [Sample("v", "What moves?", "", [], video=clip())], None)
    cached, recomputed = cached_vs_recomputed(loaded, inputs, make_pruner("holitom", keep=0.3, prune_layers=[0, 4]))
    torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=1e-4)


def test_bad_settings_are_refused_in_one_line_before_loading():
    cases = [
        (dict(tau=1.5), r"prune.tau=1.5 is invalid"),
        (dict(beta=-0.1), r"prune.beta=-0.1 is invalid"),
        (dict(d=2.0), r"prune.d=2.0 is invalid"),
        (dict(k=0), r"prune.k=0 is invalid"),
        (dict(max_window_size=0), r"prune.max_window_size=0 is invalid"),
        (dict(llm_ratio=1.0), r"prune.llm_ratio=1.0 is invalid"),
        (dict(model="tiny_qwen2_5vl"), r"model family 'qwen2_5_vl' is not supported \(supported: llava_onevision\)"),
        (dict(model="tiny_llava", protocol="uniform"), r"model family 'llava' is not supported"),
        (dict(model="tiny_llava_onevision", prune_layers=[2]), r"must be \[0\] or \[0, K\]"),
        (dict(model="tiny_llava_onevision", prune_layers=[0, 3, 9]), r"must be \[0\] or \[0, K\]"),
    ]
    for knobs, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            make_pruner("holitom", keep=0.2, **knobs)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"merges videos only") as error:
        HoliTom().check_inputs(videos=False)
    assert "\n" not in str(error.value)
    HoliTom().check_inputs(videos=True)


def test_the_cli_runs_it_end_to_end(tmp_path):
    command = [sys.executable, "-m", "clse_exp", "model=tiny_llava_onevision", "prune=holitom", "keep=0.25",
               "dataset=synthetic", "dataset.variant=video", "dataset.limit=2", "logger=none",
               "eval.reference=false", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = " ".join([result.stdout, result.stderr, *(f.read_text() for f in tmp_path.rglob("*.log"))]).lower()
    assert "stand-in" not in log and "embedding_attention" not in log  # the official SigLIP signal, no notice
    assert HoliTom().run_notice(Layers(0, (0, INNER)), ModelFacts("llava_onevision", DEPTH, False)) is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "retention" in json.dumps(summary)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(record["n_visual"] for record in records)


def test_a_sample_with_an_image_besides_the_video_is_refused_in_one_line(onevision):
    """The OneVision tower also encodes the image's crops, which no video segment can take: one ConfigError."""
    loaded = onevision[0]
    sample = Sample("m", "What moves?", "", [noise_image(5, 168)], video=clip())
    pruner = make_pruner("holitom", keep=0.25)
    with pytest.raises(ConfigError, match=r"prune=holitom reads the vision encoder.*also holds image inputs") as err:
        with torch.no_grad(), pruner.attach(loaded.model):
            loaded.model(**prepare(loaded, [sample], pruner))
    assert "\n" not in str(err.value)
