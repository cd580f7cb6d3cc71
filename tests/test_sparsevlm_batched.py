"""SparseVLM's batched selection: every sample keeps, recycles and merges alike alone and in a padded batch, ties
included (with few recycled tokens the density is 1 + noise, so several tokens tie for the one centre)."""

from __future__ import annotations

import pytest
import torch
from helpers import samples

from clse_exp import load_model, make_pruner
from clse_exp.pruning.methods.sparsevlm import dpc_knn_merge, dpc_knn_merge_batch


def test_batched_clustering_matches_each_sample_alone():
    gen = torch.Generator().manual_seed(0)
    sizes = [7, 31, 1, 83, 9]
    clusters = [int(m / 10) + 1 for m in sizes]
    xs = [torch.randn(m, 16, generator=gen) for m in sizes]
    xs[3][10:20] = xs[3][0]  # duplicates: equal densities, decided by the noise
    # quantised noise: densities 1 + noise tie in float32, so the centre is a tie the top-k must break alike
    noises = [(torch.rand(m, generator=gen) * 4).floor() * 1e-7 for m in sizes]
    most = max(sizes)
    x = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, most - len(t)), value=3.0) for t in xs])
    noise = torch.stack([torch.nn.functional.pad(t, (0, most - len(t))) for t in noises])
    means, centres = dpc_knn_merge_batch(x, torch.tensor(sizes), torch.tensor(clusters), max(clusters), noise)
    for b, (t, c, n) in enumerate(zip(xs, clusters, noises, strict=True)):
        want_means, want_centres = dpc_knn_merge(t, c, n)
        assert centres[b, :c].tolist() == want_centres.tolist()
        torch.testing.assert_close(means[b, :c], want_means, atol=1e-6, rtol=1e-5)


def test_tied_centres_go_to_the_first_token():
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    _, centres = dpc_knn_merge(x, 1, torch.zeros(12))  # one cluster, no noise: every token ties
    assert centres.tolist() == [0]


@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "keep", "knobs"), [
    ("official", 0.33, {}), ("uniform", 0.11, {}), ("uniform", 0.6, {}), ("official", 0.22, {"recycle": False}),
    ("uniform", 0.5, {"count_rule": "rank"}),
])
def test_batch_keeps_and_merges_as_alone(protocol, keep, knobs):
    """Each sample's kept tokens (cluster centres included) at every stage, and its last logits, alone and in a
    batch whose samples differ in image count and size (so every padded width differs)."""
    loaded = load_model("tiny_qwen2vl", "cpu")
    batch = samples(3, images_per_sample=(1, 2, 1), sizes=(224, 168, 224))
    pruner = make_pruner("sparsevlm", keep=keep, protocol=protocol, **knobs)
    with torch.no_grad(), pruner.attach(loaded.model):
        together = loaded.model(**loaded.prepare(batch)).logits[:, -1]
        kept = [stage["kept"] for stage in pruner.trace]
        for i, sample in enumerate(batch):
            alone = loaded.model(**loaded.prepare([sample])).logits[0, -1]
            assert [stage["kept"][0] for stage in pruner.trace] == [k[i] for k in kept], f"sample {i}"
            torch.testing.assert_close(together[i], alone, atol=2e-4, rtol=1e-4)
