"""prune=downsample: Qwen inputs resized before the processor, other families' grids pooled at the LLM input.

Oracles: transformers' own smart_resize (the Qwen processor's arithmetic) for the grids, the stock model on
images resized by hand for the Qwen logits, hand-written adaptive-pooling windows and a hand-written batch-1
layer loop over the pooled sequence for LLaVA-1.5's shape (576 tokens), qwen2vl_vision_flops and
prefill_flops of the unreduced prompt for the costs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import official_oracles as oracle
import pytest
import torch
from helpers import greedy, noise_image, samples
from omegaconf import OmegaConf
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from clse_exp import load_model, make_pruner
from clse_exp.config import CONF_DIR
from clse_exp.data.sample import Sample
from clse_exp.data.synthetic import synthetic_dataset
from clse_exp.efficiency.accounting import run_costs
from clse_exp.efficiency.flops import prefill_flops, qwen2vl_vision_flops
from clse_exp.errors import ConfigError
from clse_exp.generation import decode, generate, prepare
from clse_exp.pruning.methods.downsample import pool_grid, scaled_grid, vtc_ratio
from clse_exp.runner import answer_batch

MIN_PIXELS, MAX_PIXELS = 3136, 50176  # conf/model/tiny_qwen2vl.yaml
WIDE = (300, 200)  # (W, H): smart_resize caps it at 168 x 252 px, a 6 x 9 merged grid


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny_qwen2vl", "cpu")


def wide_image(seed: int = 3) -> Image.Image:
    return noise_image(seed, 300).resize(WIDE)


def merged_grid(height: int, width: int) -> tuple[int, int]:
    """The processor's merged grid for an image, by transformers' own arithmetic."""
    h, w = smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS)
    return h // 28, w // 28


# ------------------------------------------------------------------------------------------ counts
def test_grid_sides_scale_by_the_square_root_of_keep():
    assert scaled_grid(24, 24, 0.25) == (12, 12)  # LLaVA-1.5: a 2 x 2 pool, 144 tokens
    assert scaled_grid(24, 24, 0.11) == (8, 8)  # 24 * 0.3317 = 7.96
    assert scaled_grid(24, 24, 0.33) == (14, 14)  # 13.79
    assert scaled_grid(6, 9, 0.25) == (3, 5)  # 4.5 rounds half up
    assert scaled_grid(2, 2, 0.01) == (1, 1)
    assert scaled_grid(8, 8, 0.3, nearest=True) == (4, 5)  # 20 cells, nearest 19.2 (16 and 25 are not)
    assert scaled_grid(6, 9, 0.25, nearest=True) == (3, 5)  # 12 and 15 tie at 1.5 from 13.5: 3/5 is nearer 6/9
    assert scaled_grid(7, 7, 0.25, nearest=True) == (3, 4)  # 12 of 12.25
    assert [vtc_ratio(k) for k in (0.25, 0.1111, 0.0625, 0.04, 0.01)] == [2, 3, 4, 5, 10]  # VTC-Bench's ratios
    assert vtc_ratio(0.3) == pytest.approx(1 / math.sqrt(0.3))


def test_pooling_matches_hand_written_adaptive_windows():
    t, h, w, rows, cols = 2, 5, 7, 3, 4
    tokens = torch.randn(t * h * w, 6, generator=torch.Generator().manual_seed(0))
    pooled, centres = pool_grid(tokens, t, h, w, rows, cols)
    grid = tokens.view(t, h, w, 6)
    expected, expected_centres = [], []
    for f in range(t):
        for i in range(rows):
            r0, r1 = (i * h) // rows, math.ceil((i + 1) * h / rows)
            for j in range(cols):
                c0, c1 = (j * w) // cols, math.ceil((j + 1) * w / cols)
                expected.append(grid[f, r0:r1, c0:c1].reshape(-1, 6).mean(0))
                expected_centres.append(f * h * w + ((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2)
    torch.testing.assert_close(pooled, torch.stack(expected))
    assert centres.tolist() == expected_centres


# ------------------------------------------------------------------------------------------ Qwen
@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_qwen_grid_is_the_budget_by_the_processors_arithmetic(qwen, protocol):
    batch = [Sample("w", "What is shown?", "", [wide_image()]), Sample("s", "Is it red?", "", [noise_image(1)])]
    pruner = make_pruner("downsample", keep=0.25, protocol=protocol)
    inputs = prepare(qwen, batch, pruner)
    with torch.no_grad(), pruner.attach(qwen.model):
        qwen.model(**inputs)
    wide, square = pruner.records
    assert merged_grid(200, 300) == (6, 9) and merged_grid(224, 224) == (8, 8)
    assert wide.original_grids == [[1, 6, 9]] and square.original_grids == [[1, 8, 8]]
    if protocol == "official":  # VTC: the processor-sized image // 2, then the processor's own rounding
        assert wide.grids == [[1, *merged_grid(168 // 2, 252 // 2)]] == [[1, 3, 4]]
    else:  # the nearest-count grid, resized to exactly 84 x 140 px
        assert wide.grids == [[1, 3, 5]]
    assert square.grids == [[1, 4, 4]]
    for record in (wide, square):
        fed = sum(t * h * w for t, h, w in record.grids)
        original = sum(t * h * w for t, h, w in record.original_grids)
        assert record.n_visual == original
        assert record.retention == {"average": fed / original, "final": fed / original}
        assert record.kept == list(range(fed)) and record.kept_per_stage == [fed]  # nothing cut in the LLM
    assert int(inputs["image_grid_thw"].prod(1).sum()) // 4 == 12 + (3 if protocol == "uniform" else 0) + 16


def test_qwen_run_is_the_stock_model_on_the_resized_image(qwen):
    sample = Sample("w", "What is shown?", "", [wide_image()])
    pruner = make_pruner("downsample", keep=0.25, protocol="uniform")
    inputs = prepare(qwen, [sample], pruner)
    by_hand = Sample("w", "What is shown?", "", [wide_image().resize((5 * 28, 3 * 28), Image.BICUBIC)])
    stock_inputs = qwen.prepare([by_hand])
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    with torch.no_grad():
        stock = qwen.model(**stock_inputs).logits
        with pruner.attach(qwen.model):
            pruned = qwen.model(**inputs).logits
    torch.testing.assert_close(pruned, stock, atol=1e-5, rtol=1e-5)


def test_qwen_costs_are_counted_against_the_unreduced_input(qwen):
    batch = synthetic_dataset(1)
    pruner = make_pruner("downsample", keep=0.25, protocol="uniform")
    records = answer_batch(qwen, batch, 3, pruner, reference=True, task="synthetic")
    vision = qwen.model.config.vision_config
    for sample, record in zip(batch, records, strict=True):
        stock = qwen.prepare([sample])
        n_prompt = int(stock["attention_mask"].sum())
        assert record["n_prompt"] == n_prompt and record["n_visual"] == 64
        assert record["original_grids"] == [[1, 8, 8]] and record["grids"] == [[1, 4, 4]]
        assert record["prompt_tokens"] == n_prompt - 48
        assert record["vision_flops"] == qwen2vl_vision_flops(vision, [(1, 8, 8)])
        assert record["vision_flops_unpruned"] == qwen2vl_vision_flops(vision, [(1, 16, 16)])
        assert record["prefill_flops_unpruned"] == prefill_flops(qwen.model.config, [n_prompt] * 28).flops
        assert record["prefill_flops"] == prefill_flops(qwen.model.config, [n_prompt - 48] * 28).flops
        assert record["retention"] == {"average": 0.25, "final": 0.25}
        expected = decode(qwen, generate(qwen, stock, 3).sequences, stock["input_ids"].shape[1])
        assert record["reference_prediction"] == expected[0]  # the unpruned model saw the full image
    costs = run_costs(records)
    patches = (8 * 8, 16 * 16)  # vision FLOPs fall by more than 4x: attention is quadratic in the patches
    assert costs["vision_flops_ratio"] == pytest.approx(qwen2vl_vision_flops(vision, [(1, 8, 8)]) /
                                                        qwen2vl_vision_flops(vision, [(1, 16, 16)]))
    assert costs["vision_flops_ratio"] < patches[0] / patches[1]


def test_qwen_video_frames_are_resized_and_time_is_kept(qwen):
    video = Sample("v", "What changes?", "", [], video=[noise_image(i) for i in range(4)])
    pruner = make_pruner("downsample", keep=0.25)
    inputs = prepare(qwen, [video], pruner)
    with torch.no_grad(), pruner.attach(qwen.model):
        qwen.model(**inputs)
    record = pruner.records[0]
    assert record.original_grids == [[2, 8, 8]] and record.grids == [[2, 4, 4]]
    assert record.retention["final"] == 0.25


def test_keep_one_is_the_identity(qwen, tiny_llava):
    for loaded in (qwen, tiny_llava):
        batch = samples(2)
        pruner = make_pruner("downsample", keep=1.0)
        assert pruner.prepare_samples(loaded, batch) is batch
        inputs = loaded.prepare(batch)
        valid = inputs["attention_mask"].bool()
        with torch.no_grad():
            stock = loaded.model(**inputs).logits
            with pruner.attach(loaded.model):
                pruned = loaded.model(**inputs).logits
        torch.testing.assert_close(pruned[valid], stock[valid], atol=1e-5, rtol=1e-5)


# test_engine covers tiny_llava in the default suite
@pytest.mark.parametrize("name", ["qwen", pytest.param("tiny_llava", marks=pytest.mark.slow)])
def test_batch_of_three_equals_batch_of_one(name, request):
    loaded = request.getfixturevalue(name)
    batch = samples(3, images_per_sample=(1, 2, 1), sizes=(224, 168, 280))
    pruner = make_pruner("downsample", keep=0.3)
    tokens, scores = greedy(loaded, prepare(loaded, batch, pruner), pruner, steps=2)
    together = [record.as_dict() for record in pruner.records]
    for i, sample in enumerate(batch):
        alone_tokens, alone_scores = greedy(loaded, prepare(loaded, [sample], pruner), pruner, steps=2)
        assert pruner.records[0].as_dict() == together[i]
        assert torch.equal(tokens[i], alone_tokens[0])
        torch.testing.assert_close(scores[:, i], alone_scores[:, 0], atol=2e-4, rtol=1e-4)


def test_qwen_inputs_not_prepared_by_the_pruner_fail_loudly(qwen):
    batch = samples(3)
    pruner = make_pruner("downsample", keep=0.25)
    with torch.no_grad(), pruner.attach(qwen.model), pytest.raises(RuntimeError, match="prepare"):
        qwen.model(**qwen.prepare(batch))
    pruner.prepare_samples(qwen, batch)
    with torch.no_grad(), pruner.attach(qwen.model), pytest.raises(RuntimeError, match="last prepared"):
        qwen.model(**qwen.prepare(batch[:1]))


def test_a_min_pixels_that_would_enlarge_the_resized_image_back_is_refused():
    """With min_pixels at the unreduced area the processor would undo the resize (retention ~1, quietly)."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_qwen2vl.yaml")
    cfg.min_pixels = 168 * 252  # the wide image's processor-sized area
    loaded = load_model(cfg, "cpu")
    sample = Sample("s", "What is it?", "", [wide_image()])
    with pytest.raises(ConfigError, match=r"126x84 px, below the processor's min_pixels=42336.*model.min_pixels"):
        prepare(loaded, [sample], make_pruner("downsample", keep=0.25, budget="final"))
    # exactly the halved image's area: allowed (and the process's model cache must not hand back the processor
    # built with the other min_pixels)
    cfg.min_pixels = 84 * 126
    fed = prepare(load_model(cfg, "cpu"), [sample], make_pruner("downsample", keep=0.25, budget="final"))
    h, w = smart_resize(84, 126, 28, 84 * 126, MAX_PIXELS)
    assert fed["image_grid_thw"].tolist() == [[1, h // 14, w // 14]] and h * w < 168 * 252


# ------------------------------------------------------------------------------------------ LLaVA
@pytest.fixture(scope="module")
def llava15():
    loaded = load_model("tiny_llava15", "cpu")  # LLaVA-1.5's shape: 32 layers, 24 x 24 visual tokens
    loaded.model.set_attn_implementation("eager")
    inputs = loaded.prepare([Sample("s", "What colour is the shape in the top left cell?", "", [noise_image(7, 336)])])
    return loaded, inputs, oracle.stock_inputs(loaded, inputs)


def hand_pooled(grid: torch.Tensor, side: int) -> tuple[torch.Tensor, list[int]]:
    """[24, 24, C] -> [side * side, C] window means and each window's centre index (row-major)."""
    n = grid.shape[0]
    rows, centres = [], []
    for i in range(side):
        r0, r1 = (i * n) // side, -(-(i + 1) * n // side)
        for j in range(side):
            c0, c1 = (j * n) // side, -(-(j + 1) * n // side)
            rows.append(grid[r0:r1, c0:c1].mean((0, 1)))
            centres.append(((r0 + r1 - 1) // 2) * n + (c0 + c1 - 1) // 2)
    return torch.stack(rows), centres


def hand_forward(loaded, x: oracle.Inputs, side: int, protocol: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled rows and the last logits of a batch-1 layer loop over the pooled sequence: fed as a shorter
    sequence (official) or at the window centres' original positions (uniform)."""
    pooled, centres = hand_pooled(x.embeds[0, x.visual].view(24, 24, -1), side)
    start, stop = int(x.visual[0]), int(x.visual[-1]) + 1
    hidden = torch.cat([x.embeds[:, :start], pooled[None], x.embeds[:, stop:]], 1)
    if protocol == "official":
        positions = torch.arange(hidden.shape[1])
    else:
        after = torch.arange(stop, x.embeds.shape[1])
        positions = torch.cat([torch.arange(start), start + torch.tensor(centres), after])
    cos, sin = loaded.adapter.text_model(loaded.model).rotary_emb(hidden, positions[None])
    for layer in loaded.adapter.decoder_layers(loaded.model):
        hidden = oracle.run_layer(layer, hidden, cos, sin, positions[None])
    return pooled, oracle.finish(loaded, hidden)


@pytest.mark.parametrize(("keep", "side", "protocol"), [(0.25, 12, "official"), (0.33, 14, "uniform")])
def test_llava_pooled_grid_and_logits_match_a_hand_written_forward(llava15, keep, side, protocol):
    loaded, inputs, x = llava15
    assert x.n_visual == 576
    pruner = make_pruner("downsample", keep=keep, budget="final", protocol=protocol)
    seen = {}
    layer0 = loaded.adapter.decoder_layers(loaded.model)[0]
    with torch.no_grad(), pruner.attach(loaded.model):
        handle = layer0.register_forward_pre_hook(lambda _m, args: seen.update(hidden=args[0]))
        logits = loaded.model(**inputs).logits[0, -1]
        handle.remove()
    pooled, expected = hand_forward(loaded, x, side, protocol)
    start = int(x.visual[0])
    torch.testing.assert_close(seen["hidden"][0, start : start + side * side], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    record = pruner.records[0]
    assert record.n_visual == 576 and record.kept_per_stage == [side * side]
    assert record.retention["final"] == side * side / 576
    assert pruner.trace[0]["merged"] == [side * side]


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_qwen2vl", "tiny_llava", None])
def test_cli_end_to_end(model, tmp_path):
    args = [sys.executable, "-m", "clse_exp", "prune=downsample", "keep=0.25", "dataset.limit=4",
            f"hydra.run.dir={tmp_path}", *([f"model={model}"] if model else [])]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_samples"] == 4
    assert 0.2 < summary["retention"]["final"] < 0.3
    assert 0 < summary["efficiency"]["flops_ratio"] < 0.7
    if model != "tiny_llava":  # Qwen: the vision tower ran on the smaller grid
        assert summary["efficiency"]["vision_flops_ratio"] < 0.25
