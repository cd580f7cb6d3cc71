"""The one orchestration module of a run: model -> batches -> pruned generation -> scores -> files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clse_exp import models
from clse_exp.compat import cache_of
from clse_exp.config import validate_run
from clse_exp.data import Sample, load_samples
from clse_exp.efficiency.accounting import run_costs, sample_costs
from clse_exp.efficiency.kv_cache import measured_kv_bytes
from clse_exp.efficiency.memory import peak_memory_bytes, reset_peak
from clse_exp.efficiency.timing import GenerationTimer
from clse_exp.generation import batched, decode, generate
from clse_exp.metrics import score
from clse_exp.metrics.fidelity import first_token_kl
from clse_exp.metrics.positions import positional_summary
from clse_exp.metrics.synthetic import normalize_answer
from clse_exp.pruning.build import build_pruner
from clse_exp.run_id import HASHED_KEYS, config_hash
from clse_exp.tracking.environment import environment
from clse_exp.tracking.local import LocalSink
from clse_exp.tracking.overlay import kept_overlay
from clse_exp.tracking.wandb_sink import WandbSink

console = Console(stderr=True)


def answer_batch(loaded: models.LoadedModel, batch: list[Sample], max_new_tokens: int, pruner: Any,
                 reference: bool) -> list[dict]:
    """One record per sample: the pruned answer, and when asked the unpruned one and their first-token KL."""
    inputs = loaded.prepare(batch)
    prompt_length = inputs["input_ids"].shape[1]
    timer = GenerationTimer(loaded.model, loaded.adapter.vision_tower(loaded.model), loaded.device)
    out = generate(loaded, inputs, max_new_tokens, pruner, timer)
    timings = {"vision_s": timer.vision_s, "prefill_s": timer.prefill_s,
               "decode_s_per_token": timer.decode_s_per_token,
               "scoring_s": pruner.stage_seconds if pruner is not None else 0.0,
               # the whole batch's cache after decoding: padding and generated tokens included
               "kv_bytes_measured": measured_kv_bytes(cache_of(out))}
    predictions = decode(loaded, out.sequences, prompt_length)
    trace = pruner.trace_records() if pruner is not None else [{} for _ in batch]
    grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], **grids)
    vision_flops = [loaded.adapter.vision_flops(loaded.model, segments) for segments in layout]
    ref_out = out
    if reference and pruner is not None:
        ref_out = generate(loaded, inputs, max_new_tokens)
    ref_predictions = decode(loaded, ref_out.sequences, prompt_length)
    kl = first_token_kl(ref_out.scores[0], out.scores[0]).tolist()
    records = []
    for i, sample in enumerate(batch):
        record = {
            "id": sample.id,
            "question": sample.question,
            "answer": sample.answer,
            "prediction": predictions[i],
            "correct": bool(sample.answer) and normalize_answer(predictions[i]) == normalize_answer(sample.answer),
            "prompt_tokens": int(inputs["attention_mask"][i].sum()),
            "vision_flops": vision_flops[i],
            "batch_size": len(batch),
            "batch_timings": timings,
            "doc": {"answer": sample.answer, **sample.meta},
            **trace[i],
            **sample_costs(loaded.model.config, int(inputs["attention_mask"][i].sum()), trace[i],
                           pruner.kv_policy if pruner is not None else "ragged", loaded.model.dtype),
        }
        if reference:
            record.update(reference_prediction=ref_predictions[i], agree=ref_predictions[i] == predictions[i],
                          first_token_kl=kl[i])
        records.append(record)
    return records


def summarize(cfg: DictConfig, records: list[dict], task: str, env: dict, timings: dict) -> dict:
    metrics = score(task, [r["doc"] for r in records], [r["prediction"] for r in records]) if records else {}
    fidelity = {}
    if records and "agree" in records[0]:
        fidelity = {
            "agreement": sum(r["agree"] for r in records) / len(records),
            "first_token_kl": sum(r["first_token_kl"] for r in records) / len(records),
        }
    retention = {}
    if records and "retention" in records[0]:
        retention = {k: sum(r["retention"][k] for r in records) / len(records) for k in records[0]["retention"]}
        retention["visual_tokens_in"] = sum(r["n_visual"] for r in records) / len(records)
        retention.update(positional_summary(records))
    batch_timings = [r["batch_timings"] for r in records if "batch_timings" in r]
    measured = {f"mean_batch_{k}": sum(t[k] for t in batch_timings) / len(batch_timings)
                for k in (batch_timings[0] if batch_timings else {})}
    return {
        "task": task,
        "n_samples": len(records),
        "metrics": {**metrics, **fidelity},
        "retention": retention,
        "efficiency": {**run_costs(records), **measured},
        "timings": timings,
        "environment": env,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def results_table(summary: dict) -> Table:
    cfg = summary["config"]
    keep = "" if cfg["prune"]["name"] == "none" else f" keep={cfg['keep']}"
    table = Table(title=f"{cfg['model']['name']} | {cfg['prune']['name']}{keep} | {summary['task']} "
                        f"x{summary['n_samples']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    retention = {k: v for k, v in summary["retention"].items() if not isinstance(v, list)}
    rows = {**summary["metrics"], **{f"retention_{k}": v for k, v in retention.items()}, **summary["efficiency"]}
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def save_overlays(samples: list[Sample], records: list[dict], run_dir: Path, count: int) -> list[tuple[str, Any]]:
    """Kept tokens over the first image of the first `count` pruned samples, saved under overlays/."""
    by_id = {r["id"]: r for r in records}
    overlays = []
    for sample in samples:
        record = by_id.get(sample.id, {})
        if len(overlays) >= count or not sample.images or not record.get("grids"):
            continue
        image = kept_overlay(sample.images[0], tuple(record["grids"][0]), record["kept"])
        (run_dir / "overlays").mkdir(exist_ok=True)
        image.save(run_dir / "overlays" / f"{sample.id}.png")
        overlays.append((sample.id, image))
    return overlays


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run (or resume) one config into `run_dir`; returns the summary also written to summary.json."""
    validate_run(cfg)
    run_dir = Path(run_dir)
    wandb = None
    if cfg.logger.name == "wandb":
        run_dir.mkdir(parents=True, exist_ok=True)
        wandb = WandbSink(cfg, run_dir, config_hash(*(cfg[k] for k in HASHED_KEYS)))
    try:
        summary = _run(cfg, run_dir, wandb)
    except BaseException:
        if wandb is not None:
            wandb.finish(exit_code=1)
        raise
    if wandb is not None:
        wandb.finish(exit_code=0)
    return summary


