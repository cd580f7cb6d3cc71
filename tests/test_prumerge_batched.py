"""PruMerge+ merges every image of a batch at once: a sample keeps and merges in a batch as it does alone (the
adaptive IQR count too), the batch costs the same kernels as one sample and at most one host read (the adaptive
counts), and a sample without a cut keeps its own tokens beside samples that merge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import batch_matches_alone, samples

from clse_exp import make_pruner
from clse_exp.efficiency.counts import count_ops
from clse_exp.pruning.methods.prumerge_plus import iqr_outliers


def test_adaptive_count_in_a_batch_matches_each_image_alone(tiny_llava):
    batch = samples(3, images_per_sample=(1, 2, 1))
    pruner = make_pruner("prumerge_plus", keep=0.5, adaptive=True)
    batch_matches_alone(tiny_llava, batch, pruner)


def test_iqr_count_is_numpys_per_row():
    generator = torch.Generator().manual_seed(0)
    rows = [torch.softmax(3 * torch.randn(6, n, generator=generator), dim=1) for n in (1, 2, 5, 64, 576)]
    rows.append(torch.randint(0, 4, (6, 577), generator=generator).float() / 7)  # ties at the quartiles
    rows.append(rows[3].bfloat16())
    for scores in rows:
        values = scores.float().numpy()
        q1, q3 = np.percentile(values, 25, axis=1), np.percentile(values, 75, axis=1)
        want = (values > (q3 + 1.5 * (q3 - q1))[:, None]).sum(1)
        assert iqr_outliers(scores).tolist() == want.tolist()


def _select_costs(loaded, batch, pruner) -> tuple[int, dict]:
    """Kernels and host reads of the method's own selection (select_batch) in one forward of `batch`."""
    method, tallies = pruner.method, []
    select_batch = method.select_batch

    def counted(ctx, budgets):
        with count_ops() as tally:
            tallies.append(tally)
            return select_batch(ctx, budgets)

    method.select_batch = counted
    try:
        with torch.no_grad(), pruner.attach(loaded.model):
            loaded.model(**loaded.prepare(batch))
    finally:
        del method.select_batch
    counts = tallies[0].get("all")
    return counts.kernels, dict(counts.sync_ops)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_batch_selects_with_the_kernels_and_reads_of_one_sample(tiny_llava, adaptive):
    pruner = make_pruner("prumerge_plus", keep=0.3, adaptive=adaptive)
    one = _select_costs(tiny_llava, samples(1, images_per_sample=(1,)), pruner)
    four = _select_costs(tiny_llava, samples(4, images_per_sample=(1,)), pruner)
    assert one == four
    assert one[1] == ({"tolist": 1} if adaptive else {})
    two_images = _select_costs(tiny_llava, samples(3, images_per_sample=(1, 2, 1)), pruner)
    assert two_images[1] == one[1]


def test_a_sample_without_a_cut_keeps_its_tokens_beside_merged_ones(tiny_llava):
    batch = samples(3, images_per_sample=(1, 2, 1))
    inputs = tiny_llava.prepare(batch)
    with torch.no_grad():
        stock = tiny_llava.model(**inputs).logits[:, -1]

    def run(pruner):
        with torch.no_grad(), pruner.attach(tiny_llava.model):
            logits = tiny_llava.model(**inputs).logits[:, -1]
        return pruner.trace[0]["kept"], logits

    merged_kept, merged_logits = run(make_pruner("prumerge_plus", keep=0.3))
    pruner = make_pruner("prumerge_plus", keep=0.3)
    select_batch = pruner.method.select_batch

    def sample_1_uncut(ctx, budgets):  # as the engine asks when sample 1's plan keeps all its tokens
        keep = torch.where(torch.arange(len(budgets)) == 1, ctx.visual_valid.sum(1), ctx.keep_counts)
        return select_batch(dataclasses.replace(ctx, keep_counts=keep), [None if b == 1 else k
                                                                          for b, k in enumerate(budgets)])

    pruner.method.select_batch = sample_1_uncut
    kept, logits = run(pruner)
    assert kept[1] == list(range(128))  # both of its 64-patch images, untouched
    torch.testing.assert_close(logits[1], stock[1], atol=1e-5, rtol=1e-5)
    assert [kept[0], kept[2]] == [merged_kept[0], merged_kept[2]]
    torch.testing.assert_close(logits[[0, 2]], merged_logits[[0, 2]], atol=1e-5, rtol=1e-5)
