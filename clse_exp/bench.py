"""`python -m clse_exp.bench`: measured prefill/decode speed next to the FLOPs each method should save, and
next to the ideal: the same per-layer token counts run by the stock layers with no engine at all.

One process, one model: the unpruned baseline and every method x keep run on the same inputs, repeated,
medians reported; one table per attention backend x batch size. Each repeat times the engine's prefill and,
right after it, the ideal prefill on the tokens that run kept, so `engine_overhead` is a ratio within pairs
(robust to a machine whose load drifts). Writes bench.json (tables), bench.md and bench.png (time ratio vs
FLOPs ratio) into the run folder. Presets: `+bench_preset=<name>` (conf/bench_preset/).
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from clse_exp import models
from clse_exp.api import make_pruner
from clse_exp.config import validate_device
from clse_exp.data.sample import Sample
from clse_exp.efficiency.accounting import sample_costs
from clse_exp.efficiency.counts import generate_phases
from clse_exp.efficiency.ideal import IdealUnavailable, Segments, ideal_text_model, segments_from_trace
from clse_exp.efficiency.kv_cache import analytic_kv_bytes
from clse_exp.efficiency.memory import peak_memory_bytes, reset_peak
from clse_exp.efficiency.timing import GenerationTimer, time_calls
from clse_exp.errors import ConfigError, choose_one
from clse_exp.generation import generate, prefill_records, prepare
from clse_exp.pruning.engine import Pruner
from clse_exp.pruning.methods import METHODS
from clse_exp.pruning.methods.base import PROTOCOLS
from clse_exp.pruning.schedule import check_budget

ATTENTION = ("sdpa", "eager", "flash_attention_2")
OVERHEAD = ("engine_overhead", "scoring", "masks_gathers", "hooks", "unexplained")  # the last four sum to the first
PREFILL_COLUMNS = ("method", "keep", "retention_average", "prefill_s", "ideal_s", "prefill_time_ratio",
                   "ideal_time_ratio", "flops_ratio", *OVERHEAD)
DECODE_COLUMNS = ("method", "keep", "decode_tokens_per_s", "decode_time_ratio", "kv_mib_per_sample", "kv_ratio",
                  "max_batch", "peak_mib")
SERVING_COLUMNS = ("method", "keep", "prefill_s", "vision_s", "scoring_s", "llm_s", "decode_tokens_per_s",
                   "throughput_tokens_per_s", "prefill_time_ratio", "decode_time_ratio", "peak_mib")
COUNT_PHASES = ("vision", "prefill", "decode_step")
COUNT_COLUMNS = ("method", "keep", *(f"{phase}_{kind}" for phase in COUNT_PHASES for kind in ("kernels", "syncs")),
                 "prefill_extra_kernels", "decode_extra_kernels", "host_ops")


# --------------------------------------------------------------------------------------------- model and inputs
DOWNSAMPLE_FLOOR = 56 * 56  # the processors' smallest area: Qwen2-VL's default min_pixels, so downsample can shrink


IMAGE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava")  # one image = a square grid of known geometry
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")  # `frames` > 0: one video per prompt
BENCH_FAMILIES = tuple(dict.fromkeys(IMAGE_FAMILIES + VIDEO_FAMILIES))


def image_side(cfg: DictConfig) -> int:
    """Pixels per side of one bench image: sqrt(visual_tokens) cells of the family's pixels per visual token
    (28 for Qwen-VL's merged 14-pixel patches, 14 for LLaVA's CLIP patches)."""
    return int(math.isqrt(cfg.visual_tokens)) * models.ADAPTERS[cfg.model.family].token_pixels


def model_spec(model: DictConfig, side: int) -> dict:
    """The random model's tiny-builder spec after `model.scale` (hidden and intermediate widths shrink; depth and
    head counts stay, so every method's stage layers are the real ones)."""
    scale, heads = float(model.scale), int(model.num_heads)
    head_dim = round(model.hidden_size * scale / heads)
    if head_dim < 8 or head_dim % 2:
        raise ConfigError(f"model.scale={model.scale} gives head_dim {head_dim} (hidden {model.hidden_size} x scale / "
                          f"{heads} heads): it must be even and at least 8; raise model.scale")
    return {
        "hidden_size": head_dim * heads, "intermediate_size": max(8, round(model.intermediate_size * scale)),
        "num_layers": int(model.num_layers), "num_heads": heads, "num_kv_heads": int(model.num_kv_heads),
        "rope_theta": float(model.rope_theta), "seed": int(model.seed), "vision_depth": 1, "image_size": side,
        "min_pixels": DOWNSAMPLE_FLOOR, "max_pixels": side * side,
    }


