"""Qwen3-VL, LLaVA-OneVision and InternVL3.5: tiny offline builds, visual layouts, the engine on them.

Layouts are checked against what the model itself does with the placeholder tokens: Qwen3-VL's M-RoPE
ids, LLaVA-OneVision's packed features (where it writes `image_newline`), InternVL's tile counts.
"""

from __future__ import annotations

import pytest
import torch
from helpers import cached_vs_recomputed, greedy, noise_image, samples
from torch.utils.flop_counter import FlopCounterMode

from clse_exp import load_model, make_pruner
from clse_exp.compat import cache_of
from clse_exp.data.sample import Sample
from clse_exp.efficiency.flops import prefill_flops
from clse_exp.efficiency.kv_cache import analytic_kv_bytes, measured_kv_bytes
from clse_exp.models.tiny import TINY_BUILDERS

NEW_FAMILIES = ("tiny_qwen3vl", "tiny_llava_onevision", "tiny_internvl")
DEPTHS = {"tiny_qwen3vl": 36, "tiny_llava_onevision": 28, "tiny_internvl": 36}


def frames(n: int = 4, size: int = 112) -> list:
    return [noise_image(50 + i, size) for i in range(n)]


CASES = {
    "one_image": [Sample("a", "Is there a red circle?", "", [noise_image(0, 224)])],
    "two_images": [Sample("a", "Which image is brighter?", "", [noise_image(1, 224), noise_image(2, 168)])],
    "video": [Sample("v", "What moves?", "", [], video=frames())],
}


def pad_id(loaded) -> int:
    return loaded.processor.tokenizer.pad_token_id


def generate(loaded, inputs, pruner=None, steps: int = 3) -> torch.Tensor:
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=pad_id(loaded))
    with torch.no_grad():
        if pruner is None:
            return loaded.model.generate(**inputs, **kwargs)
        with pruner.attach(loaded.model):
            return loaded.model.generate(**inputs, **kwargs)


class _Captured(Exception):
    pass


def forward_kwargs_in_generate(loaded, inputs) -> dict:
    """What the multimodal module receives at prefill inside generate() (the engine's view); the LLM is
    not run: the hook stops generate() there."""
    seen: dict = {}

    def capture(_module, _args, kwargs):
        seen.update(kwargs)
        raise _Captured

    hook = loaded.model.model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        generate(loaded, inputs, steps=1)
    except _Captured:
        pass
    finally:
        hook.remove()
    return seen


def layout_of(loaded, inputs):
    grids = {k: v for k, v in inputs.items() if k != "input_ids"}
    return loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], **grids)


def placeholder_positions(loaded, ids: torch.Tensor) -> set[int]:
    token_ids = list(loaded.adapter.visual_token_ids(loaded.model).values())
    return set(torch.isin(ids, torch.tensor(token_ids)).nonzero().flatten().tolist())


def assert_segments_partition(loaded, inputs, layout, separators: list[set[int]]) -> None:
    """Segments are disjoint, sized by their grids, and cover every placeholder except the separators."""
    for b, segments in enumerate(layout):
        covered = [p for seg in segments for p in seg.positions]
        assert all(len(seg.positions) == seg.t * seg.h * seg.w for seg in segments)
        assert all(list(seg.positions) == sorted(seg.positions) for seg in segments)
        assert len(covered) == len(set(covered))
        assert set(covered) | separators[b] == placeholder_positions(loaded, inputs["input_ids"][b])
        assert not set(covered) & separators[b]


# ---------------------------------------------------------------------------------------- stock generate
@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_tiny_builds_are_seeded(name):
    cfg = load_model(name, "cpu").cfg
    spec = dict(cfg["tiny"], min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    first, _ = TINY_BUILDERS[cfg["family"]](spec, cfg["family"])
    second, _ = TINY_BUILDERS[cfg["family"]](spec, cfg["family"])
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_tiny_builds_have_the_real_depth_and_generate_every_input_kind(name):
    loaded = load_model(name, "cpu")
    assert loaded.num_layers == DEPTHS[name]
    for case, batch in CASES.items():
        inputs = loaded.prepare(batch)
        out = generate(loaded, inputs)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 3), case
        assert bool((out[:, -3:] < loaded.model.config.text_config.vocab_size).all()), case


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_left_padded_batch_answers_as_each_sample_alone(name):
    """Two prompts of different lengths and image sizes: the batch's next-token logits equal each alone."""
    loaded = load_model(name, "cpu")
    batch = samples(2, images_per_sample=(1, 1), sizes=(224, 160))
    inputs = loaded.prepare(batch)
    assert inputs["attention_mask"][:, 0].tolist().count(0) == 1  # one prompt is left-padded
    with torch.no_grad():
        together = loaded.model(**inputs).logits[:, -1]
        alone = torch.cat([loaded.model(**loaded.prepare([s])).logits[:, -1] for s in batch])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- layouts
