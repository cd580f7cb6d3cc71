"""The pruning engine on stock transformers: identity, caching, batching, positions, merging, signals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    VIDEO_METHODS,
    batch_matches_alone,
    cached_vs_recomputed,
    greedy,
    noise_image,
    samples,
    slow_except,
    video_samples,
)

from clse_exp import load_model, make_pruner
from clse_exp.compat import cache_of
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.attention import last_query_attention
from clse_exp.pruning.engine import Pruner
from clse_exp.pruning.masks import backend_mask, decode_pairs
from clse_exp.pruning.methods import METHODS
from clse_exp.pruning.methods.base import PruningMethod, Selection
from clse_exp.pruning.spectral import clse_scores

FAMILIES = ("tiny_qwen2vl", "tiny_qwen2_5vl", "tiny_llava")
PROTOCOLS = ("official", "uniform")


def model_with(name: str, attn: str = "sdpa"):
    loaded = load_model(name, "cpu")
    loaded.model.set_attn_implementation(attn)
    return loaded


LLAVA_ONLY = ("visionzip", "prumerge_plus", "cdpruner")  # they read LLaVA-1.5's CLIP encoder


@pytest.mark.parametrize(("name", "method"), slow_except(
    [(name, method) for name in FAMILIES for method in ("clse", "fastv", "divprune")]
    + [("tiny_llava", method) for method in LLAVA_ONLY] + [("tiny_qwen2_5vl", "visionzip")],
    {("tiny_qwen2vl", "clse"), ("tiny_qwen2_5vl", "fastv"), ("tiny_llava", "divprune"),
     *(("tiny_llava", method) for method in LLAVA_ONLY)}))
def test_keep_all_is_identity(name, method):
    loaded = model_with(name)
    batch = samples(3)
    inputs = loaded.prepare(batch)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        stock = loaded.model(**inputs).logits
        pruner = make_pruner(method, keep=1.0, protocol="uniform")
        fed = prepare(loaded, batch, pruner)  # as the method feeds them (CDPruner reads the questions)
        with pruner.attach(loaded.model):
            pruned = loaded.model(**fed).logits
    assert pruned.shape == stock.shape
    torch.testing.assert_close(pruned[valid], stock[valid], atol=1e-5, rtol=1e-5)
    official = make_pruner(method, keep=1.0)
    assert torch.equal(greedy(loaded, prepare(loaded, batch, official), official)[0], greedy(loaded, inputs)[0])


def test_detached_model_is_stock():
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(2))
    with torch.no_grad():
        before = loaded.model(**inputs).logits
        with make_pruner("clse", keep=0.2).attach(loaded.model):
            loaded.model(**inputs)
        after = loaded.model(**inputs).logits
    hooked = [m for m in loaded.model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooked == []
    assert torch.equal(before, after)


@pytest.mark.parametrize(("method", "protocol"), slow_except(
    [(method, protocol) for method in sorted(METHODS) for protocol in PROTOCOLS],
    {("pdrop", "official"), ("sparsevlm", "official"), ("visionzip", "official"), ("clse", "uniform")}))
def test_cached_decode_matches_recompute_for_every_method(method, protocol):
    """Under `ragged` every layer keeps what it processed, so a cached decode step must equal running the
    whole sequence again with the same tokens pruned (PDrop and DivPrune renumber positions officially)."""
    if method in VIDEO_METHODS:  # one cut before the LLM: no policy to choose; DyCoke's decode stage apart
        loaded, batch = model_with("tiny_llava_onevision"), video_samples(3)
        pruner = make_pruner(method, keep=0.4, protocol=protocol,
                             **({"decode_pruning": False} if method == "dycoke" else {}))
    else:
        loaded, batch = model_with("tiny_llava"), samples(3)
        pruner = make_pruner(method, keep=0.4, protocol=protocol, kv_policy="ragged")
    cached, recomputed = cached_vs_recomputed(loaded, prepare(loaded, batch, pruner), pruner)
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "attn"), slow_except(
    [(name, attn) for name in FAMILIES for attn in ("sdpa", "eager")], {("tiny_qwen2vl", "eager")}))
def test_cached_decode_matches_recompute_on_every_family(name, attn):
    loaded = model_with(name, attn)
    inputs = loaded.prepare(samples(3))
    cached, recomputed = cached_vs_recomputed(loaded, inputs, make_pruner("clse", keep=0.3, protocol="uniform"))
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


class MaskedRagged(Pruner):
    """Oracle for `crop`: keep every layer's full cache but hide, at decode, the visual tokens that did
    not survive the last cut (crop removes them physically instead)."""

    def _decode_kwargs(self, state, layer, rotary, implementation, hidden):
        prompt, final = state.layer_slots[layer], state.slots
        survives = torch.stack([torch.isin(prompt.idx[b], final.idx[b][final.valid[b]])
                                for b in range(prompt.idx.shape[0])])
        generated = torch.ones(prompt.idx.shape[0], state.generated, dtype=torch.bool)
        key_valid = torch.cat([prompt.valid & survives, generated], 1)
        return {"attention_mask": backend_mask(decode_pairs(key_valid, state.step_length), key_valid,
                                               implementation, hidden.dtype, padded=True)}

    def _remove_layer_hooks(self):  # the oracle's masks are per layer at every decode step
        pass


@pytest.mark.parametrize(("name", "attn", "batch"), slow_except(
    [(name, attn, batch) for name in FAMILIES for attn in ("sdpa", "eager") for batch in (1, 3)],
    {("tiny_qwen2vl", "sdpa", 3), ("tiny_llava", "eager", 3)}))
def test_crop_policy_matches_masked_full_cache(name, attn, batch):
    loaded = model_with(name, attn)
    inputs = loaded.prepare(samples(batch))
    crop = make_pruner("clse", keep=0.3, protocol="uniform", kv_policy="crop")
    reference = make_pruner("clse", keep=0.3, protocol="uniform", kv_policy="ragged")
    oracle = MaskedRagged(reference.method, keep=0.3, protocol="uniform", kv_policy="ragged")
    (crop_tokens, crop_scores), (oracle_tokens, oracle_scores) = greedy(loaded, inputs, crop), greedy(loaded, inputs,
                                                                                                     oracle)
    assert torch.equal(crop_tokens, oracle_tokens)
    torch.testing.assert_close(crop_scores[1:], oracle_scores[1:], atol=1e-5, rtol=1e-5)
    ragged_scores = greedy(loaded, inputs, reference)[1]
    finite = crop_scores[1:].isfinite()
    assert (crop_scores[1:] - ragged_scores[1:])[finite].abs().max() > 1e-3  # the policy really changes decoding
    assert [(s["layer"], s["kept"]) for s in crop.trace] == [(s["layer"], s["kept"]) for s in oracle.trace]


def test_crop_cuts_earlier_caches_to_survivors():
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(1))
    pruner = make_pruner("clse", keep=0.3, kv_policy="crop")
    with torch.no_grad(), pruner.attach(loaded.model):
        out = loaded.model(**inputs, use_cache=True)
    lengths = {layer.keys.shape[2] for layer in cache_of(out).layers}
    record = pruner.records[0]
    n_text = inputs["input_ids"].shape[1] - record.n_visual
    assert lengths == {n_text + len(pruner.trace[-1]["kept"][0])}
    assert record.cached == [n_text + len(record.kept)] * len(record.cached)


@pytest.mark.parametrize(("method", "attn", "protocol"), slow_except(
    [(method, attn, protocol) for method in sorted(METHODS) for attn in ("sdpa", "eager") for protocol in PROTOCOLS],
    {("clse", "sdpa", "official"), ("pdrop", "eager", "official"), ("dart", "sdpa", "official"),
     ("cdpruner", "sdpa", "official"), ("random", "eager", "uniform")}))
def test_batch_logits_match_batch_of_one(method, attn, protocol):
    video = method in VIDEO_METHODS
    loaded = model_with("tiny_llava_onevision" if video else "tiny_llava", attn)
    batch = video_samples(3) if video else samples(3, images_per_sample=(1, 2, 1))
    pruner = make_pruner(method, keep=0.4, protocol=protocol)
    batch_matches_alone(loaded, batch, pruner, steps=3)


@pytest.mark.parametrize("name", slow_except(["tiny_qwen2vl", "tiny_qwen2_5vl"], {"tiny_qwen2_5vl"}))
def test_batch_matches_single_on_qwen_families(name):
    loaded = model_with(name)
    batch = samples(3, images_per_sample=(1, 2, 1), sizes=(224, 168, 224))
    for method in ("clse", "dart", "divprune"):
        batch_matches_alone(loaded, batch, make_pruner(method, keep=0.3), steps=3)


@pytest.mark.slow
def test_uniform_protocol_keeps_the_tokens_of_the_engine_before_v2():
    """Regression oracle: tests/data/kept_before_engine_v2.json was recorded with the engine as it was before
    methods owned their knowledge (commit 72a44e2); `uniform` must keep exactly those tokens."""
    recorded = json.loads((Path(__file__).parent / "data" / "kept_before_engine_v2.json").read_text())
    for key, want in recorded.items():
        name, method, keep, budget = key.split("/")
        loaded = model_with(name)
        inputs = loaded.prepare(samples(3, images_per_sample=(1, 2, 1), sizes=(224, 168, 224)))
        pruner = make_pruner(method, keep=float(keep), budget=budget, protocol="uniform")
        with torch.no_grad(), pruner.attach(loaded.model):
            logits = loaded.model(**inputs).logits[:, -1]
        assert [s["layer"] for s in pruner.trace] == want["layers"], key
        assert [s["kept"] for s in pruner.trace] == want["kept"], key
        torch.testing.assert_close(logits.double().sum(-1), torch.tensor(want["last_logits_sum"], dtype=torch.double),
                                   atol=1e-4, rtol=1e-6)


def layer_inputs(loaded, inputs, pruner=None):
    """Every decoder layer's (input, position_ids, (cos, sin)) of one forward (pruned when given)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    captured = {}

    def hook(index):
        def fn(_module, args, kwargs):
            captured[index] = (args[0], kwargs.get("position_ids"), kwargs["position_embeddings"])
        return fn

    def forward():  # hooks registered after the pruner's see what the engine hands each layer
        handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(len(layers))]
        try:
            return loaded.model(**inputs, output_attentions=pruner is None)
        finally:
            for handle in handles:
                handle.remove()

    with torch.no_grad():
        if pruner is None:
            out = forward()
        else:
            with pruner.attach(loaded.model):
                out = forward()
    return out, captured, layers


