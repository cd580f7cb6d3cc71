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

For any `--model`, `--tasks` names and the model's lmms-eval class are checked before lmms-eval starts (an
unknown task or model, or a model class that cannot be imported here, is one line and exit 2), and an
evaluation that fails is one line and exit 1 instead of lmms-eval's traceback and exit 0 (`--verbosity DEBUG`
shows lmms-eval's own error).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

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
    for flag in ("--model", "--model_args", "--output_path", "--device", "--include_path", "--tasks", "--verbosity"):
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


TASK_KEYWORDS = ("list", "list_groups", "list_tags", "list_subtasks")  # lmms-eval's listing commands


def _register() -> Any:
    """lmms-eval's model registry with our model class registered under MODEL_ID."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH), overwrite=True)
    return MODEL_REGISTRY_V2


def check_model(name: str) -> None:
    """Raise ConfigError (one line) unless lmms-eval knows model `name` and its class imports here: lmms-eval
    would otherwise print the import's traceback and exit 0."""
    registry = _register()
    if name not in registry.list_model_names():
        raise ConfigError(f"--model {name!r} is not an lmms-eval model; choose one of: "
                          f"{', '.join(registry.list_canonical_model_ids())}")
    try:
        registry.get_model_class(name)
    except ImportError as err:
        raise ConfigError(f"--model {name}: lmms-eval's class for it cannot be imported here ({err}); install what it "
                          f"needs, or use --model {MODEL_ID}") from err


def task_manager(args: argparse.Namespace) -> Any:
    """lmms-eval's task index for these flags (about 5 s: every task YAML is read), built quietly."""
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    logger.remove()  # its per-file DEBUG lines; lmms-eval sets up its own logging when it starts
    logger.add(sys.stderr, level="WARNING")
    return TaskManager("WARNING", include_path=args.include_path, model_name=args.model)


def check_tasks(args: argparse.Namespace, manager: Any) -> None:
    """Raise ConfigError (one line) for missing `--tasks` or a name lmms-eval does not know, as lmms-eval
    itself matches them (task, group or tag names, wildcards, YAML files, a folder of YAMLs)."""
    if not args.tasks:
        raise ConfigError("give --tasks: comma-separated lmms-eval task names (`--tasks list` lists them)")
    if args.tasks in TASK_KEYWORDS or os.path.isdir(args.tasks):
        return
    names = args.tasks.split(",")
    matched = set(manager.match_tasks(names))
    missing = [n for n in names if n not in matched and "*" not in n and not os.path.isfile(n)]
    if missing:
        close = sorted({c for n in missing for c in difflib.get_close_matches(n, manager.all_tasks, n=3)})
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"--tasks {','.join(missing)}: no such lmms-eval task{hint}; `python -m {PROG} --tasks list` "
                          f"lists all {len(manager.all_tasks)} (add --include_path DIR for local task YAMLs)")


def _run_lmms_eval(argv: list[str], manager: Any = None) -> Exception | None:
    """lmms-eval's CLI on `argv` with our model registered; returns the error that ended the evaluation, if
    any (lmms-eval prints its traceback and carries on to exit 0). `manager` is the task index already built
    for the checks, handed to lmms-eval instead of a second one."""
    import lmms_eval.__main__ as lmms_main

    _register()
    failures: list[Exception] = []
    single, task_manager_class = lmms_main.cli_evaluate_single, lmms_main.TaskManager

    def evaluate_single(args: argparse.Namespace) -> Any:
        try:
            return single(args)
        except Exception as err:
            if args.verbosity == "DEBUG":  # lmms-eval's own way to see the traceback
                raise
            failures.append(err)
            return None, None

    def reuse(verbosity: str = "INFO", include_path: Any = None, **kwargs: Any) -> Any:
        same = manager is not None and include_path == manager.include_path and \
            kwargs.get("model_name") == manager.model_name
        return manager if same else task_manager_class(verbosity, include_path=include_path, **kwargs)

    lmms_main.cli_evaluate_single, lmms_main.TaskManager = evaluate_single, reuse
    sys.argv = [PROG, *argv]
    try:
        lmms_main.cli_evaluate()
    finally:
        lmms_main.cli_evaluate_single, lmms_main.TaskManager = single, task_manager_class
    return failures[0] if failures else None


def _failed(err: Exception) -> int:
    """One line for an evaluation lmms-eval could not finish; the exit code of a failed run."""
    first = " ".join(str(err).split())[:300] or type(err).__name__
    print(f"{PROG}: error: the evaluation failed: {type(err).__name__}: {first} "
          "(--verbosity DEBUG shows the traceback)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _known_args(argv)
    if args.model is None:
        argv, args.model = ["--model", MODEL_ID, *argv], MODEL_ID
    if args.model != MODEL_ID:  # another lmms-eval model: its name, class and tasks checked, nothing recorded
        try:
            check_model(args.model)
            manager = task_manager(args)
            check_tasks(args, manager)
        except ConfigError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        failure = _run_lmms_eval(argv, manager)
        return _failed(failure) if failure is not None else 0
    from lmms_eval.utils import simple_parse_args_string  # lmms-eval's own model_args parser (light import)

    try:
        cfg, options = parse(simple_parse_args_string(args.model_args or ""), args.batch_size, args.device)
        if not args.output_path and args.tasks not in TASK_KEYWORDS:
            raise ConfigError("give --output_path: lmms-eval's results and the pruning statistics are written there")
        manager = task_manager(args)
        check_tasks(args, manager)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.tasks in TASK_KEYWORDS:  # a listing: nothing is evaluated or recorded
        _run_lmms_eval(argv, manager)
        return 0
    output_path = Path(args.output_path)
    stats_dir = options.stats_dir or output_path / f".clse_exp_running_{time.time_ns()}"
    if options.stats_dir is None:
        argv = _set_flag(argv, "--model_args", ",".join(filter(None, [args.model_args, f"stats_dir={stats_dir}"])))
    started = time.time()
    failure = _run_lmms_eval(argv, manager)
    if failure is not None:
        return _failed(failure)
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