def test_qwen3vl_segments_follow_the_mrope_grid_of_every_image_and_frame_group():
    loaded = load_model("tiny_qwen3vl", "cpu")
    batch = [Sample("a", "q?", "", [noise_image(0, 224), noise_image(1, 160)]),
             Sample("b", "What moves?", "", [], video=frames(4, 112))]
    inputs = loaded.prepare(batch)
    layout = layout_of(loaded, inputs)
    assert [[(s.kind, s.grid) for s in segs] for segs in layout] == [
        [("image", (1, 7, 7)), ("image", (1, 5, 5))],
        [("video", (1, 4, 4)), ("video", (1, 4, 4))],  # 4 frames = 2 temporal patches, timestamps in between
    ]
    assert_segments_partition(loaded, inputs, layout, [set(), set()])
    mrope, _ = loaded.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  inputs["image_grid_thw"], inputs["video_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
    for b, segments in enumerate(layout):
        for seg in segments:
            t, h, w = (mrope[axis, b, list(seg.positions)].view(seg.h, seg.w) for axis in range(3))
            assert (t == t[0, 0]).all()  # a frame group sits at one temporal position
            assert torch.equal(h - h[0, 0], torch.arange(seg.h)[:, None].expand(seg.h, seg.w))
            assert torch.equal(w - w[0, 0], torch.arange(seg.w)[None, :].expand(seg.h, seg.w))
    kwargs = forward_kwargs_in_generate(loaded, inputs)
    assert kwargs["video_grid_thw"] is None  # generate() consumed the grids: the layout comes from M-RoPE ids
    assert loaded.adapter.visual_layout(loaded.model, kwargs.pop("input_ids"), **kwargs) == layout


def llava_onevision_newlines(loaded, inputs) -> list[set[int]]:
    """Oracle: the sequence positions where LLaVA-OneVision's own feature packing puts `image_newline`
    (a sentinel here), mapped onto the placeholder positions in the order masked_scatter fills them."""
    model = loaded.model.model
    saved = model.image_newline.detach().clone()
    try:
        with torch.no_grad():
            model.image_newline.fill_(1234.5)
            rows = []
            if "pixel_values" in inputs:
                packed = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                  batch_num_images=inputs["batch_num_images"], return_dict=True)
                rows.append(("image", torch.cat(packed.pooler_output)))
            if "pixel_values_videos" in inputs:
                packed = model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
                rows.append(("video", packed.pooler_output.flatten(0, 1)))
    finally:
        with torch.no_grad():
            model.image_newline.copy_(saved)
    ids = inputs["input_ids"]
    newlines: list[set[int]] = [set() for _ in range(len(ids))]
    for kind, features in rows:
        slots = (ids == loaded.adapter.visual_token_ids(loaded.model)[kind]).nonzero().tolist()
        assert len(slots) == len(features)
        for (b, pos), row in zip(slots, features, strict=True):
            if bool((row == 1234.5).all()):
                newlines[b].add(pos)
    return newlines


ONEVISION_BATCHES = {
    # one image per sample: crops; wide, tall, square, and so large the canvas is shrunk to 9 crops' worth
    "single": [Sample("a", "q?", "", [noise_image(0, 224).resize((250, 120))]),
               Sample("b", "A longer question about it?", "", [noise_image(1, 224).resize((90, 200))]),
               Sample("c", "q?", "", [noise_image(2, 504)])],
    "multi": [Sample("a", "Compare them.", "", [noise_image(3, 224), noise_image(4, 160)]),
              Sample("b", "q?", "", [noise_image(5, 200)])],
    "video": [Sample("v", "What moves?", "", [], video=frames(4, 112))],
}


