"""HoliTom selects for the whole batch at once: every sample of a batch of different videos (different sizes, and
on Qwen2-VL different frame counts, so different windows, counts and clip shapes) keeps exactly the tokens and
merged rows it keeps when asked alone on the same stage inputs, at both stages, on LLaVA-OneVision and Qwen2-VL;
and the prefill costs the same kernels and syncs at batch 1 and 4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import batch_matches_alone, noise_image
from PIL import Image

from clse_exp import bench, load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.generation import prepare


def video(groups: tuple[int, ...], size: int, seed: int) -> list[Image.Image]:
    """Groups of frames sharing a noise image, each frame with a changing corner: partly static windows."""
    frames = []
    for g, count in enumerate(groups):
        base = np.array(noise_image(seed + g, size))
        for i in range(count):
            frame = base.copy()
            frame[: size // 3, : size // 3] = np.random.default_rng(seed * 100 + 10 * g + i).integers(
                0, 256, (size // 3, size // 3, 3))
            frames.append(Image.fromarray(frame))
    return frames


def videos(sizes: tuple[int, int], second: tuple[int, ...]) -> list[Sample]:
    """Three samples: 8 frames in three groups, `second`'s groups, 8 frames in two (another size)."""
    return [Sample("a", "What moves?", "", [], video=video((3, 3, 2), sizes[0], 60)),
            Sample("b", "Which object moves the most in this clip?", "", [], video=video(second, sizes[0], 70)),
            Sample("c", "Is anything static?", "", [], video=video((5, 3), sizes[1], 80))]


@pytest.fixture(scope="module")
def onevision():
    return load_model("tiny_llava_onevision", "cpu")


@pytest.fixture(scope="module")
def qwen2vl():
    return load_model("tiny_qwen2vl", "cpu")


def alone_on_the_same_inputs(loaded, samples, pruner) -> list[int]:
    """Run the batch; at every stage ask each sample alone on the stage's own inputs (the other samples keep
    everything) and check its kept positions and merged rows are exactly its row of the batch's choice. Returns
    the stages' layers."""
    method = pruner.method
    batched = method.select_batch
    layers = []

    def checked(ctx, budgets):
        choice = batched(ctx, budgets)
        if any(k is None for k in budgets):  # the per-sample call below (select asks the batched form)
            return choice
        layers.append(ctx.layer)
        for b, k in enumerate(budgets):
            alone = method.select(ctx, b, k)
            count = choice.counts[b]
            assert count == len(alone.order), (ctx.layer, b)
            assert torch.equal(choice.order[b, :count], alone.order), (ctx.layer, b)
            assert torch.equal(choice.hidden[b, :count], alone.hidden), (ctx.layer, b)
        return choice

    method.select_batch = checked
    with torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**prepare(loaded, samples, pruner))
    return layers


CASES = [  # protocol, knobs: official defaults; clustered dynamic tokens and a lower tau (more static windows)
    ("official", {}),
    ("official", {"tau": 0.9, "d": 0.4, "k": 3}),
    ("uniform", {"tau": 0.9, "d": 0.3}),
]


@pytest.mark.parametrize(("protocol", "knobs"), CASES)
def test_onevision_batch_rows_are_each_sample_alone(onevision, protocol, knobs):
    pruner = make_pruner("holitom", keep=0.3, protocol=protocol, prune_layers=[0, 3], **knobs)
    assert alone_on_the_same_inputs(onevision, videos((112, 96), (2, 4, 2)), pruner) == [0, 3]


def test_qwen2vl_batch_rows_are_each_sample_alone(qwen2vl):
    pruner = make_pruner("holitom", keep=0.3, protocol="uniform", prune_layers=[0, 2], tau=0.9, d=0.3)
    assert alone_on_the_same_inputs(qwen2vl, videos((112, 84), (2, 2)), pruner) == [0, 2]


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_onevision_batch_of_different_videos_matches_batch_of_one(onevision, protocol):
    pruner = make_pruner("holitom", keep=0.3, protocol=protocol, prune_layers=[0, 3], tau=0.9)
    together = batch_matches_alone(onevision, videos((112, 96), (2, 4, 2)), pruner)
    assert len({len(kept) for kept in together[0]}) > 1 or protocol == "uniform"


def test_qwen2vl_batch_of_different_sizes_matches_batch_of_one(qwen2vl):
    pruner = make_pruner("holitom", keep=0.3, protocol="uniform", prune_layers=[0, 2], tau=0.9, d=0.3)
    batch_matches_alone(qwen2vl, videos((112, 84), (2, 2)), pruner)


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_prefill_costs_do_not_grow_with_the_batch(onevision, protocol):
    """Different videos of one shape (some with static windows, some without): one read, one upload and the same
    kernels (within 1%) at batch 1 and 4."""
    counts = {}
    for batch in (1, 4):
        samples = [Sample(f"v{b}", "What moves?", "", [], video=video((4, 4) if b % 2 else (1,) * 8, 112, 90 + b))
                   for b in range(batch)]
        pruner = make_pruner("holitom", keep=0.3, protocol=protocol)
        counts[batch] = bench.count_generate(onevision, prepare(onevision, samples, pruner), pruner, 2)
    assert counts[4]["prefill_syncs"] == counts[1]["prefill_syncs"], counts[4]["sync_sites"]["prefill"]
    assert counts[4]["prefill_kernels"] <= 1.01 * counts[1]["prefill_kernels"], (counts[1]["prefill_kernels"],
                                                                                counts[4]["prefill_kernels"])