def build_model(cfg: DictConfig, device: torch.device) -> models.LoadedModel:
    """A real checkpoint (`model.path`), or a seeded random one built ON `device` (a 7B-sized model is drawn on
    the GPU, not in host memory), then cast to `model.dtype`; `model.vocab_size` (x `model.scale`) widens the
    vocabulary beyond the offline tokenizer's."""
    model_cfg = {
        "name": f"bench_{cfg.model.family}", "family": cfg.model.family, "path": cfg.model.path,
        "dtype": cfg.model.dtype, "attn_implementation": cfg.attn_implementations[0],
        "min_pixels": DOWNSAMPLE_FLOOR, "max_pixels": image_side(cfg) ** 2, "tiny": None,
    }
    if cfg.model.path:
        return models.load(model_cfg, device)
    from clse_exp.models.tiny import TINY_BUILDERS

    spec = model_spec(cfg.model, image_side(cfg))
    with torch.device(device):
        model, processor = TINY_BUILDERS[cfg.model.family](spec, cfg.model.family)
        if cfg.model.vocab_size:
            vocab = max(round(cfg.model.vocab_size * float(cfg.model.scale)), len(processor.tokenizer))
            model.resize_token_embeddings(vocab, mean_resizing=False)
    model = model.to(dtype=models.resolve_dtype(cfg.model.dtype, device)).eval()
    model.set_attn_implementation(cfg.attn_implementations[0])
    return models.LoadedModel(model_cfg["name"], model, processor, models.ADAPTERS[cfg.model.family](),
                              {**model_cfg, "tiny": spec})


def bench_samples(cfg: DictConfig, batch: int) -> list[Sample]:
    """`batch` copies of one prompt: `images` seeded noise images of `visual_tokens` tokens each, or with
    `frames` > 0 one video of that many noise frames (`visual_tokens` per frame the LLM sees)."""
    from PIL import Image

    side = image_side(cfg)
    generator = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray((torch.rand(side, side, 3, generator=generator) * 255).to(torch.uint8).numpy())
                for _ in range(cfg.frames or cfg.images)]
    if cfg.frames:
        return [Sample("bench", "Describe the video in detail. " * 4, "", [], video=pictures)] * batch
    return [Sample("bench", "Describe the images in detail. " * 4, "", pictures)] * batch


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# ------------------------------------------------------------------------------------------------- measuring
def _layout(loaded: models.LoadedModel, inputs: dict) -> list:
    return loaded.layout(inputs)


def _ideal_prefill(loaded: models.LoadedModel, inputs: dict, segments: Segments) -> float:
    """Prefill seconds of the stock model with its text tower run as the ideal segments (same top-level span
    as the engine's prefill: vision, embeddings, positions, layers, norm, last-position logits)."""
    timer = GenerationTimer(loaded.model, loaded.adapter.vision_towers(loaded.model), loaded.device)
    with ideal_text_model(loaded.adapter.text_model(loaded.model), segments, loaded.adapter.mrope):
        generate(loaded, inputs, 1, None, timer, min_new_tokens=1, stop=False)
    return timer.prefill_s


ENGINE_HOOKS = ("_on_multimodal", "_on_text_model", "_after_text_model")  # the Pruner's hook bodies


@contextmanager
def engine_clock(pruner: Pruner | None) -> Iterator[dict[str, list[tuple[float, float]]]]:
    """Host time in the pruner's hook bodies ("hooks": the multimodal, text-model and every decoder-layer hook)
    and, within them, in its per-layer kwargs ("masks": rotary, position ids and mask for the current slots;
    Pruner._prefill_kwargs). Host time is wall time on a CPU; on a GPU it is the launch side only."""
    logs: dict[str, list[tuple[float, float]]] = {"hooks": [], "masks": []}
    with ExitStack() as stack:
        if pruner is not None:
            for name in ENGINE_HOOKS:
                stack.enter_context(time_calls(pruner, name, logs["hooks"]))
            stack.enter_context(time_calls(pruner, "_layer_hook", logs["hooks"], of_result=True))
            stack.enter_context(time_calls(pruner, "_prefill_kwargs", logs["masks"]))
        yield logs