def test_compact_positions_renumber_after_each_cut():
    """PDrop's official rule: after every cut the kept tokens take positions 0..n-1 again (1-D RoPE)."""
    loaded = model_with("tiny_llava")
    inputs = loaded.prepare(samples(1))
    pruner = make_pruner("pdrop", keep=0.125, budget="final")
    _, captured, _ = layer_inputs(loaded, inputs, pruner)
    length = inputs["input_ids"].shape[1]
    for layer, (hidden, position_ids, (cos, _)) in captured.items():
        assert position_ids[0].tolist() == list(range(hidden.shape[1])), layer
        stock = loaded.adapter.text_model(loaded.model).rotary_emb(hidden, position_ids)[0]
        torch.testing.assert_close(cos, stock)
    assert captured[31][0].shape[1] < length
    uniform = make_pruner("pdrop", keep=0.125, budget="final", protocol="uniform")
    _, captured, _ = layer_inputs(loaded, inputs, uniform)
    positions = captured[31][1][0]
    assert len(positions) < length and positions.max() == length - 1  # original positions keep their gaps
    assert bool((positions.diff() > 0).all())


class MergeFirst(PruningMethod):
    """A merging method for the contract test: keeps the first k tokens, the first of them replaced by the
    mean of every dropped token."""

    name = "merge_first"

    def capture_layers(self, layers):
        return set()

    def select(self, ctx, b, k):
        hidden = ctx.hidden_states(b)
        rows = hidden[:k].clone()
        rows[0] = hidden[k:].mean(0)
        return Selection(torch.arange(k), rows)


