"""Structured-config schemas (registered with Hydra) and the checks Hydra's types cannot express."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from clse_exp.errors import ConfigError, choose_one

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "video_llava", "qwen3_vl", "llava_onevision", "internvl")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
CONF_DIR = Path(__file__).parent / "conf"


@dataclass
class TinySpec:
    num_layers: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_heads: int = 2
    rope_theta: float = 10000.0
    image_size: int = 112
    seed: int = 0
    initializer_range: float = 0.02
    tokenizer_file: str | None = None  # a saved tokenizer.json (relative to the clse_exp package); null trains one


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING
    path: str | None = None  # hub id or local directory; null builds the tiny model in code
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None
    max_pixels: int | None = None
    tiny: TinySpec | None = None
    weights: str | None = None  # safetensors for the tiny build (relative to the clse_exp package, or absolute)
    device_map: str | None = None  # auto | balanced | balanced_low_0 | sequential: split over the GPUs; null: one


@dataclass
class LayersConfig:
    """Where the stages run; null takes the method's own layers for the model (see each method)."""

    reference_layer: int | None = None
    prune_layers: list[int] | None = None


@dataclass
class ImagesFrom:
    """Images kept in another config of the same repo (GQA), joined on a key column."""

    hf_config: str = MISSING
    split: str = MISSING
    id_column: str = "id"
    key_column: str = MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    loader: str = MISSING  # synthetic | hf
    task: str | None = None  # scorer (clse_exp.metrics); defaults to `name`
    split: str = MISSING
    splits: list[str] = field(default_factory=list)
    limit: int | None = None  # first N (synthetic) or a seeded random N (benchmarks)
    subsample_seed: int = 0
    path: str | None = None  # a local copy (snapshot dir or parquet files) instead of the hub
    max_new_tokens: int = 16
    # hf loader
    hf_id: str | None = None  # the id the papers used (lmms-lab/...)
    hf_id_2026: str | None = None  # the same data after lmms-eval's 2026-07 org rename
    hf_config: str | None = None
    data_files: Any = None
    prompt: str | None = None  # clse_exp.data.prompts
    image_column: str | None = "image"
    answer_column: str | None = "answer"
    images_from: ImagesFrom | None = None
    video_column: str | None = None
    video_root: str | None = None
    # synthetic generator (and frames per video for the hf loader)
    size: int = 48
    variant: str = "image"
    image_size: int = 224
    grid: int = 3
    num_frames: int = 4
    qtypes: list[str] | None = None


@dataclass
class EvalConfig:
    reference: bool = True


