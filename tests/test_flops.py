"""Analytic LLM FLOPs and KV bytes against torch's FlopCounterMode and the real cache tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import samples
from torch.utils.flop_counter import FlopCounterMode

from clse_exp import load_model, make_pruner
from clse_exp.compat import cache_of
from clse_exp.efficiency.flops import TextShape, prefill_flops
from clse_exp.efficiency.kv_cache import analytic_kv_bytes, measured_kv_bytes

FAMILIES = ("tiny_qwen2vl", "tiny_qwen2_5vl", "tiny_llava")


def counted(loaded, inputs, pruner=None) -> tuple[int, int, object]:
    """FlopCounterMode's count inside the language model and the lm_head, and the cache."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if pruner is None:
            out = loaded.model(**inputs, logits_to_keep=1, use_cache=True)
        else:
            with pruner.attach(loaded.model):
                out = loaded.model(**inputs, logits_to_keep=1, use_cache=True)
    flops = {name.split(".", 1)[-1]: sum(v.values()) for name, v in counter.get_flop_counts().items()}
    text = next(v for k, v in flops.items() if k.endswith("language_model"))
    return text, flops["lm_head"], cache_of(out)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", [None, "random", "divprune"])
def test_analytic_flops_equal_flop_counter(name, method):
    loaded = load_model(name, "cpu")
    loaded.model.set_attn_implementation("eager")
    inputs = loaded.prepare(samples(1))
    n_total = inputs["input_ids"].shape[1]
    pruner = make_pruner(method, keep=0.2, layers="single", prune_layers=[3], model=name) if method else None
    text_flops, head_flops, cache = counted(loaded, inputs, pruner)
    if pruner is None:
        tokens = [n_total] * loaded.num_layers
    else:
        record = pruner.trace_records()[0]
        tokens = [n_total - record["n_visual"] + v for v in record["visual_per_layer"]]
        assert tokens[-1] < n_total
    analytic = prefill_flops(loaded.model.config, tokens)
    scoring = 0
    if method == "divprune":  # its one [n, C] x [C, n] cosine matrix runs inside the LLM's scope
        n, c = pruner.trace_records()[0]["n_visual"], TextShape.from_config(loaded.model.config).hidden
        scoring = 2 * n * n * c
    assert abs(text_flops - scoring - sum(analytic.per_layer)) <= 0.01 * sum(analytic.per_layer)
    assert head_flops == analytic.lm_head
    assert measured_kv_bytes(cache) == analytic_kv_bytes(loaded.model.config, tokens, torch.float32)


def test_fastv_formula_by_hand():
    class Config:
        hidden_size, intermediate_size, num_attention_heads, num_key_value_heads = 4, 8, 2, 2
        num_hidden_layers, vocab_size = 2, 10

    flops = prefill_flops(Config(), [3, 1])
    assert flops.fastv_formula == (4 * 3 * 16 + 2 * 9 * 4 + 2 * 3 * 4 * 8) + (4 * 16 + 2 * 4 + 2 * 4 * 8)


def test_qwen2vl_vision_flops_equal_flop_counter():
    from clse_exp.efficiency.flops import qwen2vl_vision_flops

    loaded = load_model("tiny_qwen2vl", "cpu")
    inputs = loaded.prepare(samples(2))  # three images: 16x16, 16x16 and 16x16 patches
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        loaded.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    analytic = qwen2vl_vision_flops(loaded.model.config.vision_config, inputs["image_grid_thw"].tolist())
    assert abs(counter.get_total_flops() - analytic) <= 0.01 * analytic