def test_a_method_can_merge_dropped_tokens_into_kept_ones():
    loaded = model_with("tiny_llava")
    inputs = loaded.prepare(samples(1))
    pruner = Pruner(MergeFirst(), keep=0.25, budget="final", prune_layers=[3], protocol="uniform")
    _, stock, _ = layer_inputs(loaded, inputs)
    _, pruned, _ = layer_inputs(loaded, inputs, pruner)
    record = pruner.records[0]
    k, n = len(record.kept), record.n_visual
    segment = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"])[0][0]
    visual_in = stock[3][0][0, segment.start : segment.start + n]
    merged_in = pruned[3][0][0, segment.start : segment.start + k]
    torch.testing.assert_close(merged_in[0], visual_in[k:].mean(0))
    torch.testing.assert_close(merged_in[1:], visual_in[1:k])
    assert pruner.trace[0]["merged"] == [1]  # the one row that differs from its token's own state


@pytest.mark.parametrize("name", FAMILIES)
def test_recomputed_attention_matches_eager(name):
    loaded = model_with(name, "eager")
    inputs = loaded.prepare(samples(3))
    out, captured, layers = layer_inputs(loaded, inputs)
    valid = inputs["attention_mask"].bool()
    for index in (0, 3):
        hidden, _, (cos, sin) = captured[index]
        batch = hidden.shape[0]
        ours = last_query_attention(layers[index], hidden, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1), valid)
        eager = out.attentions[index][:, :, -1, :].float().mean(1)
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)