def _run(cfg: DictConfig, run_dir: Path, wandb: WandbSink | None) -> dict:
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    loaded = models.load(cfg.model, cfg.device)
    load_s = time.perf_counter() - started
    pruner = build_pruner(cfg, loaded)
    samples, skipped = load_samples(cfg.dataset)
    reset_peak(loaded.device)
    sink = LocalSink(run_dir)
    done = sink.done_ids()
    todo = [s for s in samples if s.id not in done]
    task = cfg.dataset.get("task") or cfg.dataset.name
    generate_s = 0.0
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"{task} ({len(done)} already done)", total=len(todo))
        for batch in batched(todo, cfg.batch_size):
            t0 = time.perf_counter()
            for record in answer_batch(loaded, batch, cfg.dataset.max_new_tokens, pruner, cfg.eval.reference):
                sink.append(record)
            generate_s += time.perf_counter() - t0
            progress.advance(bar, len(batch))
    wanted = {s.id for s in samples}
    records = [r for r in sink.records if r["id"] in wanted]
    timings = {"load_s": load_s, "answer_s_this_session": generate_s, "samples_this_session": len(todo),
               "resumed_from": len(done), "peak_memory_bytes": peak_memory_bytes(loaded.device),
               "batch_size": cfg.batch_size, "dtype": str(loaded.model.dtype),
               "attn_implementation": loaded.model.config._attn_implementation}
    summary = summarize(cfg, records, task, environment(loaded.device), timings)
    summary["skipped"] = {"count": len(skipped), "samples": skipped}
    sink.write_summary(summary)
    overlays = save_overlays(samples, records, run_dir, cfg.logger.get("overlays", 4)) if pruner else []
    if wandb is not None:
        wandb.log(summary, records, overlays)
    Console().print(results_table(summary))
    print(f"results in {run_dir}")
    return summary