def measure(loaded: models.LoadedModel, inputs: dict, cfg: DictConfig, pruner: Pruner | None = None,
            stock_inputs: dict | None = None) -> dict:
    """Medians over repeats of prefill, ideal prefill and decode time, and the engine overhead split, each a
    median of within-repeat ratios to the ideal prefill: `scoring` (the stages: select, shrink, the cut's
    gather), `masks_gathers` (per-layer rotary/position/mask kwargs), `hooks` (the rest of the hook bodies:
    layout, slot bookkeeping, records) and `unexplained` (total minus those: hook dispatch, cache effects,
    noise), so the four sum to `engine_overhead`. With `stock_inputs` (`interleave=true`) every repeat also
    times the unpruned model on them, alternating which goes first, and the time ratios are medians of those
    within-repeat pairs (a machine whose speed drifts favours neither)."""
    device, length, layout = loaded.device, inputs["input_ids"].shape[1], _layout(loaded, inputs)
    repeats: list[dict] = []
    ideal_note, segments = None, None
    for i in range(cfg.warmup + cfg.repeats):
        # odd repeats time the ideal first (the kept tokens are the previous repeat's), so a drifting machine
        # load does not favour one side of the pair
        ideal_first = segments is not None and i % 2 == 1
        ideal_s = _ideal_prefill(loaded, inputs, segments) if ideal_first else None
        stock = _time_stock(loaded, stock_inputs, cfg) if stock_inputs is not None and i % 2 == 0 else None
        timer = GenerationTimer(loaded.model, loaded.adapter.vision_towers(loaded.model), device)
        reset_peak(device)
        with engine_clock(pruner) as logs:
            generate(loaded, inputs, cfg.decode_tokens + 1, pruner, timer, min_new_tokens=cfg.decode_tokens + 1,
                     stop=False)
        in_prefill = {name: sum(s for start, s in log if start < timer.prefill_end_host) for name, log in logs.items()}
        row = {"prefill_s": timer.prefill_s, "decode_s": timer.decode_s_per_token, **in_prefill,
               "vision_s": timer.vision_s, "scoring_s": pruner.stage_seconds if pruner is not None else 0.0,
               "peak": peak_memory_bytes(device) if device.type == "cuda" else None}
        if stock_inputs is not None:
            stock = stock or _time_stock(loaded, stock_inputs, cfg)
            row.update(prefill_pair=timer.prefill_s / stock.prefill_s, decode_pair=timer.decode_s_per_token /
                       stock.decode_s_per_token if stock.decode_s_per_token else float("nan"))
        if cfg.ideal and ideal_note is None:
            try:
                segments = (segments_from_trace(pruner.trace, layout, length, pruner.records, device)
                            if pruner is not None else Segments())
                row["ideal_s"] = ideal_s if ideal_first else _ideal_prefill(loaded, inputs, segments)
            except IdealUnavailable as err:
                ideal_note, segments = str(err), None
        if i >= cfg.warmup:
            repeats.append(row)
    result = {k: statistics.median(r[k] for r in repeats) for k in ("prefill_s", "decode_s", "vision_s", "scoring_s")}
    if stock_inputs is not None:
        result.update({k: statistics.median(r[k] for r in repeats) for k in ("prefill_pair", "decode_pair")})
    peaks = [r["peak"] for r in repeats if r["peak"] is not None]
    result["peak"] = max(peaks) if peaks else None
    if cfg.ideal and ideal_note is None:
        def share(key: str) -> float:
            return statistics.median(r[key] / r["ideal_s"] for r in repeats)

        result["ideal_s"] = statistics.median(r["ideal_s"] for r in repeats)
        total, scoring, masks, hooks = share("prefill_s") - 1, share("scoring_s"), share("masks"), share("hooks")
        result.update(engine_overhead=total, scoring=scoring, masks_gathers=masks, hooks=hooks - scoring - masks,
                      unexplained=total - hooks)
    elif ideal_note is not None:
        result["ideal_skipped"] = ideal_note
    record = prefill_records(loaded, inputs, pruner)[0]
    result.update(sample_costs(loaded.model.config, record, loaded.model.dtype), aux_flops=record.aux_flops)
    result["retention"] = record.retention
    # KV held per sample at the end of a `decode_tokens` answer: each layer's prompt slots plus the answer
    result["kv_end_bytes"] = analytic_kv_bytes(loaded.model.config, [c + cfg.decode_tokens for c in record.cached],
                                               loaded.model.dtype)
    return result