def test_clse_prunes_each_image_on_its_own_grid():
    """Oracle: the stock model's layer inputs and eager attention, scored by the pure clse_scores with
    one grid per image, give the kept set the engine reports."""
    loaded = model_with("tiny_qwen2vl", "eager")
    sample = Sample("two", "Is there a red circle?", "yes", [noise_image(1, 224), noise_image(2, 168)])
    inputs = loaded.prepare([sample])
    out, captured, _ = layer_inputs(loaded, inputs)
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"])
    segments = layout[0]
    assert [s.grid for s in segments] == [(1, 8, 8), (1, 6, 6)]
    visual = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])
    attn = out.attentions[1][0, :, -1, :].float().mean(0)[visual]
    scores = clse_scores(captured[0][0][:, visual], captured[2][0][:, visual], [s.grid for s in segments],
                         attn=attn[None])
    pruner = make_pruner("clse", keep=0.5, reference_layer=0, prune_layers=[2])
    with torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**inputs)
    k = pruner.trace[0]["budget"][0]
    assert pruner.trace[0]["kept"][0] == scores[0].topk(k).indices.sort().values.tolist()


@pytest.mark.parametrize("method", slow_except(["clse", "pdrop", "dart"], {"pdrop"}))
def test_tokens_each_layer_processes_equal_the_record(method):
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(1))
    layers = loaded.adapter.decoder_layers(loaded.model)
    pruner = make_pruner(method, keep=0.3)
    seen = []
    with torch.no_grad(), pruner.attach(loaded.model):
        handles = [layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
                   for layer in layers]
        loaded.model(**inputs)
        for handle in handles:
            handle.remove()
    record = pruner.records[0]
    assert seen == record.processed
    assert record.n_prompt == inputs["input_ids"].shape[1]
    assert record.visual_per_layer[-1] < record.n_visual


