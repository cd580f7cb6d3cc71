"""The pruning engine on stock transformers: identity, caching, batching, positions, signals."""

from __future__ import annotations

import pytest
import torch
from helpers import noise_image, samples

from clse_exp import load_model, make_pruner
from clse_exp.compat import cache_of
from clse_exp.data.sample import Sample
from clse_exp.pruning.attention import last_query_attention
from clse_exp.pruning.engine import Pruner
from clse_exp.pruning.masks import allowed_pairs, backend_mask
from clse_exp.pruning.spectral import clse_scores

FAMILIES = ("tiny_qwen2vl", "tiny_qwen2_5vl", "tiny_llava")


def model_with(name: str, attn: str = "sdpa"):
    loaded = load_model(name, "cpu")
    loaded.model.set_attn_implementation(attn)
    return loaded


def greedy(loaded, inputs, pruner=None, use_cache=True, steps=6):
    tok = loaded.processor.tokenizer
    kwargs = dict(max_new_tokens=steps, do_sample=False, use_cache=use_cache, pad_token_id=tok.pad_token_id,
                  eos_token_id=None, min_new_tokens=steps)
    with torch.no_grad():
        if pruner is None:
            return loaded.model.generate(**inputs, **kwargs)[:, -steps:]
        with pruner.attach(loaded.model):
            return loaded.model.generate(**inputs, **kwargs)[:, -steps:]


def decode_scores(loaded, inputs, pruner, steps=4):
    """Logits of the decode steps after the first token: [steps - 1, B, V]."""
    tok = loaded.processor.tokenizer
    with torch.no_grad(), pruner.attach(loaded.model):
        out = loaded.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True,
                                    pad_token_id=tok.pad_token_id)
    return torch.stack(out.scores[1:])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["clse", "fastv", "divprune"])
def test_keep_all_is_identity(name, method):
    loaded = model_with(name)
    inputs = loaded.prepare(samples(3))
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        stock = loaded.model(**inputs).logits
        pruner = make_pruner(method, keep=1.0, model=name)
        with pruner.attach(loaded.model):
            pruned = loaded.model(**inputs).logits
    assert pruned.shape == stock.shape
    torch.testing.assert_close(pruned[valid], stock[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(loaded, inputs, make_pruner(method, keep=1.0, model=name)), greedy(loaded, inputs))


def test_detached_model_is_stock():
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(2))
    with torch.no_grad():
        before = loaded.model(**inputs).logits
        with make_pruner("clse", keep=0.2, model="tiny_qwen2vl").attach(loaded.model):
            loaded.model(**inputs)
        after = loaded.model(**inputs).logits
    hooked = [m for m in loaded.model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooked == []
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decode_matches_recompute(name, attn, batch):
    """Random selection is a fixed function of (seed, stage, n_visual): the no-cache run re-prunes the
    same tokens at every step, so it must reproduce the cached decode token for token."""
    loaded = model_with(name, attn)
    inputs = loaded.prepare(samples(batch))
    pruner = make_pruner("random", keep=0.3, layers="fastv", model=name)
    cached = greedy(loaded, inputs, pruner)
    recomputed = greedy(loaded, inputs, pruner, use_cache=False)
    assert torch.equal(cached, recomputed)


class MaskedRagged(Pruner):
    """Oracle for `crop`: keep every layer's full cache but hide, at decode, the visual tokens that did
    not survive the last cut (crop removes them physically instead)."""

    def _decode_mask(self, state, layer, implementation, dtype):
        prompt, final = state.layer_slots[layer], state.slots
        survives = torch.stack([torch.isin(prompt.idx[b], final.idx[b][final.valid[b]])
                                for b in range(prompt.idx.shape[0])])
        batch = prompt.idx.shape[0]
        generated = torch.arange(state.length, state.length + state.generated).expand(batch, -1)
        key_pos = torch.cat([prompt.idx, generated], 1)
        key_valid = torch.cat([prompt.valid & survives, torch.ones_like(generated, dtype=torch.bool)], 1)
        allowed = allowed_pairs(generated[:, -state.step_length:], key_pos, key_valid)
        return backend_mask(allowed, key_valid, implementation, dtype)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 3])
