"""Model families behind one loader: hub ids and local paths on clusters, tiny offline builds here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from clse_exp.config import FAMILIES, group_options, validate_model
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.models.base import LoadedModel, ModelAdapter, VisualSegment, sample_kinds
from clse_exp.models.hub import ensure_available
from clse_exp.models.internvl import InternVLAdapter
from clse_exp.models.llava import LlavaAdapter, VideoLlavaAdapter
from clse_exp.models.llava_onevision import LlavaOnevisionAdapter
from clse_exp.models.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from clse_exp.models.qwen3_vl import Qwen3VLAdapter
from clse_exp.pruning.methods.base import ModelFacts

__all__ = ["LoadedModel", "ModelAdapter", "VisualSegment", "ADAPTERS", "check_inputs", "describe", "load",
           "resolve_device", "resolve_dtype"]

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.family: cls for cls in (Qwen2VLAdapter, Qwen2_5_VLAdapter, LlavaAdapter, VideoLlavaAdapter, Qwen3VLAdapter,
                                LlavaOnevisionAdapter, InternVLAdapter)
}

_CACHE: dict[tuple, LoadedModel] = {}
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _model_class(family: str) -> type:
    import transformers

    names = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "llava": "LlavaForConditionalGeneration",
        "video_llava": "VideoLlavaForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        "internvl": "InternVLForConditionalGeneration",
    }
    return getattr(transformers, names[family])


def _load_pretrained(cfg: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoProcessor

    ensure_available(cfg.path)
    processor_kwargs = {k: cfg[k] for k in ("min_pixels", "max_pixels") if cfg.get(k) is not None}
    try:
        processor = AutoProcessor.from_pretrained(cfg.path, **processor_kwargs)
        # device_map (accelerate) splits a model too large for one device over every visible GPU (and CPU/disk)
        model = _model_class(cfg.family).from_pretrained(
            cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation,
            device_map=cfg.get("device_map") or str(device),
        )
    except OSError as err:  # a file missing from the cache or the directory (config.json alone is checked first)
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"model.path={cfg.path!r}: its processor or weights cannot be read ({first}); give a "
                          "complete local directory or download the whole checkpoint") from err
    return model.eval(), processor


def _build_tiny(cfg: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from clse_exp.models.tiny import TINY_BUILDERS

    spec = OmegaConf.to_container(cfg.tiny, resolve=True)
    spec.update(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model, processor = TINY_BUILDERS[cfg.family](spec, cfg.family)
    if cfg.get("weights"):
        from safetensors.torch import load_file

        path = Path(cfg.weights) if Path(cfg.weights).is_absolute() else PACKAGE_DIR / cfg.weights
        model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    model.set_attn_implementation(cfg.attn_implementation)
    return model.to(device=device, dtype=dtype), processor


def describe(cfg: DictConfig | dict) -> ModelFacts:
    """The model's family and depth from its config alone: the tiny spec, or config.json of a hub id or
    directory (a few KB; fails fast with one line when it is neither on disk nor reachable)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    adapter = ADAPTERS[cfg.family]()
    if cfg.path is None:
        return ModelFacts(adapter.family, int(cfg.tiny.num_layers), adapter.mrope)
    from transformers import AutoConfig

    ensure_available(cfg.path)  # seconds, one line, when it is neither cached nor downloadable
    try:
        config = AutoConfig.from_pretrained(cfg.path)
    except (OSError, ValueError) as err:
        offline = "HF_HUB_OFFLINE is set; " if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE") else ""
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"model.path={cfg.path!r}: its config.json is neither on disk nor reachable on the hub "
                          f"({offline}{first}); give a local directory or a cached hub id") from err
    return adapter.facts(config)


def check_inputs(cfg: DictConfig | dict, samples: list[Sample]) -> None:
    """Refuse, before any weights load, samples with a visual input the model family cannot take: its
    processor would drop it and the model would answer from the text alone."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    takes = ADAPTERS[cfg.family].input_kinds
    for kind in ("image", "video"):
        carrying = [s.id for s in samples if kind in sample_kinds(s)]
        if carrying and kind not in takes:
            able = ", ".join(f for f, adapter in ADAPTERS.items() if kind in adapter.input_kinds)
            raise ConfigError(f"model {cfg.name} (family {cfg.family}) takes {' and '.join(takes)} input only, but "
                              f"{len(carrying)} of {len(samples)} samples carry a {kind} (first: {carrying[0]}); "
                              f"use a dataset without {kind}s or a family that takes them: {able}")


def check_complete(cfg: DictConfig) -> None:
    """A model config without a name or family is one line naming the configs and families that exist,
    not omegaconf's MissingMandatoryValue traceback."""
    missing = [key for key in ("name", "family") if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None]
    if missing:
        given = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
        shown = {k: v for k, v in given.items() if v is not None and v != "???"} if isinstance(given, dict) else given
        raise ConfigError(f"model config {shown} has no {' or '.join(missing)}: give a conf/model name (one of: "
                          f"{', '.join(group_options('model'))}) or a config with name, family (one of: "
                          f"{', '.join(FAMILIES)}) and path (a hub id or local directory)")


def load(cfg: DictConfig | dict, device: str | torch.device = "auto") -> LoadedModel:
    """Load (or reuse from this process) the model named by a `conf/model` config."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    check_complete(cfg)
    validate_model(cfg)
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(cfg.dtype, device)
    # every key of the config (processor pixel limits included): a reused model is exactly the one asked for
    key = (json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str), str(dtype),
           str(device))
    if key not in _CACHE:
        build = _load_pretrained if cfg.path is not None else _build_tiny
        model, processor = build(cfg, device, dtype)
        _CACHE[key] = LoadedModel(cfg.name, model, processor, ADAPTERS[cfg.family](),
                                  OmegaConf.to_container(cfg, resolve=True))
    return _CACHE[key]