@pytest.mark.parametrize("case", ONEVISION_BATCHES)
def test_llava_onevision_segments_skip_exactly_the_newlines_the_model_inserts(case):
    loaded = load_model("tiny_llava_onevision", "cpu")
    inputs = loaded.prepare(ONEVISION_BATCHES[case])
    layout = layout_of(loaded, inputs)
    newlines = llava_onevision_newlines(loaded, inputs)
    assert_segments_partition(loaded, inputs, layout, newlines)
    for b, segments in enumerate(layout):
        for seg in segments:  # a canvas row ends in a newline: rows are `w` tokens apart plus one
            if seg.index is not None:
                assert {seg.positions[r * seg.w + seg.w - 1] + 1 for r in range(seg.h)} <= newlines[b]
    if case == "single":
        assert [[s.grid for s in segs] for segs in layout] == [
            [(1, 6, 6), (1, 8, 18)], [(1, 6, 6), (1, 18, 8)], [(1, 6, 6), (1, 18, 18)]]
    if case == "multi":  # several images in a sample: base grids only, one newline each
        assert [[s.grid for s in segs] for segs in layout][0] == [(1, 6, 6), (1, 6, 6)]
    if case == "video":
        assert [[s.grid for s in segs] for segs in layout] == [[(4, 3, 3)]]
    kwargs = forward_kwargs_in_generate(loaded, inputs)
    assert kwargs["image_sizes"] is None  # generate() consumed them: the layout comes from the packed features
    assert loaded.adapter.visual_layout(loaded.model, kwargs.pop("input_ids"), **kwargs) == layout


def test_internvl_has_one_square_grid_per_tile_thumbnail_and_frame():
    loaded = load_model("tiny_internvl", "cpu")
    sizes = [(224, 224), (300, 120), (100, 100)]
    batch = [Sample("a", "q?", "", [noise_image(0, 224).resize(sizes[0]), noise_image(1, 224).resize(sizes[1])]),
             Sample("b", "q?", "", [noise_image(2, 224).resize(sizes[2])]),
             Sample("v", "What moves?", "", [], video=frames(3, 112))]
    inputs = loaded.prepare(batch)
    layout = layout_of(loaded, inputs)
    image_processor = loaded.processor.image_processor
    tiles = [image_processor.get_number_of_image_patches(h, w, {"crop_to_patches": True}) for w, h in sizes]
    assert tiles[0] > 1 and tiles[2] == 1
    assert [len(segs) for segs in layout] == [tiles[0] + tiles[1], tiles[2], 3]
    assert len(inputs["pixel_values"]) == sum(len(segs) for segs in layout)  # tiles and frames, in prompt order
    assert {s.grid for segs in layout for s in segs} == {(1, 4, 4)}
    assert_segments_partition(loaded, inputs, layout, [set(), set(), set()])
    kwargs = forward_kwargs_in_generate(loaded, inputs)
    assert loaded.adapter.visual_layout(loaded.model, kwargs.pop("input_ids"), **kwargs) == layout


# ---------------------------------------------------------------------------------------------- engine
def engine_batch(name: str) -> list[Sample]:
    """Two left-padded prompts the engine can lay out today (LLaVA-OneVision: videos, see ANYRES_BREAK)."""
    if name == "tiny_llava_onevision":
        return [Sample("v", "What moves?", "", [], video=frames(4)),
                Sample("w", "Which object moves the most in this clip?", "", [], video=frames(4, 96))]
    return samples(2, images_per_sample=(1, 2), sizes=(224, 160))


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_attached_engine_that_keeps_every_token_changes_no_logit(name):
    """The engine's own masks, gathered rotary and position ids reproduce each decoder's stock forward."""
    loaded = load_model(name, "cpu")
    inputs = loaded.prepare(engine_batch(name))
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        stock = loaded.model(**inputs).logits
        pruner = make_pruner("random", keep=1.0, layers="single", prune_layers=[2])
        with pruner.attach(loaded.model):
            attached = loaded.model(**inputs).logits
    assert pruner.trace_records()[0]["n_visual"] > 0
    torch.testing.assert_close(attached[valid], stock[valid], atol=1e-5, rtol=1e-5)


ENGINE_CASES = [
    ("tiny_qwen3vl", "one_image", 3), ("tiny_qwen3vl", "video", 3),
    ("tiny_qwen3vl", "one_image", 1), ("tiny_qwen3vl", "one_image", 2),
    ("tiny_llava_onevision", "one_image", 2),
    ("tiny_llava_onevision", "video", 2),
    ("tiny_internvl", "two_images", 2), ("tiny_internvl", "video", 2),
]