def test_crop_policy_matches_masked_full_cache(name, attn, batch):
    loaded = model_with(name, attn)
    inputs = loaded.prepare(samples(batch))
    crop = make_pruner("clse", keep=0.3, model=name, kv_policy="crop")
    reference = make_pruner("clse", keep=0.3, model=name)
    oracle = MaskedRagged(reference.method, reference.prune_layers, reference.reference_layer, keep=0.3,
                          shape=reference.shape)
    assert torch.equal(greedy(loaded, inputs, crop), greedy(loaded, inputs, oracle))
    crop_scores, oracle_scores = decode_scores(loaded, inputs, crop), decode_scores(loaded, inputs, oracle)
    torch.testing.assert_close(crop_scores, oracle_scores, atol=1e-5, rtol=1e-5)
    ragged_scores = decode_scores(loaded, inputs, make_pruner("clse", keep=0.3, model=name))
    finite = crop_scores.isfinite()
    assert (crop_scores - ragged_scores)[finite].abs().max() > 1e-3  # the policy really changes decoding
    assert [(s["layer"], s["kept"]) for s in crop.trace] == [(s["layer"], s["kept"]) for s in oracle.trace]


def test_crop_cuts_earlier_caches_to_survivors():
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(1))
    pruner = make_pruner("clse", keep=0.3, model="tiny_qwen2vl", kv_policy="crop")
    with torch.no_grad(), pruner.attach(loaded.model):
        out = loaded.model(**inputs, use_cache=True)
    lengths = {layer.keys.shape[2] for layer in cache_of(out).layers}
    n_text = inputs["input_ids"].shape[1] - pruner.trace_records()[0]["n_visual"]
    assert lengths == {n_text + len(pruner.trace[-1]["kept"][0])}


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava"])
@pytest.mark.parametrize("method", ["clse", "fastv", "pdrop", "dart", "divprune", "random"])
def test_batch_matches_single(name, method):
    loaded = model_with(name)
    batch = samples(3, images_per_sample=(1, 2, 1), sizes=(224, 168, 224))
    pruner = make_pruner(method, keep=0.3, model=name)
    together = greedy(loaded, loaded.prepare(batch), pruner)
    kept_together = [stage["kept"] for stage in pruner.trace]
    for i, sample in enumerate(batch):
        alone = greedy(loaded, loaded.prepare([sample]), pruner)
        assert torch.equal(together[i], alone[0]), f"sample {i} differs in a batch"
        assert [stage["kept"][0] for stage in pruner.trace] == [kept[i] for kept in kept_together]