@dataclass
class RunConfig:
    keep: float = 0.25
    budget: str = "average"
    schedule: str = "auto"
    protocol: str = "official"
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = MISSING
    prune: Any = MISSING  # each method's Options schema (clse_exp.pruning.methods), registered as prune=<name>
    layers: LayersConfig = field(default_factory=LayersConfig)
    dataset: DatasetConfig = MISSING
    logger: Any = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_schemas() -> None:
    from clse_exp.pruning.methods import register_method_schemas

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    register_method_schemas()


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. group_options("model")."""
    if group == "prune":
        from clse_exp.pruning.methods import method_names

        return method_names()
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def looks_local(path: str) -> bool:
    """A hub id is `org/name`; anything path-like (absolute, ./, ~, or more than one slash) is local."""
    return path.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)


def validate_model(model: Any) -> None:
    choose_one("model.family", model.family, FAMILIES)
    choose_one("model.dtype", model.dtype, DTYPES)
    choose_one("model.attn_implementation", model.attn_implementation, ATTN_IMPLEMENTATIONS)
    if model.get("device_map") is not None:
        choose_one("model.device_map", model.device_map, DEVICE_MAPS)
        if model.path is None:
            raise ConfigError(f"model.device_map={model.device_map!r} splits a checkpoint loaded from model.path; "
                              f"model '{model.name}' is built in code (set model.device_map=null)")
    if model.path is None and model.tiny is None:
        raise ConfigError(f"model.path is null for model '{model.name}': give a hub id or a local directory")
    if model.path is not None and looks_local(model.path) and not Path(model.path).expanduser().exists():
        raise ConfigError(f"model.path={model.path!r} does not exist: give an existing local directory or a hub id")


def validate_device(device: str, attn_implementation: str) -> None:
    """The device exists on this machine and the attention backend can run on it."""
    import torch

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device={device!r} is not valid; choose one of: auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: no CUDA device is available here (use device=cpu or device=auto)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps: no Apple MPS device is available here (use device=cpu or device=auto)")
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn); choose one of: sdpa, eager")
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; "
                              "choose sdpa or eager on the CPU")


def validate_dataset(data: Any) -> None:
    """Checks of the dataset config that read nothing from disk or the hub."""
    if data.limit is not None and data.limit < 0:
        raise ConfigError(f"dataset.limit={data.limit} must be >= 0 (or null for the whole split)")
    choose_one("dataset.split", data.split, list(data.splits))
    if data.max_new_tokens < 1:
        raise ConfigError(f"dataset.max_new_tokens={data.max_new_tokens} must be >= 1 (tokens generated per answer)")
    if data.loader == "synthetic":
        from clse_exp.data.synthetic import QTYPES

        if data.size < 1:
            raise ConfigError(f"dataset.size={data.size} must be >= 1 (synthetic samples per split)")
        if data.qtypes is not None:
            if len(data.qtypes) == 0:
                raise ConfigError(f"dataset.qtypes=[] asks for no questions; choose from: {', '.join(QTYPES)} "
                                  "(or null for all)")
            for qtype in data.qtypes:
                choose_one("dataset.qtypes entry", qtype, QTYPES)
    if data.loader != "synthetic" and data.get("video_column") and data.num_frames < 1:
        raise ConfigError(f"dataset.num_frames={data.num_frames} must be >= 1 (frames sampled per video)")
    if data.loader != "synthetic" and data.get("video_column"):
        root = data.get("video_root")
        if root is None:
            raise ConfigError(f"dataset.video_root is null: dataset={data.name} reads its videos from local files "
                              f"(<{data.video_column}>.mp4); set dataset.video_root=/path/to/the/unpacked/videos")
        if not Path(root).expanduser().is_dir():
            raise ConfigError(f"dataset.video_root={root!r} is not a directory: give the folder holding "
                              f"dataset={data.name}'s unpacked videos")
    if data.get("path") and data.loader != "synthetic" and not Path(data.path).expanduser().exists():
        raise ConfigError(f"dataset.path={data.path!r} does not exist: give a local snapshot or parquet folder, "
                          "or null for the hub id")


def validate_run(cfg: Any) -> Any:
    """Every check that needs no model weights; returns the run's pruner (None for prune=none), already
    bound to the model's family and depth read from its config, so layers and budget are checked too.
    Raises ConfigError with a one-line message."""
    from clse_exp.models import describe
    from clse_exp.pruning.build import pruner_from_config
    from clse_exp.pruning.methods.base import PROTOCOLS
    from clse_exp.pruning.schedule import check_budget

    check_budget(cfg.keep, cfg.budget, cfg.schedule, None)
    choose_one("protocol", cfg.protocol, PROTOCOLS)
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    validate_model(cfg.model)
    validate_device(cfg.device, cfg.model.attn_implementation)
    validate_dataset(cfg.dataset)
    pruner = pruner_from_config(cfg)
    if pruner is not None:
        pruner.method.check_inputs(dataset_has_videos(cfg.dataset))
        pruner.bind(describe(cfg.model))
    return pruner


def dataset_has_videos(data: Any) -> bool:
    """Whether a dataset config yields videos (a synthetic video variant, or a benchmark with a video column),
    so a method knob that needs frames can be refused before any weights load."""
    if data.loader == "synthetic":
        return data.get("variant") == "video"
    return data.get("video_column") is not None