def _time_stock(loaded: models.LoadedModel, inputs: dict, cfg: DictConfig) -> GenerationTimer:
    timer = GenerationTimer(loaded.model, loaded.adapter.vision_towers(loaded.model), loaded.device)
    generate(loaded, inputs, cfg.decode_tokens + 1, None, timer, min_new_tokens=cfg.decode_tokens + 1, stop=False)
    return timer


def _probe(method: str, keep: float, cfg: DictConfig, loaded: models.LoadedModel) -> Pruner | str:
    """A bound pruner, or why this method cannot run here (a budget its layers cannot reach at this depth, or a
    signal this family does not expose)."""
    facts = loaded.adapter.facts(loaded.model.config)
    try:  # each method at its own layers for this depth
        pruner = make_pruner(method, keep=keep, budget=cfg.budget, protocol=cfg.protocol).bind(facts)
    except ConfigError as err:
        return str(err)
    try:
        with pruner.attach(loaded.model):
            pass
    except ValueError as err:  # the family lacks what the method reads (e.g. the vision encoder's layers)
        return str(err)
    pruner.time_stages = bool(cfg.ideal)  # the overhead split synchronizes around each stage; plain timing does not
    return pruner


def count_generate(loaded: models.LoadedModel, inputs: dict, pruner: Pruner | None, decode_tokens: int) -> dict:
    """Kernels and host syncs per phase of one generate() (deterministic; see clse_exp.efficiency.counts):
    the vision towers, the prefill (towers excluded), one decode step (the mean over `decode_tokens` steps),
    and the ops run on host copies (the engine's layout)."""
    with generate_phases(loaded.model, loaded.adapter.vision_towers(loaded.model)) as tally:
        generate(loaded, inputs, decode_tokens + 1, pruner, min_new_tokens=decode_tokens + 1, stop=False)
    decode = tally.get("decode")
    out = {f"{phase}_{kind}": getattr(tally.get(phase), kind) for phase in ("vision", "prefill")
           for kind in ("kernels", "syncs")}
    out.update(decode_step_kernels=decode.kernels / decode_tokens, decode_step_syncs=decode.syncs / decode_tokens,
               host_ops=tally.get("host").ops,
               sync_sites={phase: dict(tally.get(phase).sync_ops) for phase in ("prefill", "decode")})
    return out


def rows_for(loaded: models.LoadedModel, samples: list[Sample], cfg: DictConfig) -> list[dict]:
    """The unpruned row, then every method x keep on the same samples (as each method feeds them)."""
    inputs = loaded.prepare(samples)
    base = measure(loaded, inputs, cfg) if cfg.repeats else None
    weights = weight_bytes(loaded.model)
    stock = count_generate(loaded, inputs, None, cfg.decode_tokens) if cfg.counts else None
    rows = [{"method": "none", "keep": 1.0, **(_ratios(base, base, cfg, len(samples), weights) if base else {}),
             **(_with_extra(stock, stock) if stock else {})}]
    for method in cfg.methods:
        for keep in cfg.keeps:
            pruner = _probe(method, keep, cfg, loaded)
            if isinstance(pruner, str):
                rows.append({"method": method, "keep": keep, "skipped": pruner})
                continue
            fed = prepare(loaded, samples, pruner)
            row = {"method": method, "keep": keep}
            if base is not None:
                result = measure(loaded, fed, cfg, pruner, inputs if cfg.interleave else None)
                row.update(_ratios(result, base, cfg, len(samples), weights))
            if stock is not None:
                row.update(_with_extra(count_generate(loaded, fed, pruner, cfg.decode_tokens), stock))
            rows.append(row)
    return rows