def eager_run_with_layer_inputs(loaded, inputs):
    """A stock eager forward with attentions, and every decoder layer's (input, (cos, sin))."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    captured = {}

    def hook(index):
        def fn(_module, args, kwargs):
            captured[index] = (args[0], kwargs["position_embeddings"])
        return fn

    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(len(layers))]
    with torch.no_grad():
        out = loaded.model(**inputs, output_attentions=True)
    for handle in handles:
        handle.remove()
    return out, captured, layers


@pytest.mark.parametrize("name", FAMILIES)
def test_recomputed_attention_matches_eager(name):
    loaded = model_with(name, "eager")
    inputs = loaded.prepare(samples(3))
    out, captured, layers = eager_run_with_layer_inputs(loaded, inputs)
    valid = inputs["attention_mask"].bool()
    for index in (0, 3):
        hidden, (cos, sin) = captured[index]
        batch = hidden.shape[0]
        ours = last_query_attention(layers[index], hidden, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1), valid)
        eager = out.attentions[index][:, :, -1, :].float().mean(1)
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)


def test_clse_prunes_each_image_on_its_own_grid():
    """Oracle: the stock model's layer inputs and eager attention, scored by the pure clse_scores with
    one grid per image, give the kept set the engine reports."""
    name = "tiny_qwen2vl"
    loaded = model_with(name, "eager")
    sample = Sample("two", "Is there a red circle?", "yes", [noise_image(1, 224), noise_image(2, 168)])
    inputs = loaded.prepare([sample])
    out, captured, _ = eager_run_with_layer_inputs(loaded, inputs)
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"])
    segments = layout[0]
    assert [s.grid for s in segments] == [(1, 8, 8), (1, 6, 6)]
    visual = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])
    attn = out.attentions[1][0, :, -1, :].float().mean(0)[visual]
    scores = clse_scores(captured[0][0][:, visual], captured[2][0][:, visual], [s.grid for s in segments],
                         attn=attn[None])
    pruner = make_pruner("clse", keep=0.5, layers="single", reference_layer=0, prune_layers=[2], model=name)
    with torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**inputs)
    k = pruner.trace[0]["budget"][0]
    expected = scores[0].topk(k).indices.sort().values.tolist()
    assert pruner.trace[0]["kept"][0] == expected


@pytest.mark.parametrize("method", ["clse", "pdrop", "dart"])
def test_tokens_each_layer_processes_equal_trace(method):
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(1))
    layers = loaded.adapter.decoder_layers(loaded.model)
    pruner = make_pruner(method, keep=0.3, model="tiny_qwen2vl")
    seen = []
    with torch.no_grad(), pruner.attach(loaded.model):
        handles = [layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
                   for layer in layers]
        loaded.model(**inputs)
        for handle in handles:
            handle.remove()
    record = pruner.trace_records()[0]
    n_text = inputs["input_ids"].shape[1] - record["n_visual"]
    assert seen == [n_text + v for v in record["visual_per_layer"]]
    assert record["visual_per_layer"][-1] < record["n_visual"]


def test_video_tokens_prune_per_frame_grid():
    loaded = model_with("tiny_qwen2vl")
    video = Sample("v", "What changes between the frames?", "no", [], video=[noise_image(i) for i in range(4)])
    inputs = loaded.prepare([video])
    pruner = make_pruner("clse", keep=0.3, model="tiny_qwen2vl")
    greedy(loaded, inputs, pruner)
    record = pruner.trace_records()[0]
    assert record["grids"] == [[2, 8, 8]]
    assert record["n_visual"] == 128 and record["visual_per_layer"][-1] < 128


def test_static_cache_is_refused():
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(1))
    with pytest.raises(ValueError, match="DynamicCache"):
        with torch.no_grad(), make_pruner("fastv", keep=0.3).attach(loaded.model):
            loaded.model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_layers_beyond_depth_are_refused():
    from clse_exp.errors import ConfigError

    loaded = model_with("tiny_qwen2vl")
    pruner = make_pruner("fastv", keep=0.3, prune_layers=[40])
    with pytest.raises(ConfigError, match="40"):
        with pruner.attach(loaded.model):
            pass


def test_tiny_images_keep_the_fewest_tokens_instead_of_failing():
    loaded = model_with("tiny_qwen2vl")
    small = Sample("s", "Is there a red circle?", "yes", [noise_image(0, 56)])  # 2 x 2 = 4 visual tokens
    pruner = make_pruner("clse", keep=0.1, model="tiny_qwen2vl")
    greedy(loaded, loaded.prepare([small]), pruner)
    record = pruner.trace_records()[0]
    assert record["n_visual"] == 4 and record["visual_per_layer"][-1] == 1
    assert record["retention"]["average"] > 0.1  # reported honestly, above the unreachable target


def test_budgets_the_layers_cannot_reach_are_config_errors():
    from clse_exp.errors import ConfigError

    loaded = model_with("tiny_qwen2vl")
    pruner = make_pruner("pdrop", keep=0.1, model="tiny_qwen2vl")  # first cut at layer 7 of 28: floor 0.25
    with pytest.raises(ConfigError, match="smallest average retention"):
        greedy(loaded, loaded.prepare(samples(1)), pruner)
