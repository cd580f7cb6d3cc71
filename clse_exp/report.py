"""`python -m clse_exp.report <sweep dir>`: tables and plots from the run folders of a sweep.

Reads every summary.json under the folder (and error.txt of points that could not run), writes
report.md, report.csv and PNG plots beside the sweep: metric vs keep per method, metric vs prefill TFLOPs,
and the row histogram of kept tokens per method. When the sweep logged to W&B (logger=wandb) and W&B is
online, it also builds a W&B report of the sweep's group (wandb-workspaces) and prints its URL; offline it
prints how to sync the runs and build that report later (`--wandb`). A W&B failure is one warning line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pandas as pd

from clse_exp.tracking import wandb_report

ID_COLUMNS = ("model", "dataset", "method", "keep", "budget", "schedule", "layers")


def collect(root: Path) -> tuple[pd.DataFrame, list[dict]]:
    """One row per finished run (metrics, retention, efficiency flattened), and the failed points."""
    rows, failed = [], []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        cfg = summary["config"]
        row = {"model": cfg["model"]["name"], "dataset": cfg["dataset"]["name"], "method": cfg["prune"]["name"],
               "keep": cfg["keep"], "budget": cfg["budget"], "schedule": cfg["schedule"],
               "layers": f"{cfg['layers']['reference_layer']}->{cfg['layers']['prune_layers']}",
               "n_samples": summary["n_samples"], "run_dir": str(path.parent.relative_to(root))}
        row.update({k: v for k, v in summary["metrics"].items() if isinstance(v, int | float)})
        row.update({f"retention_{k}": v for k, v in summary.get("retention", {}).items() if not isinstance(v, list)})
        row.update({k: v for k, v in summary.get("efficiency", {}).items() if isinstance(v, int | float)})
        row["kept_row_histogram"] = summary.get("retention", {}).get("kept_row_histogram")
        row["wandb"] = wandb_report.run_identity(cfg)
        rows.append(row)
    for path in sorted(root.rglob("error.txt")):
        failed.append({"run_dir": str(path.parent.relative_to(root)), "error": path.read_text().strip()})
    return pd.DataFrame(rows), failed


def headline_metric(frame: pd.DataFrame) -> str:
    """The first scorer metric present: accuracy, pope_f1_score, exact_match, ... (falls back to agreement)."""
    preferred = ("accuracy", "pope_f1_score", "mme_total_score", "exact_match", "gpt_eval_score",
                 "ocrbench_accuracy", "average", "seed_image", "videomme_perception_score", "mvbench_accuracy",
                 "agreement")
    return next(m for m in preferred if m in frame.columns)


def add_relative(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """metric / the unpruned run's metric on the same model and dataset (`relative`)."""
    base = frame[frame["method"] == "none"].set_index(["model", "dataset"])[metric]
    keys = list(zip(frame["model"], frame["dataset"], strict=True))
    frame["relative"] = [row / base.get(key, float("nan")) if key in base.index and base[key] else float("nan")
                         for row, key in zip(frame[metric], keys, strict=True)]
    return frame


def table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Method x keep, one block per model/dataset."""
    return frame.pivot_table(index=["model", "dataset", "method"], columns="keep", values=metric, aggfunc="mean")


def plots(frame: pd.DataFrame, metric: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x, name in (("keep", "metric_vs_keep.png"), ("prefill_tflops_per_sample", "metric_vs_tflops.png")):
        if x not in frame.columns:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, group in frame.groupby("method"):
            group = group.sort_values(x)
            ax.plot(group[x], group[metric], "o-", label=method)
        ax.set_xlabel("keep (layer-averaged)" if x == "keep" else "prefill TFLOPs per sample")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    hist = frame.dropna(subset=["kept_row_histogram"])
    if len(hist):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, group in hist.groupby("method"):
            rows = pd.DataFrame(group["kept_row_histogram"].tolist()).mean()
            ax.plot([(i + 0.5) / len(rows) for i in range(len(rows))], rows, "o-", label=method)
        ax.set_xlabel("normalised image row of kept tokens (0 = top)")
        ax.set_ylabel("fraction of kept tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "kept_rows.png", dpi=110)
        plt.close(fig)
        written.append(out / "kept_rows.png")
    return written


def write_report(root: Path) -> dict:
    frame, failed = collect(root)
    if frame.empty:
        raise SystemExit(f"clse_exp.report: error: no summary.json under {root}")
    metric = headline_metric(frame)
    frame = add_relative(frame, metric)
    flat = frame.drop(columns=["kept_row_histogram", "wandb"])
    flat.to_csv(root / "report.csv", index=False)
    lines = [f"# Sweep report: {root}", "", f"Headline metric: `{metric}` (relative = pruned / unpruned).", "",
             table(frame, metric).to_markdown(floatfmt=".4g"), "", "## Relative to unpruned", "",
             table(frame, "relative").to_markdown(floatfmt=".4g"), "", "## All runs", "",
             flat.to_markdown(index=False, floatfmt=".4g")]
    if failed:
        lines += ["", "## Points that could not run", ""] + [f"- `{f['run_dir']}`: {f['error']}" for f in failed]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    images = plots(frame, metric, root)
    return {"runs": len(frame), "failed": len(failed), "metric": metric, "images": [str(p) for p in images],
            "wandb": wandb_report.sweep_target(zip(frame["method"], frame["wandb"], strict=True)),
            "run_dirs": list(frame["run_dir"])}


def build_wandb_report(root: Path, result: dict) -> None:
    """Save the sweep's W&B report and print its URL; any failure is one warning line on stderr."""
    target = result["wandb"]
    try:
        if target is None:
            raise ValueError("no run of this sweep was logged with logger=wandb")
        url = wandb_report.publish(target, result["metric"], target.group or root.resolve().name)
    except Exception as err:  # noqa: BLE001 - W&B must never fail the local report
        reason = " ".join(str(err).split()) or type(err).__name__
        print(f"W&B report: warning: not built ({reason}); the local report is complete.", file=sys.stderr)
        return
    elsewhere = f" ({target.elsewhere} runs logged to another project/group are not in it)" if target.elsewhere else ""
    print(f"W&B report: {url}{elsewhere}")


def offline_hint(root: Path, result: dict) -> str:
    build = f"`python -m clse_exp.report {shlex.quote(str(root))} --wandb` builds the W&B report"
    if result["wandb"] is None:
        return ("W&B: offline. Results stay on disk; with logger=wandb runs, `wandb sync <run dir>/wandb` uploads "
                f"them, then {build}.")
    sync = wandb_report.sync_command(root, result["run_dirs"])
    return f"W&B: offline. `{sync}` uploads the {result['runs']} runs, then {build}."


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m clse_exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="build the W&B report of the sweep (default: when its runs logged to W&B and W&B "
                             "is online, i.e. an API key and WANDB_MODE not offline); --no-wandb skips it")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"clse_exp.report: error: {args.sweep_dir} is not a directory")
    result = write_report(args.sweep_dir)
    print(f"{result['runs']} runs ({result['failed']} failed points) -> {args.sweep_dir}/report.md, report.csv, "
          f"{len(result['images'])} plots")
    online = wandb_report.wandb_online()
    if args.wandb or (args.wandb is None and online and result["wandb"] is not None):
        build_wandb_report(args.sweep_dir, result)
    elif args.wandb is None and not online:
        print(offline_hint(args.sweep_dir, result))


if __name__ == "__main__":
    main()
