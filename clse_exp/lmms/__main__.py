"""`python -m clse_exp.lmms <lmms-eval arguments>`: lmms-eval's own CLI, our model registered as `clse_exp`.

    python -m clse_exp.lmms --model clse_exp --model_args model=qwen2vl,prune=clse,keep=0.1,schedule=paper \
        --tasks pope,mme --batch_size 8 --log_samples --output_path outputs/lmms

Before lmms-eval starts, the model_args are checked (one error line, exit 2, no weights loaded). lmms-eval
then runs unchanged and writes `<output_path>/<model>/<date>_results.json` (and samples with
--log_samples). Next to them this writes `<date>_clse_exp/<task>/predictions.jsonl` (per request:
retention, kept indices, prefill FLOPs, KV bytes) and `<date>_clse_exp/<task>/summary.json` (lmms-eval's
metrics, resolved config, versions, retention, efficiency), which `python -m clse_exp.report
<output_path>` reads like our own runs. lmms-eval exits 0 when an evaluation fails; this exits 1 when no
results file appeared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clse_exp.efficiency.accounting import run_costs
from clse_exp.errors import ConfigError
from clse_exp.lmms import CLASS_PATH, MODEL_ID
from clse_exp.lmms.args import parse
from clse_exp.metrics.retention import retention_summary
from clse_exp.models import resolve_device
from clse_exp.tracking.environment import environment

PROG = "clse_exp.lmms"


def _known_args(argv: list[str]) -> argparse.Namespace:
    """The lmms-eval flags this wrapper reads; every flag still goes to lmms-eval unchanged."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--model", "--model_args", "--output_path", "--device", "--include_path"):
        parser.add_argument(flag)
    parser.add_argument("--batch_size", "-b", default=1)
    parser.add_argument("--limit", type=float)
    return parser.parse_known_args(argv)[0]


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag` set to `value` (replacing `flag VALUE` or `flag=VALUE`, else appended)."""
    out, skip = [], False
    for i, item in enumerate(argv):
        if skip:
            skip = False
        elif item == flag and i + 1 < len(argv):
            skip = True
        elif not item.startswith(flag + "="):
            out.append(item)
    return [*out, flag, value]


def summary_for(task: str, records: list[dict], lmms_results: dict, cfg: DictConfig, args: argparse.Namespace,
                results_file: Path) -> dict:
    """One task's summary.json, with the fields `python -m clse_exp.report` reads from our own runs.

    `records` has one line per request; a multiple-choice doc asks one per choice, all with the same pruned
    prompt, so retention and costs count each doc once (its first request)."""
    docs: dict[str, dict] = {}
    for record in records:
        docs.setdefault(record["id"], record)
    requests, records = len(records), list(docs.values())
    metrics = {key.split(",")[0]: value for key, value in lmms_results["results"].get(task, {}).items()
               if isinstance(value, int | float) and not isinstance(value, bool)}
    retention = retention_summary(records)  # over the samples with visual tokens; text-only ones counted apart
    config = OmegaConf.to_container(cfg, resolve=True)
    config["dataset"] = {"name": task, "loader": "lmms_eval", "include_path": args.include_path, "limit": args.limit}
    config["eval"] = {"reference": False}
    return {
        "task": task,
        "n_samples": len(records),
        "n_requests": requests,
        "metrics": metrics,
        "retention": retention,
        "efficiency": run_costs(records),
        "environment": environment(resolve_device(cfg.device)),
        "config": config,
        "lmms_eval": {"version": lmms_results.get("lmms_eval_version"), "results_file": str(results_file),
                      "n_samples": lmms_results.get("n-samples", {}).get(task),
                      "model_args": lmms_results.get("config", {}).get("model_args")},
    }


def _new_results(output_path: Path, since: float) -> Path | None:
    found = [p for p in output_path.rglob("*_results.json") if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def write_summaries(stats_dir: Path, results_file: Path, cfg: DictConfig, args: argparse.Namespace) -> list[Path]:
    lmms_results = json.loads(results_file.read_text())
    written = []
    for folder in sorted(p for p in stats_dir.iterdir() if p.is_dir()):
        records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        summary = summary_for(folder.name, records, lmms_results, cfg, args, results_file)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        written.append(folder / "summary.json")
    return written


def _run_lmms_eval(argv: list[str]) -> None:
    """lmms-eval's CLI on `argv`, with our model class registered under MODEL_ID."""
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH), overwrite=True)
    sys.argv = [PROG, *argv]
    cli_evaluate()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _known_args(argv)
    if args.model is None:
        argv, args.model = ["--model", MODEL_ID, *argv], MODEL_ID
    if args.model != MODEL_ID:  # another lmms-eval model: nothing of ours to check or record
        _run_lmms_eval(argv)
        return 0
    from lmms_eval.utils import simple_parse_args_string  # lmms-eval's own model_args parser (light import)

    try:
        cfg, options = parse(simple_parse_args_string(args.model_args or ""), args.batch_size, args.device)
        if not args.output_path:
            raise ConfigError("give --output_path: lmms-eval's results and the pruning statistics are written there")
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    output_path = Path(args.output_path)
    stats_dir = options.stats_dir or output_path / f".clse_exp_running_{time.time_ns()}"
    if options.stats_dir is None:
        argv = _set_flag(argv, "--model_args", ",".join(filter(None, [args.model_args, f"stats_dir={stats_dir}"])))
    started = time.time()
    _run_lmms_eval(argv)
    results_file = _new_results(output_path, started) if output_path.is_dir() else None
    if results_file is None:
        print(f"{PROG}: error: lmms-eval wrote no results file under {output_path}: the evaluation failed (see "
              "the log above; --verbosity DEBUG raises the error)", file=sys.stderr)
        return 1
    if not stats_dir.is_dir():
        print(f"{PROG}: warning: no request reached the clse_exp model (no pruning statistics)", file=sys.stderr)
        return 0
    if options.stats_dir is None:
        stats_dir = stats_dir.rename(results_file.parent / results_file.name.replace("_results.json", "_clse_exp"))
    for path in write_summaries(stats_dir, results_file, cfg, args):
        print(f"{PROG}: pruning statistics and summary in {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
