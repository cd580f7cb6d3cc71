"""Benchmarks from Hugging Face datasets (hub id, local snapshot, or local parquet files).

Only the configured split is loaded. Images are decoded here, not by `datasets`, so one unreadable
image skips one sample (counted, with the reason) instead of ending the run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from clse_exp.data.prompts import PROMPTS
from clse_exp.data.sample import Sample
from clse_exp.data.video import sample_frames
from clse_exp.errors import ConfigError


def _load_split(source: str, config: str | None, split: str, data_files: Any) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(source, config, split=split, data_files=data_files)
    except ValueError as err:  # datasets names the available splits/configs in its message
        raise ConfigError(f"dataset {source!r} (config {config!r}, split {split!r}): {err}") from err
    except (ConnectionError, FileNotFoundError) as err:  # offline or unreachable hub, no local copy
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"dataset {source!r} is neither in the local datasets cache nor reachable on the hub "
                          f"({first}); download it once where the hub is reachable (it is cached under HF_HOME) "
                          "or give dataset.path=<a local snapshot>") from err


def _undecoded(dataset: Any, columns: list[str]) -> Any:
    from datasets import Image as ImageFeature
    from datasets import Sequence

    for column in columns:
        feature = dataset.features.get(column)
        if isinstance(feature, ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        elif isinstance(feature, Sequence | list) and "Image" in repr(feature):
            dataset = dataset.cast_column(column, [ImageFeature(decode=False)])
    return dataset


def decode_image(value: Any) -> Image.Image:
    """An HF image cell ({"bytes", "path"}, a path or a PIL image) as an RGB PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            value = io.BytesIO(data)
        elif path:
            value = path
        else:
            raise ValueError("image cell is empty")
    if value is None:
        raise ValueError("image is missing")
    image = Image.open(value)
    image.load()
    return image.convert("RGB")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items() if not isinstance(v, bytes)}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def subsample(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """All rows, or a seeded random subset of `limit` rows kept in dataset order. Subsets are nested: a larger
    limit keeps every row of a smaller one (so a resumed run with a larger limit only adds samples)."""
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return sorted(np.random.default_rng(seed).permutation(n_rows)[:limit].tolist())


def load_hf(cfg: Any) -> tuple[list[Sample], list[dict]]:
    """Samples of `cfg.split` and the rows skipped for bad media ({"id", "reason"})."""
    if cfg.prompt not in PROMPTS:
        raise ConfigError(f"dataset.prompt={cfg.prompt!r} is not valid; choose one of: {', '.join(sorted(PROMPTS))}")
    source = str(Path(cfg.path).expanduser()) if cfg.path else cfg.hf_id
    data_files = cfg.get("data_files")
    data_files = OmegaConf.to_container(data_files) if isinstance(data_files, DictConfig | ListConfig) else data_files
    dataset = _load_split(source, cfg.hf_config, cfg.split, data_files)
    media = [c for c in (cfg.image_column,) if c and c in dataset.column_names]
    dataset = _undecoded(dataset, media)
    joined = _joined_images(cfg, source)
    samples, skipped = [], []
    for index in subsample(len(dataset), cfg.limit, cfg.subsample_seed):
        row = dataset[index]
        sample_id = f"{cfg.name}-{index:06d}"
        doc = _json_safe({k: v for k, v in row.items() if k not in media})
        try:
            images, video = _media(cfg, row, joined)
        except Exception as err:  # noqa: BLE001 - any decoding failure skips just this sample
            skipped.append({"id": sample_id, "reason": f"{type(err).__name__}: {err}"})
            continue
        answer = row.get(cfg.answer_column) if cfg.answer_column else ""
        samples.append(Sample(sample_id, PROMPTS[cfg.prompt](doc), answer if isinstance(answer, str) else "",
                              images, video, meta=doc))
    return samples, skipped


def _joined_images(cfg: Any, source: str) -> dict | None:
    """GQA keeps images in another config: id -> undecoded image cell."""
    spec = cfg.get("images_from")
    if not spec:
        return None
    images = _undecoded(_load_split(source, spec.hf_config, spec.split, None), ["image"])
    return dict(zip(images[spec.id_column], images["image"], strict=True))


def _media(cfg: Any, row: dict, joined: dict | None) -> tuple[list[Image.Image], list[Image.Image] | None]:
    if cfg.get("video_column"):
        name = row[cfg.video_column]
        path = Path(cfg.video_root).expanduser() / (name if Path(name).suffix else f"{name}.mp4")
        if not path.exists() and path.with_suffix(".MP4").exists():  # EgoSchema's fallback (its utils.py:34)
            path = path.with_suffix(".MP4")
        if not path.exists():
            raise FileNotFoundError(f"video {path} not found")
        return [], sample_frames(path, cfg.num_frames)
    if joined is not None:
        key = row[cfg.images_from.key_column]
        if key not in joined:
            raise KeyError(f"no image with id {key!r}")
        return [decode_image(joined[key])], None
    cell = row.get(cfg.image_column)
    cells = cell if isinstance(cell, list) else [cell]
    return [decode_image(c) for c in cells], None
