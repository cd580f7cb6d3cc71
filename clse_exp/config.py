"""Structured-config schemas (registered with Hydra) and the checks Hydra's types cannot express."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from clse_exp.errors import ConfigError

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "video_llava", "qwen3_vl", "llava_onevision", "internvl")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
BUDGETS = ("average", "final")
SCHEDULES = ("auto", "paper")
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
class PaperLayers:
    reference_layer: int = 0
    prune_layers: list[int] = field(default_factory=list)


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
    paper_layers: PaperLayers = field(default_factory=PaperLayers)
    pdrop_layers: list[int] = field(default_factory=list)


@dataclass
class LayersConfig:
    name: str = MISSING
    reference_layer: int = 0
    prune_layers: list[int] = field(default_factory=list)


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
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = MISSING
    prune: Any = MISSING  # each method validates its own knobs (clse_exp.pruning.methods)
    layers: LayersConfig = MISSING
    dataset: DatasetConfig = MISSING
    logger: Any = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_schemas() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. group_options("model")."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _choice(name: str, value: Any, choices: tuple | list) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def looks_local(path: str) -> bool:
    """A hub id is `org/name`; anything path-like (absolute, ./, ~, or more than one slash) is local."""
    return path.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)


def validate_model(model: Any) -> None:
    _choice("model.family", model.family, FAMILIES)
    _choice("model.dtype", model.dtype, DTYPES)
    _choice("model.attn_implementation", model.attn_implementation, ATTN_IMPLEMENTATIONS)
    if model.path is None and model.tiny is None:
        raise ConfigError(f"model.path is null for model '{model.name}': give a hub id or a local directory")
    if model.path is not None and looks_local(model.path) and not Path(model.path).expanduser().exists():
        raise ConfigError(f"model.path={model.path!r} does not exist: give an existing local directory or a hub id")


def validate_run(cfg: Any) -> None:
    """Checks that need no model weights; raises ConfigError with a one-line message."""
    if not 0.0 < cfg.keep <= 1.0:
        raise ConfigError(f"keep={cfg.keep} is outside (0, 1]: it is the fraction of visual tokens kept")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    _choice("budget", cfg.budget, BUDGETS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(f"device={cfg.device!r} is not valid; choose one of: auto, cpu, cuda, cuda:N, mps")
    validate_model(cfg.model)
    data = cfg.dataset
    if data.limit is not None and data.limit < 0:
        raise ConfigError(f"dataset.limit={data.limit} must be >= 0 (or null for the whole split)")
    _choice("dataset.split", data.split, list(data.splits))


def validate_layers(reference_layer: int, prune_layers: list[int], num_layers: int) -> None:
    """Stage layers must exist in the model and come after the reference layer."""
    valid = f"valid layers are 0..{num_layers - 1}"
    for layer in prune_layers:
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layers.prune_layers contains {layer}: the model has {num_layers} layers ({valid})")
    if list(prune_layers) != sorted(set(prune_layers)):
        raise ConfigError(f"layers.prune_layers={list(prune_layers)} must be strictly increasing")
    if not 0 <= reference_layer < num_layers:
        raise ConfigError(f"layers.reference_layer={reference_layer} is outside the model ({valid})")
    if prune_layers and reference_layer > prune_layers[0]:
        raise ConfigError(
            f"layers.reference_layer={reference_layer} comes after the first prune layer {prune_layers[0]}: "
            "the reference must be at or before it"
        )