def _with_extra(counts: dict, stock: dict) -> dict:
    """The counts, and the kernels the pruned run launched beyond the stock one (prefill and per decode step)."""
    return {**counts, "prefill_extra_kernels": counts["prefill_kernels"] - stock["prefill_kernels"],
            "decode_extra_kernels": counts["decode_step_kernels"] - stock["decode_step_kernels"]}


def _ratios(result: dict, base: dict, cfg: DictConfig, batch: int, weights: int) -> dict:
    row = {
        "prefill_s": result["prefill_s"],
        "prefill_time_ratio": result.get("prefill_pair", result["prefill_s"] / base["prefill_s"]),
        "vision_s": result["vision_s"], "scoring_s": result["scoring_s"],
        "llm_s": result["prefill_s"] - result["vision_s"] - result["scoring_s"],
        "throughput_tokens_per_s": batch * (cfg.decode_tokens + 1) / (result["prefill_s"] + cfg.decode_tokens *
                                                                      result["decode_s"]),
        "flops_ratio": result["prefill_flops"] / result["prefill_flops_unpruned"],
        "flops_ratio_with_aux": (result["prefill_flops"] + result["aux_flops"]) / result["prefill_flops_unpruned"],
        "kv_ratio": result["kv_bytes"] / result["kv_bytes_unpruned"],
        "kv_mib_per_sample": result["kv_bytes"] / 2**20,
        "decode_time_ratio": result.get("decode_pair", result["decode_s"] / base["decode_s"] if base["decode_s"]
                                        else float("nan")),
        "decode_tokens_per_s": batch / result["decode_s"] if result["decode_s"] else float("nan"),
        "retention_average": result["retention"]["average"],
        "retention_final": result["retention"]["final"],
        "peak_mib": result["peak"] / 2**20 if result["peak"] else None,
    }
    if "ideal_s" in result:
        row.update({k: result[k] for k in ("ideal_s", *OVERHEAD)})
        row["ideal_time_ratio"] = result["ideal_s"] / base["prefill_s"]
    if "ideal_skipped" in result:
        row["ideal_skipped"] = result["ideal_skipped"]
    if cfg.memory_budget_gb:
        free = cfg.memory_budget_gb * 2**30 - weights
        row["max_batch"] = max(0, int(free // result["kv_end_bytes"]))
    return row


# ---------------------------------------------------------------------------------------------------- output
LEGEND = """\
ideal_s: the stock layers on the same per-layer token counts, no hooks, no scoring, no mask but the causal one.
counts (deterministic; `counts=true`): kernels (aten ops that launch device work) and host syncs (scalar reads,
data-dependent shapes, uploads) of one generate() per phase; *_extra_kernels: beyond the unpruned run's;
host_ops: ops on host copies (the engine's layout of the prompt, read once per prefill).
engine_overhead = prefill_s / ideal_s - 1 (median of within-repeat ratios) = scoring (the stages: select,
shrink, the cut's gather) + masks_gathers (per-layer rotary, positions, mask) + hooks (the rest of the hook
bodies) + unexplained (hook dispatch, cache effects, noise; on the `none` row: the stock text model's own
mask and rotary work that the plain loop skips). All four are fractions of ideal_s.
serving: prefill_s is the time to first token (vision encoder, the method's scoring and the LLM prefill, split
as vision_s + scoring_s + llm_s); throughput_tokens_per_s: batch x (decode_tokens + 1) / (prefill_s +
decode_tokens x one decode step). With interleave=true the time ratios are medians of within-repeat pairs
with the unpruned model.
max_batch: floor((memory_budget_gb - weights) / KV bytes per sample after a decode_tokens answer), analytic.
"""


def markdown(tables: list[dict]) -> str:
    lines = [LEGEND]
    for table in tables:
        timed = any("prefill_s" in row for row in table["rows"])
        counted = any("prefill_kernels" in row for row in table["rows"])
        sections = ((("prefill", PREFILL_COLUMNS), ("decode and KV", DECODE_COLUMNS),
                     ("serving: time to first token split, decode and throughput", SERVING_COLUMNS))
                    if timed else ()) + (
            (("counts", COUNT_COLUMNS),) if counted else ())
        for title, columns in sections:
            lines += [f"{table['header']} | {title}", "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns)]
            for row in table["rows"]:
                if "skipped" in row:
                    lines.append(f"| {row['method']} | {row['keep']} | skipped: {row['skipped']} |")
                    continue
                lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
            lines.append("")
        notes = {row["ideal_skipped"] for row in table["rows"] if "ideal_skipped" in row}
        lines += [f"no ideal time: {note}" for note in notes]
        lines += [f"{row['method']} {row['keep']}: flops_ratio_with_aux {_cell(row['flops_ratio_with_aux'])} (FLOPs "
                  "it ran outside the model, e.g. a CLIP text tower, counted in)" for row in table["rows"]
                  if "flops_ratio" in row and row["flops_ratio_with_aux"] != row["flops_ratio"]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(tables: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.5), squeeze=False)
    for ax, table in zip(axes[0], tables, strict=True):
        measured = [r for r in table["rows"] if "prefill_time_ratio" in r and r["method"] != "none"]
        for method in dict.fromkeys(r["method"] for r in measured):
            points = [p for p in measured if p["method"] == method]
            line = ax.plot([p["flops_ratio"] for p in points], [p["prefill_time_ratio"] for p in points], "o-",
                           label=method)[0]
            ideal = [p for p in points if "ideal_time_ratio" in p]
            ax.plot([p["flops_ratio"] for p in ideal], [p["ideal_time_ratio"] for p in ideal], "x",
                    color=line.get_color())
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="time = FLOPs")
        ax.set_title(f"batch {table['batch_size']}, {table['attn_implementation']} (x: ideal)", fontsize=9)
        ax.set_xlabel("prefill FLOPs ratio (pruned / unpruned)")
        ax.set_ylabel("prefill time ratio (pruned / unpruned)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, None)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def validate(cfg: DictConfig) -> None:
    """Everything checkable before a model is built: one line naming the bad value."""
    from clse_exp.config import DTYPES, looks_local

    for key, low in (("repeats", 0), ("warmup", 0), ("decode_tokens", 1), ("visual_tokens", 4), ("images", 1),
                     ("frames", 0)):
        if cfg[key] < low:
            raise ConfigError(f"{key}={cfg[key]} must be >= {low}")
    if cfg.repeats == 0 and not cfg.counts:
        raise ConfigError("repeats=0 with counts=false measures nothing: time (repeats >= 1) or count (counts=true)")
    for key in ("batch_sizes", "attn_implementations", "methods", "keeps"):
        if not OmegaConf.is_list(cfg[key]):
            raise ConfigError(f"{key}={cfg[key]} must be a list, e.g. {key}=[{cfg[key]}]")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise ConfigError(f"batch_sizes={list(cfg.batch_sizes)}: give at least one batch size, each >= 1")
    if not cfg.model.scale > 0:
        raise ConfigError(f"model.scale={cfg.model.scale} must be > 0")
    if cfg.memory_budget_gb is not None and not cfg.memory_budget_gb > 0:
        raise ConfigError(f"memory_budget_gb={cfg.memory_budget_gb} must be > 0 (GiB), or null")
    choose_one("model.family", cfg.model.family, BENCH_FAMILIES)
    if cfg.frames and cfg.model.family not in VIDEO_FAMILIES:
        raise ConfigError(f"frames={cfg.frames} with model.family={cfg.model.family}: the bench builds videos for "
                          f"{', '.join(VIDEO_FAMILIES)}; set frames=0 for image prompts")
    if not cfg.frames and cfg.model.family not in IMAGE_FAMILIES:
        raise ConfigError(f"model.family={cfg.model.family} is benched on videos only (its images are any-resolution "
                          "crops of no fixed token count): set frames, e.g. frames=8")
    if cfg.frames and cfg.images != 1:
        raise ConfigError(f"images={cfg.images} with frames={cfg.frames}: a video prompt holds one video; "
                          "leave images=1")
    choose_one("model.dtype", cfg.model.dtype, DTYPES)
    side = math.isqrt(cfg.visual_tokens)
    if side * side != cfg.visual_tokens:  # one image is a side x side grid of visual tokens
        raise ConfigError(f"visual_tokens={cfg.visual_tokens} is not a square number (one image is a sqrt(n) x sqrt(n) "
                          f"grid); e.g. visual_tokens={side * side} or {(side + 1) ** 2}")
    if cfg.model.path:  # read config.json now (cache first, one probe of the hub): one line, before any weights
        if looks_local(cfg.model.path) and not Path(cfg.model.path).expanduser().exists():
            raise ConfigError(f"model.path={cfg.model.path!r} does not exist: give an existing local directory, a hub "
                              "id, or null for a random model")
        models.describe({"name": f"bench_{cfg.model.family}", "family": cfg.model.family, "path": cfg.model.path})
    else:
        model_spec(cfg.model, image_side(cfg))
    for method in cfg.methods:
        choose_one("methods entry", method, sorted(METHODS))
        try:
            METHODS[method]().check_inputs(videos=bool(cfg.frames))
        except ConfigError as err:
            if cfg.frames:
                raise
            raise ConfigError(f"methods entry {method} prunes videos only: bench videos with frames (e.g. frames=8 "
                              f"model.family=llava_onevision; video families: {', '.join(VIDEO_FAMILIES)})") from err
    for keep in cfg.keeps:
        check_budget(keep, cfg.budget, "auto", None)
    choose_one("protocol", cfg.protocol, PROTOCOLS)
    for implementation in cfg.attn_implementations:
        choose_one("attn_implementations entry", implementation, ATTENTION)
        if implementation != "flash_attention_2":  # flash runs where it can and is noted as skipped elsewhere
            validate_device(cfg.device, implementation)
    if not any(i != "flash_attention_2" or flash_available() for i in cfg.attn_implementations):
        validate_device(cfg.device, "flash_attention_2")  # nothing else would run: say why


def run_tables(cfg: DictConfig, loaded: models.LoadedModel) -> tuple[list[dict], list[str]]:
    """One table per attention backend x batch size (each measured in this one process)."""
    tables, notes = [], []
    text = loaded.model.config.get_text_config()
    for implementation in cfg.attn_implementations:
        if implementation == "flash_attention_2" and not flash_available():
            notes.append("flash_attention_2: not measured (flash-attn is not installed or there is no CUDA device)")
            continue
        loaded.model.set_attn_implementation(implementation)
        for batch in cfg.batch_sizes:
            samples = bench_samples(cfg, batch)
            one = loaded.prepare(samples[:1])
            layout = loaded.adapter.visual_layout(loaded.model, **one)[0]
            seen = sum(seg.length for seg in layout)
            visual = cfg.visual_tokens * (sum(seg.t for seg in layout) if cfg.frames else cfg.images)
            if seen != visual:
                raise ConfigError(f"model.family={cfg.model.family}: the bench's {image_side(cfg)}-pixel pictures give "
                                  f"{seen} visual tokens, not {visual} ({cfg.visual_tokens} per image or frame); the "
                                  f"bench knows the geometry of {', '.join(BENCH_FAMILIES)}")
            shown = f"{seen} visual ({cfg.frames} frames)" if cfg.frames else f"{visual} visual"
            n_text = int(one["attention_mask"][0].sum()) - visual
            header = (f"{cfg.model.path or 'random ' + cfg.model.family} | hidden {text.hidden_size}, "
                      f"{text.num_hidden_layers} layers, {text.num_attention_heads}/{text.num_key_value_heads} heads | "
                      f"{shown} + {n_text} text tokens | batch {batch} "
                      f"| {loaded.model.dtype} | {implementation} | {loaded.device} | median of {cfg.repeats}")
            tables.append({"header": header, "batch_size": batch, "attn_implementation": implementation,
                           "weight_bytes": weight_bytes(loaded.model), "rows": rows_for(loaded, samples, cfg)})
    return tables, notes


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"clse_exp.bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(HydraConfig.get().runtime.output_dir)
    device = models.resolve_device(cfg.device)
    loaded = build_model(cfg, device)
    tables, notes = run_tables(cfg, loaded)
    text = markdown(tables) + "".join(f"{note}\n" for note in notes)
    (out / "bench.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg), "tables": tables,
                                                "notes": notes}, indent=2))
    (out / "bench.md").write_text(text)
    if any("prefill_time_ratio" in row for table in tables for row in table["rows"]):
        plot(tables, out / "bench.png")
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
