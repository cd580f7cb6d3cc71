"""The one orchestration module of a run: checks -> dataset -> model -> pruned generation -> scores -> files.

Everything that can be checked without weights (the config, the method's layers and budget for the model's
depth, the dataset) is checked first, so a typo on a cluster costs seconds, not a 7B load. A folder that
already holds another run's results is refused, naming the keys that differ.
"""

from __future__ import annotations

import json
import logging
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
from clse_exp.errors import ConfigError
from clse_exp.generation import batched, decode, generate, prefill_records
from clse_exp.metrics import sample_score, score
from clse_exp.metrics.fidelity import first_token_kl
from clse_exp.metrics.retention import retention_summary
from clse_exp.pruning.record import SampleRecord
from clse_exp.run_id import HASHED_KEYS, config_hash, hashed_config
from clse_exp.tracking.environment import environment
from clse_exp.tracking.local import LocalSink
from clse_exp.tracking.overlay import kept_overlay
from clse_exp.tracking.wandb_sink import WandbSink

console = Console(stderr=True)
log = logging.getLogger("clse_exp")
IDENTITY_FILE = "run.json"  # the hashed config of the run a folder holds (resume refuses any other)


def answer_batch(loaded: models.LoadedModel, batch: list[Sample], max_new_tokens: int, pruner: Any,
                 reference: bool, task: str) -> list[dict]:
    """One record per sample: the pruned answer, and when asked the unpruned one and their first-token KL."""
    fed = batch if pruner is None else pruner.prepare_samples(loaded, batch)  # e.g. downsampled images
    inputs = loaded.prepare(fed)
    prompt_length = inputs["input_ids"].shape[1]
    timer = GenerationTimer(loaded.model, loaded.adapter.vision_towers(loaded.model), loaded.device)
    out = generate(loaded, inputs, max_new_tokens, pruner, timer)
    timings = {"vision_s": timer.vision_s, "prefill_s": timer.prefill_s,
               "decode_s_per_token": timer.decode_s_per_token,
               "scoring_s": pruner.stage_seconds if pruner is not None else 0.0,
               # the whole batch's cache after decoding: padding and generated tokens included
               "kv_bytes_measured": measured_kv_bytes(cache_of(out))}
    predictions = decode(loaded, out.sequences, prompt_length)
    layout = loaded.layout(inputs)
    prompt_tokens = inputs["attention_mask"].sum(1).tolist()
    sample_records = prefill_records(loaded, inputs, pruner)
    ref_out, ref_length = out, prompt_length
    if reference and pruner is not None:
        ref_inputs = inputs if fed is batch else loaded.prepare(batch)  # the unpruned model sees the samples as given
        ref_out, ref_length = generate(loaded, ref_inputs, max_new_tokens), ref_inputs["input_ids"].shape[1]
    ref_predictions = decode(loaded, ref_out.sequences, ref_length)
    kl = first_token_kl(ref_out.scores[0], out.scores[0]).tolist()
    records = []
    for i, sample in enumerate(batch):
        record: SampleRecord = sample_records[i]
        doc = {"answer": sample.answer, **sample.meta}
        entry = {
            "id": sample.id,
            "question": sample.question,
            "answer": sample.answer,
            "prediction": predictions[i],
            "sample_score": sample_score(task, doc, predictions[i]),
            "prompt_tokens": int(prompt_tokens[i]),
            "vision_flops": loaded.adapter.vision_flops(loaded.model, layout[i]),
            "vision_flops_unpruned": loaded.adapter.vision_flops(loaded.model, unreduced_segments(layout[i], record)),
            "batch_size": len(batch),
            "batch_timings": timings,
            "doc": doc,
            **(record.as_dict() if pruner is not None else {}),
            **sample_costs(loaded.model.config, record, loaded.model.dtype),
        }
        if reference:
            entry.update(reference_prediction=ref_predictions[i], agree=ref_predictions[i] == predictions[i],
                         first_token_kl=kl[i])
        records.append(entry)
    return records


def unreduced_segments(segments: list[models.VisualSegment], record: SampleRecord) -> list[models.VisualSegment]:
    """A sample's visual segments before the method reduced its input (the fed ones where it did not)."""
    if record.original_grids is None:
        return segments
    return [models.VisualSegment(seg.start, *grid, seg.kind) for seg, grid in zip(segments, record.original_grids,
                                                                                   strict=True)]


