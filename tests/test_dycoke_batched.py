"""DyCoke's TTM run for the whole batch: samples with different videos (and, on Qwen-VL, different frame counts and
sizes, so their clips fall into different plan groups) keep and answer exactly as each does alone. (That the
prefill launches the same kernels at batch 1 and 4 is tests/test_counts.py's video budget.)"""

from __future__ import annotations

import pytest
from helpers import batch_matches_alone, noise_image

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample


def video(frames: int, seed: int, question: str = "What moves?", size: int = 112) -> Sample:
    return Sample(f"v{seed}", question, "", [], video=[noise_image(seed + i, size) for i in range(frames)])


@pytest.fixture(scope="module")
def onevision():
    return load_model("tiny_llava_onevision", "cpu")


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_different_videos_keep_what_each_keeps_alone_on_llava_onevision(onevision, protocol):
    # one processor call takes videos of one frame count: the clips differ in content and the prompts in length
    batch = [video(8, 50), video(8, 80, "Which object moves the most in this clip?"), video(8, 110)]
    pruner = make_pruner("dycoke", model="tiny_llava_onevision", keep=0.5, protocol=protocol)
    together = batch_matches_alone(onevision, batch, pruner, steps=2)[0]
    assert len({tuple(kept) for kept in together}) == 3  # the videos differ, so do their choices


@pytest.mark.parametrize(("model", "size"), [("tiny_qwen2vl", 140), ("tiny_qwen3vl", 160)])
def test_mixed_frame_counts_and_sizes_keep_what_each_keeps_alone_on_qwen(model, size):
    # temporal steps x merged tokens: 4 x 16 twice (one group of two clips), 6 x 16 and 4 x 25 (a group each)
    batch = [video(8, 50), video(12, 80, "Which object moves the most in this clip?"), video(8, 110),
             video(8, 140, size=size)]
    loaded = load_model(model, "cpu")
    pruner = make_pruner("dycoke", model=model, keep=0.3, protocol="uniform", decode_pruning=False)
    together = batch_matches_alone(loaded, batch, pruner, steps=2)[0]
    assert [len(kept) for kept in together] == [round(0.3 * n) for n in (64, 96, 64, 100)]
