"""CDPruner's batched selection: one CLIP text-tower call for the batch equals one call per instruction, the
padded greedy DPP picks what each sample picks alone (and what the log-det oracle picks), a batch of mixed
instruction lengths keeps each sample's own tokens and CLIP FLOPs, and the prefill's host syncs and kernels do
not grow with the batch."""

from __future__ import annotations

import oracle_cdpruner as oracle
import pytest
import torch
from helpers import batch_matches_alone, noise_image, samples
from transformers import CLIPVisionConfig

from clse_exp import load_model, make_pruner
from clse_exp.data.prompts import SHORT_ANSWER
from clse_exp.data.sample import Sample
from clse_exp.efficiency.counts import count_ops
from clse_exp.generation import prepare
from clse_exp.pruning.methods.cdpruner import _load_clip, fast_map, instruction, text_embeds, text_tokens

LONG = ("What colour is the shape in the top left cell, and is it larger than the shape next to it on the "
        "right?" + SHORT_ANSWER)  # two 77-token segments of the tiny byte-level CLIP tokenizer
SHORT = ("Is there a red circle?", "How many blue shapes are there in the image?" + SHORT_ANSWER)


def test_one_text_tower_call_equals_one_per_instruction():
    """The segments of several instructions as the rows of one call: each row is pooled at its own end token,
    so every embedding equals the instruction's own call (float32, 1e-6)."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    clip = _load_clip("tiny", vision.to_json_string(), "cpu")
    texts = [instruction(q) for q in (SHORT[0], LONG, SHORT[1])]
    tokens = [text_tokens(clip, text) for text in texts]
    assert [t.shape[1] for t in tokens] == [1, 2, 1]
    with torch.no_grad():
        together = text_embeds(clip, torch.cat(tokens, dim=1), torch.device("cpu")).split([1, 2, 1])
        for text, embeds in zip(texts, together, strict=True):
            alone = text_embeds(clip, text, torch.device("cpu"))
            assert alone.dtype == torch.float32
            torch.testing.assert_close(embeds, alone, atol=1e-6, rtol=0)


def _kernel(unit: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    unit = unit / unit.norm(dim=-1, keepdim=True)
    return r[:, None] * (unit @ unit.T) * r[None, :]


def test_padded_greedy_picks_what_each_sample_picks_alone():
    """Three kernels of 6, 3 and 5 tokens padded to 6 and stepped together for the largest count: each row's
    first k picks are its own. The full-rank one matches the log-det oracle; the rank-1 one (a zero gain
    divides the official row) re-picks token 0 alone, which it must also do beside padding that turns NaN."""
    generator = torch.Generator().manual_seed(3)
    full = _kernel(torch.randn(6, 8, generator=generator), torch.rand(6, generator=generator) + 0.1)
    rank_one = _kernel(torch.tensor([[1.0], [-1.0], [1.0]]), torch.tensor([0.7, 0.2, 0.8]))
    rank_two = _kernel(torch.randn(5, 2, generator=generator), torch.rand(5, generator=generator) + 0.1)
    kernels, counts = [full, rank_one, rank_two], [4, 3, 5]
    batch = torch.zeros(3, 6, 6)
    valid = torch.zeros(3, 6, dtype=torch.bool)
    fill = torch.zeros(3, 6)
    for b, kernel in enumerate(kernels):
        n = kernel.shape[0]
        batch[b, :n, :n], valid[b, :n], fill[b, :n] = kernel, True, kernel.diagonal().sqrt()
    assert fast_map(full, 4).tolist() == oracle.greedy_log_det(full, 4)
    assert fast_map(rank_one, 3).tolist() == [2, 0, 0]
    official = fast_map(batch, 5, valid=valid)
    uniform = fast_map(batch, 5, fill=fill, valid=valid)
    for b, (kernel, k) in enumerate(zip(kernels, counts, strict=True)):
        assert official[b, :k].tolist() == fast_map(kernel, k).tolist(), b
        assert uniform[b, :k].tolist() == fast_map(kernel, k, fill=fill[b, : kernel.shape[0]]).tolist(), b
        assert len(set(uniform[b, :k].tolist())) == k and max(uniform[b, :k].tolist()) < kernel.shape[0]


def _prefill(loaded, batch, pruner) -> tuple[list[list[int]], list[int]]:
    with torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**prepare(loaded, batch, pruner))
    return pruner.trace[0]["kept"], [record.aux_flops for record in pruner.records]


@pytest.mark.parametrize("protocol", ["official", pytest.param("uniform", marks=pytest.mark.slow)])
def test_mixed_instruction_lengths_keep_each_samples_tokens_and_clip_flops(protocol):
    """One instruction spans two text segments, the others one: each sample keeps the tokens and reports the
    CLIP FLOPs it has alone, and answers alike."""
    loaded = load_model("tiny_llava", "cpu")
    batch = samples(3, images_per_sample=(1, 2, 1))
    batch[1] = Sample("long", LONG, "", batch[1].images)
    pruner = make_pruner("cdpruner", keep=0.3, protocol=protocol)
    kept, flops = _prefill(loaded, batch, pruner)
    for i, sample in enumerate(batch):
        assert _prefill(loaded, [sample], pruner) == ([kept[i]], [flops[i]]), i
    assert flops[1] > flops[0] > 0  # the long instruction's second segment is counted
    batch_matches_alone(loaded, batch, pruner, steps=2)


def _prefill_counts(loaded, inputs, pruner=None) -> tuple[int, int]:
    with torch.no_grad(), count_ops("prefill") as tally:
        if pruner is None:
            loaded.model(**inputs)
        else:
            with pruner.attach(loaded.model):
                loaded.model(**inputs)
    return tally.get("prefill").kernels, tally.get("prefill").syncs


def test_prefill_syncs_and_kernels_do_not_grow_with_the_batch():
    """Beyond the unpruned forward of the same inputs, a batch of 4 launches the kernels and waits on the host
    as often as a batch of 1."""
    loaded = load_model("tiny_llava", "cpu")
    sample = Sample("s", LONG, "", [noise_image(5)])
    extra = []
    for size in (1, 1, 4):  # the first call may build the seeded CLIP stand-in
        pruner = make_pruner("cdpruner", keep=0.3)
        inputs = prepare(loaded, [sample] * size, pruner)
        pruned, unpruned = _prefill_counts(loaded, inputs, pruner), _prefill_counts(loaded, inputs)
        extra.append((pruned[0] - unpruned[0], pruned[1] - unpruned[1]))
    assert extra[1] == extra[2] and extra[1][1] > 0, extra