def summarize(cfg: DictConfig, records: list[dict], task: str, env: dict, timings: dict) -> dict:
    metrics = score(task, [r["doc"] for r in records], [r["prediction"] for r in records]) if records else {}
    fidelity, reference = {}, {}
    if records and "agree" in records[0]:
        fidelity = {
            "agreement": sum(r["agree"] for r in records) / len(records),
            "first_token_kl": sum(r["first_token_kl"] for r in records) / len(records),
        }
        reference = score(task, [r["doc"] for r in records], [r["reference_prediction"] for r in records])
    retention = retention_summary(records)  # over the samples with visual tokens; text-only ones counted apart
    if retention:
        retention["asked"] = cfg.keep
        retention["budget_unreachable_samples"] = sum(bool(r.get("budget_unreachable")) for r in records)
    batch_timings = [r["batch_timings"] for r in records if "batch_timings" in r]
    measured = {f"mean_batch_{k}": sum(t[k] for t in batch_timings) / len(batch_timings)
                for k in (batch_timings[0] if batch_timings else {})}
    return {
        "task": task,
        "n_samples": len(records),
        "metrics": {**metrics, **fidelity},
        "unpruned_metrics": reference,
        "retention": retention,
        "efficiency": {**run_costs(records), **measured},
        "timings": timings,
        "environment": env,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def results_table(summary: dict) -> Table:
    cfg = summary["config"]
    keep = "" if cfg["prune"]["name"] == "none" else f" keep={cfg['keep']} ({cfg['budget']}, {cfg['protocol']})"
    table = Table(title=f"{cfg['model']['name']} | {cfg['prune']['name']}{keep} | {summary['task']} "
                        f"x{summary['n_samples']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    retention = {k: v for k, v in summary["retention"].items() if not isinstance(v, list)}
    rows = {**summary["metrics"], **{f"unpruned_{k}": v for k, v in summary.get("unpruned_metrics", {}).items()},
            **{f"retention_{k}": v for k, v in retention.items()}, **summary["efficiency"]}
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


def check_folder(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether this folder already holds this run (a resume); refuses a folder holding another run's results.
    Writes nothing, so a run refused later leaves the folder as it found it."""
    identity = run_dir / IDENTITY_FILE
    if identity.exists():
        saved = json.loads(identity.read_text())
        if saved["hash"] != config_hash(*(cfg[k] for k in HASHED_KEYS)):
            differ = _differences(saved["config"], hashed_config(cfg))
            raise ConfigError(f"{run_dir} holds another run's results ({', '.join(differ[:6])}"
                              f"{' ...' if len(differ) > 6 else ''}); use a new hydra.run.dir or the same config")
        return True
    if (run_dir / "predictions.jsonl").exists():
        raise ConfigError(f"{run_dir} holds predictions.jsonl of an unknown run (no {IDENTITY_FILE}); "
                          "use a new hydra.run.dir")
    return False


def claim_folder(cfg: DictConfig, run_dir: Path) -> bool:
    """Record which run this folder holds, or refuse to resume another run's results in it; True when this
    call wrote the record (the folder was free)."""
    if check_folder(cfg, run_dir):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / IDENTITY_FILE).write_text(json.dumps({"hash": config_hash(*(cfg[k] for k in HASHED_KEYS)),
                                                     "config": hashed_config(cfg)}, indent=1, default=str) + "\n")
    return True


def release_folder(run_dir: Path) -> None:
    """Undo claim_folder for a run refused before it saved any sample, so the folder is free again."""
    if not (run_dir / "predictions.jsonl").exists():
        (run_dir / IDENTITY_FILE).unlink(missing_ok=True)


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: saved there, current now` for every leaf that differs (a group whose name differs is one entry:
    its other keys follow from the name)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            if "name" in a and a.get("name") != b.get("name"):
                out.append(f"{name}.name: {a.get('name')!r} there, {b.get('name')!r} now")
            else:
                out += _differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} there, {b!r} now")
    return out


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run (or resume) one config into `run_dir`; returns the summary also written to summary.json."""
    pruner = validate_run(cfg)
    run_dir = Path(run_dir)
    check_folder(cfg, run_dir)  # another run's folder is refused before any data is read
    samples, skipped = load_samples(cfg.dataset)
    if not samples:
        raise ConfigError(f"dataset {cfg.dataset.name} split {cfg.dataset.split} has no usable samples "
                          f"({len(skipped)} skipped: {skipped[0]['reason'] if skipped else 'empty'})")
    models.check_inputs(cfg.model, samples)  # e.g. videos for a family without video input, before any weights
    claimed = claim_folder(cfg, run_dir)  # only once every check passed: a refused run leaves no run.json
    wandb = None
    try:
        if cfg.logger.name == "wandb":
            wandb = WandbSink(cfg, run_dir, config_hash(*(cfg[k] for k in HASHED_KEYS)))
        summary = _run(cfg, run_dir, pruner, samples, skipped, wandb)
    except BaseException as err:
        if wandb is not None:
            wandb.finish(exit_code=1)
        if claimed and isinstance(err, ConfigError):
            release_folder(run_dir)
        raise
    if wandb is not None:
        wandb.finish(exit_code=0)
    return summary


def _run(cfg: DictConfig, run_dir: Path, pruner: Any, samples: list[Sample], skipped: list[dict],
         wandb: WandbSink | None) -> dict:
    torch.manual_seed(cfg.seed)
    sink = LocalSink(run_dir)
    done = sink.done_ids()
    todo = [s for s in samples if s.id not in done]
    task = cfg.dataset.get("task") or cfg.dataset.name
    log.info("%s: %d samples (%d already done, %d skipped) in %s", task, len(samples), len(done), len(skipped),
             run_dir)
    started = time.perf_counter()
    loaded = models.load(cfg.model, cfg.device)
    load_s = time.perf_counter() - started
    log.info("model %s loaded in %.1f s on %s (%s)", cfg.model.name, load_s, loaded.device, loaded.model.dtype)
    reset_peak(loaded.device)
    generate_s = 0.0
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"{task} ({len(done)} already done)", total=len(todo))
        for batch in batched(todo, cfg.batch_size):
            t0 = time.perf_counter()
            for record in answer_batch(loaded, batch, cfg.dataset.max_new_tokens, pruner, cfg.eval.reference, task):
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
    unreachable = summary["retention"].get("budget_unreachable_samples", 0)
    if unreachable:
        log.warning("%d samples did not get keep=%s: too few visual tokens, or a count rule (an official table or "
                    "formula, a pooled grid) that departs from keep (the log says which; see "
                    "retention.budget_unreachable_samples)", unreachable, cfg.keep)
    log.info("results in %s", run_dir)
    print(f"results in {run_dir}")
    return summary