def test_video_tokens_prune_per_frame_grid():
    loaded = model_with("tiny_qwen2vl")
    video = Sample("v", "What changes between the frames?", "no", [], video=[noise_image(i) for i in range(4)])
    inputs = loaded.prepare([video])
    pruner = make_pruner("clse", keep=0.3)
    greedy(loaded, inputs, pruner)
    record = pruner.records[0]
    assert record.grids == [[2, 8, 8]]
    assert record.n_visual == 128 and record.visual_per_layer[-1] < 128


def test_static_cache_is_refused():
    loaded = model_with("tiny_qwen2vl")
    inputs = loaded.prepare(samples(1))
    with pytest.raises(ValueError, match="DynamicCache"):
        with torch.no_grad(), make_pruner("fastv", keep=0.3).attach(loaded.model):
            loaded.model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_layers_resolve_against_the_model_they_attach_to():
    """The method's own layers come from the model it binds to, not from any default config."""
    pruner = make_pruner("clse", keep=0.334)
    with pruner.attach(model_with("tiny_qwen2vl").model):
        assert pruner.layers.prune_layers == (1, 10, 19)
    with pruner.attach(model_with("tiny_llava").model):
        assert pruner.layers.prune_layers == (1, 11, 21)
    with pytest.raises(ConfigError, match="40"):
        with make_pruner("fastv", keep=0.3, prune_layers=[40]).attach(model_with("tiny_qwen2vl").model):
            pass


def test_an_image_too_small_for_the_budget_is_recorded_not_hidden():
    loaded = model_with("tiny_qwen2vl")
    small = Sample("s", "Is there a red circle?", "yes", [noise_image(0, 56)])  # 2 x 2 = 4 visual tokens
    pruner = make_pruner("clse", keep=0.1, protocol="uniform")
    greedy(loaded, loaded.prepare([small]), pruner)
    record = pruner.records[0]
    assert record.n_visual == 4 and record.visual_per_layer[-1] == 1
    assert record.budget_unreachable and record.retention["average"] > 0.1
    big = Sample("b", "Is there a red circle?", "yes", [noise_image(0, 224)])
    greedy(loaded, loaded.prepare([big]), pruner)
    assert not pruner.records[0].budget_unreachable


def test_a_count_rule_that_departs_from_keep_is_flagged_and_logged_once(caplog):
    """Official CLSE on LLaVA at keep=0.33: round(0.33 * 576) = 190 is no table entry, so the count rule
    (1.72, 1.09, 0.32) x 190 keeps 326, 207, 60 at layers 1, 11, 21 of 32, a layer average of
    (576 + 10 * 326 + 10 * 207 + 11 * 60) / (32 * 576) = 0.356 where 0.33 was asked: beyond 0.02 plus half a
    token, so every such sample is flagged and the run says why once. The uniform protocol hits 0.33."""
    loaded = model_with("tiny_llava15")
    batch = loaded.prepare(samples(2, images_per_sample=(1,)))
    flags = {}
    for protocol in ("official", "uniform"):
        pruner = make_pruner("clse", keep=0.33, protocol=protocol)
        with caplog.at_level("WARNING", logger="clse_exp"):
            greedy(loaded, batch, pruner)
        records = pruner.records
        flags[protocol] = [r.budget_unreachable for r in records]
        if protocol == "official":
            assert [r.kept_per_stage for r in records] == [[326, 207, 60]] * 2
            expected = (576 + 10 * 326 + 10 * 207 + 11 * 60) / (32 * 576)
            assert records[0].retention["average"] == pytest.approx(expected)
    assert flags == {"official": [True, True], "uniform": [False, False]}
    assert caplog.text.count("a sample kept 0.356 of its 576 visual tokens") == 1


