"""protocol=official keeps the official code's tokens at every stage, with the official logits.

The oracles (tests/official_oracles.py) transcribe each official repository's rule into a hand-written
batch-1 layer loop over the same stock layers; see the citations there. Models are tiny and seeded but
have the published shapes: LLaVA-1.5 (32 layers, 24 x 24 = 576 visual tokens, as many KV heads as heads),
Qwen2-VL (28 layers, dynamic grids) and Video-LLaVA (32 layers, 8 frames x 16 x 16 = 2048 tokens).
"""

from __future__ import annotations

import official_oracles as oracle
import pytest
import torch
from helpers import QUESTION, noise_image, slow_except

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample


def ours(loaded, inputs, pruner) -> tuple[list[list[int]], torch.Tensor]:
    with torch.no_grad(), pruner.attach(loaded.model):
        logits = loaded.model(**inputs).logits[0, -1]
    return [stage["kept"][0] for stage in pruner.trace], logits


def check(loaded, inputs, pruner, expected: oracle.Result, counts: list[int]) -> None:
    kept, logits = ours(loaded, inputs, pruner)
    assert [len(stage) for stage in kept] == counts
    assert kept == expected.kept
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("reduction", "kept"), slow_except([(0.5, 288), (0.75, 144)], {(0.5, 288)}))
def test_fastv(llava576, reduction, kept):
    loaded, inputs, x = llava576
    assert x.n_visual == 576
    check(loaded, inputs, make_pruner("fastv", keep=1 - reduction, budget="final"),
          oracle.fastv(loaded, x, k_layer=2, kept=kept), [kept])


@pytest.mark.parametrize(("lam", "counts"), slow_except([(0.5, [288, 144, 72]), (0.4, [230, 92, 36])],
                                                       [(0.5, [288, 144, 72])]))
def test_pdrop(llava576, lam, counts):
    loaded, inputs, x = llava576
    pruner = make_pruner("pdrop", keep=lam**3, budget="final")
    check(loaded, inputs, pruner, oracle.pdrop(loaded, x, [8, 16, 24], [lam, lam**2, lam**3]), counts)
    assert pruner.layers.prune_layers == (8, 16, 24)


@pytest.mark.parametrize(("budget", "kept"), slow_except([(128, 132), (64, 68)], {(128, 132)}))
def test_dart(llava576, budget, kept):
    loaded, inputs, x = llava576
    check(loaded, inputs, make_pruner("dart", keep=budget / 576, budget="final"),
          oracle.dart(loaded, x, k_layer=2, budget=budget), [kept])


@pytest.mark.parametrize(("ratio", "kept"), slow_except([(0.098, 56), (0.25, 144)], {(0.098, 56)}))
def test_divprune(llava576, ratio, kept):
    loaded, inputs, x = llava576
    check(loaded, inputs, make_pruner("divprune", keep=ratio, budget="final"), oracle.divprune(loaded, x, ratio),
          [kept])


@pytest.mark.parametrize(("average", "counts"), slow_except(
    [(192, [330, 210, 62]), (128, [220, 140, 41]), (64, [110, 70, 20])], [(192, [330, 210, 62])]))
def test_clse_llava(llava576, average, counts):
    loaded, inputs, x = llava576
    pruner = make_pruner("clse", keep=average / 576)
    expected = oracle.clse(loaded, x, reference=0, k_layers=[1, 11, 21], counts=counts, grid=(1, 24, 24))
    check(loaded, inputs, pruner, expected, counts)
    assert pruner.rules.kv_policy == "crop"


