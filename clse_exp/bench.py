"""`python -m clse_exp.bench`: measured prefill/decode speed next to the FLOPs each method should save.

One process, one model: the unpruned baseline and every method x keep run on the same inputs, repeated,
medians reported. Writes bench.json (rows), bench.md (table) and bench.png (time ratio vs FLOPs ratio)
into the run folder.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from clse_exp import models
from clse_exp.api import make_pruner
from clse_exp.config import FAMILIES, validate_device
from clse_exp.data.sample import Sample
from clse_exp.efficiency.accounting import sample_costs
from clse_exp.efficiency.timing import GenerationTimer
from clse_exp.errors import ConfigError, choose_one
from clse_exp.generation import generate, prefill_records
from clse_exp.pruning.methods import METHODS
from clse_exp.pruning.methods.base import PROTOCOLS
from clse_exp.pruning.schedule import check_budget


def build_model(cfg: DictConfig, device: str) -> models.LoadedModel:
    side = int(math.isqrt(cfg.visual_tokens)) * 28
    spec = {k: cfg.model[k] for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "seed")}
    model_cfg = {
        "name": f"bench_{cfg.model.family}", "family": cfg.model.family, "path": cfg.model.path,
        "dtype": cfg.model.dtype, "attn_implementation": cfg.model.attn_implementation,
        "min_pixels": side * side, "max_pixels": side * side,
        "tiny": None if cfg.model.path else {**spec, "num_layers": cfg.model.num_layers, "vision_depth": 1,
                                             "image_size": side},
    }
    return models.load(model_cfg, device)


def bench_inputs(loaded: models.LoadedModel, cfg: DictConfig) -> dict:
    side = int(math.isqrt(cfg.visual_tokens)) * 28
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(side, side, 3, generator=generator) * 255).to(torch.uint8).numpy()
    from PIL import Image

    sample = Sample("bench", "Describe the image in detail. " * 4, "", [Image.fromarray(pixels)])
    return loaded.prepare([sample] * cfg.batch_size)


def measure(loaded: models.LoadedModel, inputs: dict, cfg: DictConfig, pruner: Any = None) -> dict:
    """Medians over repeats of prefill time, decode time per token and scoring time."""
    rows = []
    for i in range(cfg.warmup + cfg.repeats):
        timer = GenerationTimer(loaded.model, loaded.adapter.vision_towers(loaded.model), loaded.device)
        generate(loaded, inputs, cfg.decode_tokens + 1, pruner, timer, min_new_tokens=cfg.decode_tokens + 1,
                 stop=False)
        if i >= cfg.warmup:
            rows.append({"prefill_s": timer.prefill_s, "decode_s": timer.decode_s_per_token,
                         "scoring_s": pruner.stage_seconds if pruner is not None else 0.0})
    result = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    record = prefill_records(loaded, inputs, pruner)[0]
    result.update(sample_costs(loaded.model.config, record, loaded.model.dtype))
    result["retention"] = record.retention
    return result


def rows_for(loaded: models.LoadedModel, inputs: dict, cfg: DictConfig) -> list[dict]:
    base = measure(loaded, inputs, cfg)
    rows = [{"method": "none", "keep": 1.0, **_ratios(base, base)}]
    facts = loaded.adapter.facts(loaded.model.config)
    for method in cfg.methods:
        for keep in cfg.keeps:
            try:  # each method at its own layers for this depth
                pruner = make_pruner(method, keep=keep, budget=cfg.budget, protocol=cfg.protocol).bind(facts)
            except ConfigError as err:
                rows.append({"method": method, "keep": keep, "skipped": str(err)})
                continue
            pruner.time_stages = True
            rows.append({"method": method, "keep": keep, **_ratios(measure(loaded, inputs, cfg, pruner), base)})
    return rows


def _ratios(result: dict, base: dict) -> dict:
    return {
        "prefill_s": result["prefill_s"],
        "prefill_time_ratio": result["prefill_s"] / base["prefill_s"],
        "flops_ratio": result["prefill_flops"] / result["prefill_flops_unpruned"],
        "kv_ratio": result["kv_bytes"] / result["kv_bytes_unpruned"],
        "decode_time_ratio": result["decode_s"] / base["decode_s"] if base["decode_s"] else float("nan"),
        "overhead_frac": result["scoring_s"] / base["prefill_s"],
        "retention_average": result["retention"]["average"],
        "retention_final": result["retention"]["final"],
    }


def markdown(rows: list[dict], header: str) -> str:
    columns = ("method", "keep", "retention_average", "prefill_s", "prefill_time_ratio", "flops_ratio",
               "kv_ratio", "decode_time_ratio", "overhead_frac")
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['method']} | {row['keep']} | skipped: {row['skipped']} |")
            continue
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if "skipped" not in r and r["method"] != "none"):
        points = [r for r in rows if r["method"] == method and "skipped" not in r]
        ax.plot([p["flops_ratio"] for p in points], [p["prefill_time_ratio"] for p in points], "o-", label=method)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="time = FLOPs")
    ax.set_xlabel("prefill FLOPs ratio (pruned / unpruned)")
    ax.set_ylabel("prefill time ratio (pruned / unpruned)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, None)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validate(cfg: DictConfig) -> None:
    """Everything checkable before a model is built: one line naming the bad value."""
    for key, low in (("repeats", 1), ("warmup", 0), ("batch_size", 1), ("decode_tokens", 1), ("visual_tokens", 4)):
        if cfg[key] < low:
            raise ConfigError(f"{key}={cfg[key]} must be >= {low}")
    choose_one("model.family", cfg.model.family, FAMILIES)
    for method in cfg.methods:
        choose_one("methods entry", method, sorted(METHODS))
    for keep in cfg.keeps:
        check_budget(keep, cfg.budget, "auto", None)
    choose_one("protocol", cfg.protocol, PROTOCOLS)
    validate_device(cfg.device, cfg.model.attn_implementation)


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"clse_exp.bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(HydraConfig.get().runtime.output_dir)
    device = models.resolve_device(cfg.device)
    loaded = build_model(cfg, str(device))
    inputs = bench_inputs(loaded, cfg)
    rows = rows_for(loaded, inputs, cfg)
    text = loaded.model.config.get_text_config()
    header = (f"{cfg.model.path or 'random ' + cfg.model.family} | hidden {text.hidden_size}, {text.num_hidden_layers} "
              f"layers | {cfg.visual_tokens} visual + {int(inputs['attention_mask'][0].sum()) - cfg.visual_tokens} "
              f"text tokens | batch {cfg.batch_size} | {loaded.model.dtype} | {cfg.model.attn_implementation} | "
              f"{device} | median of {cfg.repeats}")
    (out / "bench.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg), "header": header,
                                                "rows": rows}, indent=2))
    (out / "bench.md").write_text(markdown(rows, header))
    plot(rows, out / "bench.png")
    print(markdown(rows, header))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
