"""Model adapters and loaders: deterministic tiny builds, visual layouts, the real from_pretrained path."""

from __future__ import annotations

import pytest
import torch
from helpers import noise_image, samples
from omegaconf import OmegaConf

from clse_exp import load_model
from clse_exp.config import CONF_DIR, ModelConfig
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.models.tiny import TINY_BUILDERS

TINY = ("tiny_qwen2vl", "tiny_qwen2_5vl", "tiny_llava", "tiny_video_llava")


def model_cfg(name: str):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_build_and_generate_deterministically(name):
    cfg = model_cfg(name)
    spec = dict(OmegaConf.to_container(cfg.tiny), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    first, processor = TINY_BUILDERS[cfg.family](spec, cfg.family)
    second, _ = TINY_BUILDERS[cfg.family](spec, cfg.family)
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    loaded = load_model(name, "cpu")
    inputs = loaded.prepare(samples(2))
    runs = [loaded.model.generate(**inputs, max_new_tokens=5, do_sample=False,
                                  pad_token_id=processor.tokenizer.pad_token_id) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_qwen_layout_has_one_grid_per_image_and_per_video():
    loaded = load_model("tiny_qwen2vl", "cpu")
    batch = [Sample("a", "q?", "", [noise_image(0, 224), noise_image(1, 168)]),
             Sample("b", "q?", "", [], video=[noise_image(i, 112) for i in range(4)])]
    inputs = loaded.prepare(batch)
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                          video_grid_thw=inputs["video_grid_thw"])
    assert [s.grid for s in layout[0]] == [(1, 8, 8), (1, 6, 6)]
    assert [(s.kind, s.grid) for s in layout[1]] == [("video", (2, 4, 4))]
    ids = inputs["input_ids"]
    for b, segments in enumerate(layout):
        for seg in segments:
            token = loaded.model.config.image_token_id if seg.kind == "image" else loaded.model.config.video_token_id
            assert bool((ids[b, seg.start : seg.start + seg.length] == token).all())


def test_llava_layout_is_a_square_grid_per_image():
    loaded = load_model("tiny_llava", "cpu")
    inputs = loaded.prepare(samples(2, images_per_sample=(1, 2)))
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"])
    assert [[s.grid for s in segs] for segs in layout] == [[(1, 8, 8)], [(1, 8, 8), (1, 8, 8)]]


def test_local_directory_loads_through_from_pretrained(tmp_path):
    """The production path (from_pretrained on a hub id or a directory) on a saved tiny LLaVA."""
    tiny = load_model("tiny_llava", "cpu")
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    cfg = OmegaConf.merge(model_cfg("llava15"), {"name": "saved_llava", "path": str(tmp_path), "dtype": "float32"})
    saved = load_model(cfg, "cpu")
    tiny.model.set_attn_implementation("sdpa")
    inputs = tiny.prepare(samples(2))
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(saved.model(**inputs).logits[real], tiny.model(**inputs).logits[real])


def test_bad_model_names_and_paths_are_explained():
    with pytest.raises(ConfigError, match="tiny_qwen2vl"):
        load_model("qwen9", "cpu")
    cfg = OmegaConf.merge(model_cfg("qwen2vl"), {"path": "/no/such/dir"})
    with pytest.raises(ConfigError, match="/no/such/dir"):
        load_model(cfg, "cpu")