@pytest.mark.parametrize(("side", "ratio", "fractions"), slow_except([
    (280, 0.334, (0.57, 0.36, 0.098)), (280, 0.112, (0.19, 0.12, 0.034)), (448, 0.223, (0.38, 0.24, 0.066)),
    (448, 0.05, (0.05 * 1.71, 0.05 * 1.08, 0.05 * 0.294)),
], {(280, 0.334, (0.57, 0.36, 0.098))}))
def test_clse_qwen2vl(side, ratio, fractions):
    """zjubinchen/CLSE@cfc9710 Qwen2VL/clse_qwen2vl_model.py:122-149: per-stage max(1, int(n * fraction)) of the
    ORIGINAL count (100 * 0.57 truncates to 56), a stage that would not reduce is skipped."""
    loaded = load_model({"name": "tiny_qwen2vl_big", "family": "qwen2_vl", "path": None, "dtype": "float32",
                         "attn_implementation": "eager", "min_pixels": 3136, "max_pixels": 448 * 448,
                         "tiny": {"num_layers": 28, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                                  "num_kv_heads": 2, "vision_depth": 2, "seed": 0}}, "cpu")
    loaded.model.set_attn_implementation("eager")
    inputs = loaded.prepare([Sample("s", QUESTION, "", [noise_image(3, side)])])
    x = oracle.stock_inputs(loaded, inputs)
    counts = [max(1, int(x.n_visual * f)) for f in fractions]
    side_tokens = side // 28
    expected = oracle.clse(loaded, x, reference=0, k_layers=[1, 10, 19], counts=counts,
                           grid=(1, side_tokens, side_tokens))
    check(loaded, inputs, make_pruner("clse", keep=ratio), expected, counts)


@pytest.mark.slow
def test_clse_video_llava():
    """zjubinchen/CLSE video@09a2984: one stage L=2, K=3, KEEP_TOKEN=194 of 2048, per-frame 2-D spectrum
    whose Gaussian adds 1e-6 to 2 sigma^2. transformers' Video-LLaVA also feeds each frame's CLS token (8 more
    tokens than the official code saw); they are left unpruned."""
    loaded = load_model({"name": "tiny_video_llava_224", "family": "video_llava", "path": None,
                         "dtype": "float32", "attn_implementation": "eager",
                         "tiny": {"num_layers": 32, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                                  "num_kv_heads": 4, "vision_depth": 2, "image_size": 224, "seed": 0}}, "cpu")
    loaded.model.set_attn_implementation("eager")
    frames = [noise_image(20 + i, 224) for i in range(8)]
    inputs = loaded.prepare([Sample("v", "What happens in the video?", "", [], video=frames)])
    x = oracle.stock_inputs(loaded, inputs, frame_tokens=257)
    assert x.n_visual == 2048
    expected = oracle.clse(loaded, x, reference=2, k_layers=[3], counts=[194], grid=(8, 16, 16), eps=1e-6)
    check(loaded, inputs, make_pruner("clse", keep=194 / 2048, budget="final"), expected, [194])


@pytest.mark.parametrize("method", slow_except(["fastv", "pdrop", "dart", "divprune", "clse"], {"dart", "pdrop"}))
def test_uniform_differs_where_the_official_rule_does(llava576, method):
    """Switching protocol=uniform restores the controlled rules; where the official rule changes counts,
    positions or visit order, the kept sets or logits differ."""
    loaded, inputs, _ = llava576
    keep = {"fastv": 0.5, "pdrop": 0.125, "dart": 128 / 576, "divprune": 0.25, "clse": 1 / 3}[method]
    budget = "average" if method == "clse" else "final"
    official = ours(loaded, inputs, make_pruner(method, keep=keep, budget=budget))
    uniform = ours(loaded, inputs, make_pruner(method, keep=keep, budget=budget, protocol="uniform"))
    if method == "fastv":  # FastV's official rules are the uniform ones
        assert official[0] == uniform[0]
        torch.testing.assert_close(official[1], uniform[1])
    elif method == "dart":  # 4 + 8 * (128 // 8) = 132 officially, exactly 128 under uniform
        assert [len(k) for k in official[0]] == [132] and [len(k) for k in uniform[0]] == [128]
    else:  # renumbered positions (PDrop, DivPrune) or table counts (CLSE)
        assert official[0] != uniform[0] or not torch.allclose(official[1], uniform[1], atol=1e-4)