@pytest.mark.parametrize(("name", "case", "layer"), ENGINE_CASES)
def test_random_pruning_runs_in_generate_and_keeps_every_separator(name, case, layer):
    loaded = load_model(name, "cpu")
    inputs = loaded.prepare(CASES[case])
    pruner = make_pruner("random", keep=0.5, layers="single", prune_layers=[layer])
    lengths = []
    last = loaded.adapter.decoder_layers(loaded.model)[-1]
    hook = last.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    try:
        out = generate(loaded, inputs, pruner)
    finally:
        hook.remove()
    record = pruner.trace_records()[0]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert 0 < record["kept_per_stage"][0] < record["n_visual"]
    # Only visual tokens went: text, timestamps, tile brackets and newline tokens all reach the last layer.
    assert lengths[0] == inputs["input_ids"].shape[1] - record["n_visual"] + record["kept_per_stage"][0]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method", "case"), [
    (name, method, case) for name in NEW_FAMILIES
    for method in ("clse", "dart", "divprune", "fastv", "pdrop", "random") for case in ("one_image", "video")
])
def test_every_method_at_its_default_layers(name, method, case):
    """`python -m clse_exp model=<family> prune=<method> keep=0.3` (PDrop cuts first at 1/4 depth, so a
    layer-averaged 0.25 is out of its reach: a one-line error, tested in test_engine)."""
    loaded = load_model(name, "cpu")
    inputs = loaded.prepare(CASES[case])
    pruner = make_pruner(method, keep=0.3, model=name)
    out = generate(loaded, inputs, pruner, steps=2)
    record = pruner.trace_records()[0]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert record["kept_per_stage"][-1] < record["n_visual"]


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_cached_decode_equals_recomputation_and_batch_equals_single(name):
    loaded = load_model(name, "cpu")
    batch = [*CASES["one_image"], *CASES["two_images"]]
    pruner = make_pruner("clse", keep=0.4)
    inputs = loaded.prepare(batch)
    cached, recomputed = cached_vs_recomputed(loaded, inputs, pruner)
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)
    _, together = greedy(loaded, inputs, pruner, steps=2)
    for i, sample in enumerate(batch):
        _, alone = greedy(loaded, loaded.prepare([sample]), pruner, steps=2)
        torch.testing.assert_close(together[:, i], alone[:, 0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_flops_and_kv_bytes_equal_the_counter_and_the_cache(name):
    loaded = load_model(name, "cpu")
    loaded.model.set_attn_implementation("eager")
    inputs = loaded.prepare(CASES["one_image"])
    pruner = make_pruner("random", keep=0.3, prune_layers=[3])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, pruner.attach(loaded.model):
        out = loaded.model(**inputs, logits_to_keep=1, use_cache=True)
    flops = {name.split(".", 1)[-1]: sum(v.values()) for name, v in counter.get_flop_counts().items()}
    record = pruner.records[0]
    analytic = prefill_flops(loaded.model.config, record.processed)
    text = next(v for k, v in flops.items() if k.endswith("language_model"))
    assert abs(text - sum(analytic.per_layer)) <= 0.01 * sum(analytic.per_layer)
    assert measured_kv_bytes(cache_of(out)) == analytic_kv_bytes(loaded.model.config, record.cached, torch.float32)


def test_deepstack_features_follow_the_kept_tokens():
    """Oracle: run Qwen3-VL's stock layers by hand, adding each DeepStack feature after layers 0-2 to the
    visual tokens still present (the cut before layer 1 drops the others' features with them)."""
    loaded = load_model("tiny_qwen3vl", "cpu")
    loaded.model.set_attn_implementation("eager")
    inputs = loaded.prepare(CASES["one_image"])
    text = loaded.model.model.language_model
    seen = {}
    hooks = [text.register_forward_pre_hook(lambda _m, _a, kw: seen.update(text=kw), with_kwargs=True),
             text.layers[0].register_forward_pre_hook(lambda _m, a, kw: seen.update(layer=(a[0], kw)),
                                                      with_kwargs=True)]
    with torch.no_grad():
        loaded.model(**inputs)
    for hook in hooks:
        hook.remove()
    pruner = make_pruner("random", keep=0.5, budget="final", prune_layers=[1])
    with torch.no_grad(), pruner.attach(loaded.model):
        ours = loaded.model(**inputs).logits[0, -1]
    hidden, kwargs = seen["layer"]
    cos, sin = kwargs["position_embeddings"]
    where, features = seen["text"]["visual_pos_masks"][0], seen["text"]["deepstack_visual_embeds"]
    visual = where.nonzero().flatten()
    keep = torch.ones(hidden.shape[1], dtype=torch.bool)
    keep[visual] = False
    keep[visual[pruner.trace[0]["kept"][0]]] = True
    with torch.no_grad():
        for index, layer in enumerate(text.layers):
            if index == 1:
                hidden, cos, sin, where = hidden[:, keep], cos[:, keep], sin[:, keep], where[keep]
                features = [f[keep[visual]] for f in features]
            length = hidden.shape[1]
            mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
            if index < len(features):
                hidden = hidden.clone()
                hidden[0, where] += features[index]
        expected = loaded.model.lm_head(text.norm(hidden))[0, -1]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
