"""Models split by a device map (accelerate's dispatch hooks, CPU and disk offload here, GPUs on a cluster):
the engine's hooks compose with accelerate's, so pruning keeps the same tokens and logits."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from helpers import greedy, samples, slow_except
from omegaconf import OmegaConf

from clse_exp import load_model, make_pruner
from clse_exp.config import CONF_DIR, ModelConfig, validate_model
from clse_exp.errors import ConfigError
from clse_exp.models import LoadedModel
from clse_exp.models.tiny import TINY_BUILDERS


def offloaded_copy(loaded: LoadedModel, offload_dir) -> LoadedModel:
    """The same weights, every other decoder layer and the final norm offloaded to disk, the rest on CPU."""
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{loaded.name}.yaml"))
    spec = dict(OmegaConf.to_container(cfg.tiny), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model, _ = TINY_BUILDERS[cfg.family](spec, cfg.family)
    model.load_state_dict(loaded.model.state_dict())
    text = "model.language_model"
    device_map = {"model.visual": "cpu", f"{text}.embed_tokens": "cpu", f"{text}.rotary_emb": "cpu",
                  f"{text}.norm": "disk", "lm_head": "cpu"}
    device_map.update({f"{text}.layers.{i}": "cpu" if i % 2 == 0 else "disk" for i in range(loaded.num_layers)})
    model = dispatch_model(model.eval(), device_map=device_map, offload_dir=str(offload_dir))
    return LoadedModel(loaded.name, model, loaded.processor, loaded.adapter, loaded.cfg)


@pytest.mark.parametrize("method", slow_except(["clse", "dart", "pdrop"], {"clse"}))
def test_pruning_through_accelerate_offload_hooks_is_unchanged(method, tmp_path):
    loaded = load_model("tiny_qwen2vl", "cpu")
    inputs = loaded.prepare(samples(2))
    pruner = make_pruner(method, keep=0.3)
    tokens, scores = greedy(loaded, inputs, pruner, steps=3)
    kept = [stage["kept"] for stage in pruner.trace]
    split = offloaded_copy(loaded, tmp_path)
    assert any(p.device.type == "meta" for p in split.model.parameters())  # really offloaded
    split_tokens, split_scores = greedy(split, inputs, pruner, steps=3)
    assert [stage["kept"] for stage in pruner.trace] == kept
    assert torch.equal(split_tokens, tokens)
    torch.testing.assert_close(split_scores, scores, atol=1e-5, rtol=1e-5)


def test_device_map_is_checked_before_loading():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / "qwen2vl.yaml"))
    cfg.device_map = "everywhere"
    with pytest.raises(ConfigError, match="model.device_map='everywhere'.*auto, balanced"):
        validate_model(cfg)
    tiny = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / "tiny_qwen2vl.yaml"))
    tiny.device_map = "auto"
    with pytest.raises(ConfigError, match="built in code"):
        validate_model(tiny)