def test_departure_allows_half_a_token_per_grid():
    from clse_exp.pruning.record import RETENTION_ATOL, SampleRecord

    # 4 frames of 3 x 3 pooled to 2 x 2: 16 of 36 kept at the one layer, 0.444 for keep 1/3
    pooled = SampleRecord(36, 40, [[4, 3, 3]], [20], [20])
    assert pooled.departure(1 / 3, "average") == pytest.approx(16 / 36)
    allowance = RETENTION_ATOL + 0.5 * 4 / 36
    near = SampleRecord(36, 40, [[4, 3, 3]], [4 + 14], [18])  # 14 / 36 = 0.389: within 0.02 + 2 / 36
    assert near.departure(1 / 3, "average") is None and 14 / 36 - 1 / 3 < allowance
    assert SampleRecord(36, 40, [[4, 3, 3]], [4 + 14], [18]).departure(0.3, "final") == pytest.approx(14 / 36)


def test_budgets_the_layers_cannot_reach_fail_before_any_forward():
    with pytest.raises(ConfigError, match="smallest average retention"):
        make_pruner("pdrop", keep=0.1, model="tiny_qwen2vl")  # first cut at layer 7 of 28: floor 0.25
    with pytest.raises(ConfigError, match=r"prune\.shape"):
        make_pruner("clse", keep=0.5, shape=[1, 2], model="tiny_qwen2vl")
    with pytest.raises(ConfigError, match="prunes nothing"):
        make_pruner("fastv", keep=0.3, prune_layers=[], model="tiny_qwen2vl")
    with pytest.raises(ConfigError, match=r"keep=2"):
        make_pruner("clse", keep=2)


class TopCLSAttention(PruningMethod):
    """Reads the image encoder: keeps the patches the [CLS] token attends to most in CLIP's penultimate
    layer (head sum), recomputed from that layer's captured input."""

    name = "top_cls"

    def vision_layers(self, facts):
        return (-2,)

    def capture_layers(self, layers):
        return set()

    def select(self, ctx, b, k):
        layer = ctx.vision_layers[-2]
        scores = []
        for image in ctx.vision_inputs(b, -2):
            x = layer.layer_norm1(image[None])
            attn = layer.self_attn
            heads = attn.num_heads
            q = attn.q_proj(x[:, :1]).view(1, 1, heads, -1).transpose(1, 2)
            k_ = attn.k_proj(x).view(1, x.shape[1], heads, -1).transpose(1, 2)
            probs = torch.softmax((q @ k_.transpose(-1, -2)) * attn.scale, dim=-1)
            scores.append(probs[0, :, 0, 1:].sum(0))
        return torch.cat(scores).topk(k).indices


@pytest.mark.parametrize("use_generate", [False, True])
def test_methods_can_read_the_image_encoder(use_generate):
    """Oracle: the stock CLIP tower's eager attentions of the penultimate layer, per image of each sample."""
    loaded = model_with("tiny_llava")
    batch = samples(2, images_per_sample=(2, 1))
    inputs = loaded.prepare(batch)
    pruner = Pruner(TopCLSAttention(), keep=0.25, budget="final", prune_layers=[0], protocol="uniform")
    if use_generate:
        greedy(loaded, inputs, pruner, steps=2)
    else:
        with torch.no_grad(), pruner.attach(loaded.model):
            loaded.model(**inputs)
    tower = loaded.model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = tower(inputs["pixel_values"], output_attentions=True).attentions[-2]
    tower.config._attn_implementation = "sdpa"
    per_image = attentions[:, :, 0, 1:].sum(1)  # [images, patches]
    images = {0: [0, 1], 1: [2]}
    for b, owned in images.items():
        scores = torch.cat([per_image[i] for i in owned])
        k = pruner.trace[0]["budget"][b]
        assert pruner.trace[0]["kept"][b] == scores.topk(k).indices.sort().values.tolist()
