"""VisionZip and VisPruner select for the whole batch at once: images of different counts and sizes padded into
one computation, and samples the stage leaves uncut, must not change what any sample keeps alone."""

from __future__ import annotations

import pytest
import torch
from helpers import batch_matches_alone, samples

from clse_exp import load_model, make_pruner
from clse_exp.generation import prepare
from clse_exp.pruning.methods.visionzip import VisionZip
from clse_exp.pruning.methods.vispruner import VisPruner


@pytest.fixture(scope="module")
def qwen2vl():
    return load_model("tiny_qwen2vl", "cpu")


@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_qwen2vl_images_of_different_sizes_match_alone(qwen2vl, protocol):
    """No windows: each image is one attention block, and blocks of 256, 144 and 196 rows are recomputed
    together, padded to the longest."""
    batch = samples(3, images_per_sample=(1, 2, 1), sizes=(224, 168, 196))
    together = batch_matches_alone(qwen2vl, batch, make_pruner("visionzip", keep=0.3, protocol=protocol))[0]
    assert [len(kept) for kept in together] == [
        int(0.25 * n) + max(int(0.05 * n), 1) if protocol == "official" else round(0.3 * n) for n in (64, 72, 49)]

def _uncut_first(method: type) -> type:
    """The method, with the first sample of every batch left uncut (as when its budget covers its tokens)."""

    class UncutFirst(method):
        def select_batch(self, ctx, budgets):
            return super().select_batch(ctx, [None, *budgets[1:]])

    return UncutFirst


@pytest.mark.parametrize(("method", "model"), [(VisionZip, "tiny_llava"), (VisPruner, "tiny_llava"),
                                               (VisionZip, "qwen2vl")])
def test_a_sample_left_uncut_keeps_its_tokens_and_the_others_choose_as_before(method, model, request, tiny_llava):
    loaded = tiny_llava if model == "tiny_llava" else request.getfixturevalue(model)
    batch = samples(3, images_per_sample=(1, 2, 1))
    for protocol in ("official", "uniform"):
        reference = make_pruner(method.name, keep=0.3, protocol=protocol)
        uncut = make_pruner(method.name, keep=0.3, protocol=protocol)
        uncut.method = _uncut_first(method)(uncut.method.options)
        with torch.no_grad():
            for pruner in (reference, uncut):
                with pruner.attach(loaded.model):
                    loaded.model(**prepare(loaded, batch, pruner))
        expected, got = reference.trace[0], uncut.trace[0]
        n_first = len(got["kept"][0])
        assert got["kept"][0] == list(range(n_first)) and n_first > len(expected["kept"][0])
        assert got["kept"][1:] == expected["kept"][1:]
        if expected["merged"] is not None:
            assert got["merged"][0] == 0 and got["merged"][1:] == expected["merged"][1:]
