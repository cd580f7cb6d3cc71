"""FastVID selects for the whole batch at once: samples with different videos (different segments, frame counts
and sizes, so different host plans) keep in a batch the tokens they keep alone, with the same merged rows, and
the prefill costs the same kernels and host syncs at batch 1 and batch 4."""

from __future__ import annotations

import pytest
import torch
from helpers import noise_image
from omegaconf import OmegaConf

from clse_exp import bench, load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.generation import prepare

# The merged rows are sums over each merge's window of tokens, a matrix product padded to the batch's longest
# window; BLAS may round such a product's last bit differently for another padded length (float32 ulps).
ROWS = {"atol": 1e-6, "rtol": 1e-6}


def clip(groups: tuple[int, ...], size: int, seed: int) -> list:
    """Frames repeating a few noise images (runs of alike frames make DySeg segments of those lengths)."""
    return [noise_image(seed + g, size) for g, count in enumerate(groups) for _ in range(count)]


@pytest.fixture(scope="module")
def onevision():
    cfg = OmegaConf.load("clse_exp/conf/model/tiny_llava_onevision.yaml")
    cfg.tiny.image_size = 168
    return load_model(cfg, "cpu")


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny_qwen2_5vl", "cpu")


def choices(loaded, samples, pruner) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample, (kept positions, their rows) as the method chose them for the batch's prefill."""
    seen = []
    select_batch = pruner.method.select_batch

    def record(ctx, budgets):
        choice = select_batch(ctx, budgets)
        seen.append(choice)
        return choice

    pruner.method.select_batch = record
    try:
        with torch.no_grad(), pruner.attach(loaded.model):
            loaded.model(**prepare(loaded, samples, pruner))
    finally:
        del pruner.method.select_batch
    (choice,) = seen
    return [(choice.order[b, :n], choice.hidden[b, :n]) for b, n in enumerate(choice.counts)]


def assert_batch_matches_alone(loaded, samples, keep, protocol, **knobs):
    pruner = make_pruner("fastvid", keep=keep, protocol=protocol, **knobs)
    together = choices(loaded, samples, pruner)
    for i, sample in enumerate(samples):
        ((order, rows),) = choices(loaded, [sample], pruner)
        assert torch.equal(together[i][0], order), f"sample {i} keeps other tokens in a batch"
        torch.testing.assert_close(together[i][1], rows, **ROWS)


ONEVISION = [  # same-shape clips (the processor stacks them) of different segments; all-different frames
    Sample("a", "What moves?", "", [], video=clip((3, 3, 2), 112, 60)),
    Sample("b", "What moves in the clip?", "", [], video=clip((1, 4, 3), 112, 80)),
    Sample("c", "Moves?", "", [], video=clip((2, 2, 2, 2), 112, 90)),
    Sample("d", "What is it?", "", [], video=[noise_image(300 + i, 112) for i in range(8)]),
]


@pytest.mark.parametrize("protocol", ["official", "uniform"])
@pytest.mark.parametrize(("keep", "knobs"), [(0.3, {"dyseg_c": 3}), (0.5, {"dyseg_c": 2, "dtm_p": 2}),
                                              (0.9, {"dyseg_c": 3})])
def test_llava_onevision_batch_keeps_what_each_sample_keeps_alone(onevision, protocol, keep, knobs):
    assert_batch_matches_alone(onevision, ONEVISION, keep, protocol, **knobs)


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_qwen2_5_vl_batch_keeps_what_each_sample_keeps_alone(qwen, protocol):
    samples = [Sample("a", "What moves?", "", [], video=clip((6, 6, 4), 168, 60)),
               Sample("b", "What moves here?", "", [], video=clip((2, 10, 4), 168, 70)),
               Sample("c", "Moves?", "", [], video=clip((4, 4), 112, 90))]
    assert_batch_matches_alone(qwen, samples, 0.3, protocol, dyseg_c=3)


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_prefill_costs_the_same_at_batch_1_and_4(onevision, protocol):
    """Same-shape videos with different contents (different segments): the batch's clips, frames and merges run
    as padded batches, so the kernels do not grow with the batch and the one read of the flags (and the one
    upload of the jitter) stays one."""
    counts = {}
    for batch in (1, 4):
        samples = [Sample(f"v{b}", "What moves in the video?", "", [], video=clip(groups, 112, 60 + 10 * b))
                   for b, groups in zip(range(batch), [(3, 3, 2), (1, 4, 3), (8,), (2, 2, 2, 2)], strict=False)]
        pruner = make_pruner("fastvid", keep=0.33, protocol=protocol, dyseg_c=3)
        counts[batch] = bench.count_generate(onevision, prepare(onevision, samples, pruner), pruner, 1)
    assert counts[4]["prefill_syncs"] == counts[1]["prefill_syncs"], counts[4]["sync_sites"]["prefill"]
    assert counts[4]["prefill_kernels"] <= 1.01 * counts[1]["prefill_kernels"], (counts[1]["prefill_kernels"],
                                                                                  counts[4]["prefill_kernels"])
