"""`python -m clse_exp.report <sweep dir>`: tables and plots from the run folders of a sweep.

Reads every summary.json under the folder and the state of every sweep point (clse_exp.sweep_status:
error.txt, crash.txt, unfinished folders), writes report.md, report.csv and PNG plots beside the sweep:
metric vs keep per method, metric vs prefill TFLOPs, and the row histogram of kept tokens per method.
Every config key that varies across the runs (read from each summary's resolved config) is a column of
the all-runs table and a row key of the method x keep tables, so no two settings are averaged together.
The unpruned run (prune=none) is one baseline whatever its keep. When the sweep logged to W&B
(logger=wandb) and W&B is online, it also builds a W&B report of the sweep's group (wandb-workspaces)
and prints its URL; offline it prints how to sync the runs and build that report later (`--wandb`).
A W&B failure is one warning line.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from clse_exp import sweep_status
from clse_exp.tracking import wandb_report

ID_COLUMNS = ("model", "dataset", "method", "keep", "budget", "schedule", "protocol", "layers")
SHOWN_AS = {"prune.name": "method", "model.name": "model", "dataset.name": "dataset"}
# Keys that are the table's columns or split it into sections, never row keys.
AXES = ("keep", "budget", "schedule", "protocol")
UNPRUNED = "unpruned"
MISSING = "-"  # a key the run's config does not have (e.g. prune.filter for fastv), or one prune=none ignores


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config; lists become compact JSON so that they compare and print as values."""
    if not isinstance(node, dict):
        return {prefix: json.dumps(node, separators=(",", ":")) if isinstance(node, list) else node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def ignored_by_unpruned(key: str) -> bool:
    """prune=none runs the stock model: its keep, budget, schedule, layers and method knobs mean nothing."""
    head = key.split(".")[0]
    return head in sweep_status.UNPRUNED_IGNORES or (head == "prune" and key != "prune.name")


def keep_meaning(budget: str, schedule: str, protocol: str = "uniform") -> str:
    """What the keep axis means for runs with this budget, schedule and protocol (README, Budget semantics)."""
    meaning = "fraction after the last cut" if budget == "final" else "layer-averaged"
    if schedule == "paper" or protocol == "official":
        return f"keep ({meaning}, as each method's official count rule reads it; see retention for what it kept)"
    return f"keep ({meaning})"


def collect(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[sweep_status.Point]]:
    """One row per finished run (metrics, retention, efficiency flattened), its flattened config (as strings,
    `-` where absent or ignored by prune=none), and every sweep point that has no result of its own."""
    rows, configs = [], []
    for path in sorted(root.rglob(sweep_status.SUMMARY)):
        try:
            summary = json.loads(path.read_text())
            cfg = summary["config"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise SystemExit(f"clse_exp.report: error: {path} is not a run summary ({type(err).__name__}: {err})") \
                from None
        flat = flatten(cfg)
        method = flat.get("prune.name")
        unpruned = method == "none"
        reference, prune_layers = flat.get("layers.reference_layer"), flat.get("layers.prune_layers")
        layers = MISSING if unpruned else ("auto" if prune_layers is None else f"{reference}->{prune_layers}")
        row = {"model": flat.get("model.name"), "dataset": flat.get("dataset.name"), "method": method,
               "keep": float("nan") if unpruned else flat.get("keep"),
               "budget": MISSING if unpruned else flat.get("budget", "average"),
               "schedule": MISSING if unpruned else flat.get("schedule", "auto"),
               "protocol": MISSING if unpruned else flat.get("protocol", "uniform"), "layers": layers,
               "n_samples": summary.get("n_samples"), "run_dir": str(path.parent.relative_to(root))}
        row.update({k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, int | float)})
        row.update({f"retention_{k}": v for k, v in summary.get("retention", {}).items() if not isinstance(v, list)})
        row.update({k: v for k, v in summary.get("efficiency", {}).items() if isinstance(v, int | float)})
        row["kept_row_histogram"] = summary.get("retention", {}).get("kept_row_histogram")
        row["wandb"] = wandb_report.run_identity(cfg)
        rows.append(row)
        configs.append({k: MISSING if unpruned and ignored_by_unpruned(k) else str(v) for k, v in flat.items()})
    points = [p for p in sweep_status.find_points(root) if p.state != "done"]
    return pd.DataFrame(rows), pd.DataFrame(configs).fillna(MISSING), points


def swept_keys(frame: pd.DataFrame, configs: pd.DataFrame) -> list[str]:
    """The config keys that tell runs apart beyond model, dataset, method and the keep axes, fewest first.

    A method knob or layer choice (prune.*, layers.*) counts when it varies between runs of one method
    (fastv and clse having different defaults is the method, not a sweep); any other key (dataset.*,
    model.*, seed, eval.*, ...) counts when it varies at all. Keys that follow from those already chosen
    (model.path from model.name) are left out.
    """
    fixed = set(SHOWN_AS) | set(AXES)
    config = configs.assign(method=frame["method"].values)
    by_method = config.groupby("method")

    def varies(key: str) -> bool:
        if key.split(".")[0] in ("prune", "layers"):
            return bool((by_method[key].nunique() > 1).any())
        return config[key].nunique() > 1

    candidates = sorted((k for k in configs.columns if k not in fixed and varies(k)),
                        key=lambda k: (not k.endswith(".name"), k.count("."), k))
    chosen: list[str] = []
    base = config.assign(model=frame["model"].values, dataset=frame["dataset"].values)
    for key in candidates:
        if (base.groupby(["model", "dataset", "method", *chosen])[key].nunique() > 1).any():
            chosen.append(key)
    return chosen


def headline_metric(frame: pd.DataFrame) -> str:
    """The first scorer metric present: accuracy, pope_f1_score, exact_match, ... (falls back to agreement)."""
    preferred = ("accuracy", "pope_f1_score", "mme_total_score", "exact_match", "gpt_eval_score",
                 "ocrbench_accuracy", "average", "seed_image", "videomme_perception_score", "mvbench_accuracy",
                 "lvb_acc", "score", "agreement")
    return next((m for m in preferred if m in frame.columns), "n_samples")


def baseline_keys(keys: list[str]) -> list[str]:
    """The row keys an unpruned run shares with the pruned runs it is the baseline of."""
    return ["model", "dataset", *(k for k in keys if not ignored_by_unpruned(k))]


class RunSamples:
    """Which samples a finished run answered, read from its predictions.jsonl, and its metric re-scored on any
    subset of them; `ids` is None when the file cannot tell (absent, or holding more samples than the summary
    counted, as after a resume with a smaller dataset.limit)."""

    def __init__(self, folder: Path) -> None:
        summary = json.loads((folder / sweep_status.SUMMARY).read_text())
        self.task, self.n_samples = summary.get("task"), summary.get("n_samples")
        self.records: dict[str, dict] = {}
        path = folder / "predictions.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line: that sample was not in the summary
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    self.records.setdefault(record["id"], record)
        self.ids = frozenset(self.records) if self.records and len(self.records) == self.n_samples else None

    def why_not_rescored(self) -> str | None:
        """Why the metric cannot be recomputed on a subset of this run's samples (None when it can)."""
        if self.ids is None:
            return "predictions.jsonl does not list exactly the samples its summary counted"
        if not all("doc" in r and "prediction" in r for r in self.records.values()):
            return "predictions carry no scorer inputs (doc and prediction; an lmms-eval run's do not)"
        return None

    def rescored(self, metric: str, ids: frozenset[str]) -> float | None:
        """The run's `metric` on the samples `ids` alone, by its task's scorer (None when it has no such metric)."""
        from clse_exp.metrics import score

        chosen = [self.records[i] for i in sorted(ids)]
        if metric == "agreement":
            return sum(bool(r.get("agree")) for r in chosen) / len(chosen) if "agree" in chosen[0] else None
        try:
            value = score(self.task, [r["doc"] for r in chosen], [r["prediction"] for r in chosen]).get(metric)
        except ValueError:
            return None
        return float(value) if isinstance(value, int | float) else None


def add_relative(frame: pd.DataFrame, metric: str, keys: list[str], root: Path | None = None) -> pd.DataFrame:
    """metric / the metric of the unpruned run(s) with the same model, dataset and non-method swept keys.

    A ratio of scores on different samples means nothing, so when a run and its unpruned baseline answered
    different samples (compared by id where predictions.jsonl lists them, else by count), both are re-scored
    on the samples they share; when the predictions do not allow that, the ratio is left out. Either way
    `relative_note` says so."""
    match = baseline_keys(keys)
    frame["relative"], frame["relative_note"] = float("nan"), ""
    unpruned = frame[frame["method"] == "none"]
    runs: dict[str, RunSamples | None] = {}

    def samples_of(run_dir: str) -> RunSamples | None:
        if run_dir not in runs:
            try:
                runs[run_dir] = RunSamples(root / run_dir) if root is not None else None
            except (OSError, json.JSONDecodeError):
                runs[run_dir] = None
        return runs[run_dir]

    for index, row in frame.iterrows():
        bases = unpruned[(unpruned[match] == row[match]).all(axis=1)]
        if bases.empty or pd.isna(row[metric]):
            continue
        mine, theirs = samples_of(row["run_dir"]), [samples_of(d) for d in bases["run_dir"]]
        base_n = "/".join(str(n) for n in bases["n_samples"])
        same = all(_same_samples(row["n_samples"], n, mine, other)
                   for n, other in zip(bases["n_samples"], theirs, strict=True))
        if same:
            reference, value = bases[metric].mean(), row[metric]
        else:
            common, outcome = _on_common_samples(metric, mine, theirs)
            if isinstance(outcome, str):
                frame.at[index, "relative_note"] = (f"no ratio: {row['n_samples']} samples vs the unpruned run's "
                                                    f"{base_n} (different samples), and {outcome}")
                continue
            value, reference = outcome
            frame.at[index, "relative_note"] = (f"on the {common} samples shared with the unpruned run "
                                                f"({row['n_samples']} vs {base_n} samples)")
        if reference > 0:
            frame.at[index, "relative"] = value / reference
    return frame


def _on_common_samples(metric: str, mine: RunSamples | None, theirs: list[RunSamples | None]
                       ) -> tuple[int, tuple[float, float] | str]:
    """(shared samples, (this run's metric, the unpruned runs' mean metric) on them), or why that cannot be
    computed in place of the pair."""
    if mine is None or None in theirs:
        return 0, "a run folder's predictions could not be read"
    for name, run in (("this run", mine), *(("the unpruned run", s) for s in theirs)):
        if run.why_not_rescored():
            return 0, f"{name}'s {run.why_not_rescored()}"
    common = frozenset.intersection(mine.ids, *(s.ids for s in theirs))
    if not common:
        return 0, "they share no sample"
    value, scores = mine.rescored(metric, common), [s.rescored(metric, common) for s in theirs]
    if value is None or None in scores:
        return len(common), f"`{metric}` cannot be recomputed from the predictions"
    return len(common), (value, sum(scores) / len(scores))


def _same_samples(n: Any, other_n: Any, mine: RunSamples | None, other: RunSamples | None) -> bool:
    """Whether two runs answered the same samples: by id when both runs list them, else by count."""
    if mine is not None and other is not None and mine.ids is not None and other.ids is not None:
        return mine.ids == other.ids
    return n == other_n


def keep_label(keep: float) -> str:
    return UNPRUNED if pd.isna(keep) else f"{keep:g}"


def natural(value: Any) -> str:
    """A sort key that puts [2] before [10] and 0.05 before 0.1 in string-valued config columns."""
    return re.sub(r"\d+(\.\d+)?", lambda m: f"{float(m.group()):024.9f}", str(value))


def table(frame: pd.DataFrame, values: str, keys: list[str]) -> pd.DataFrame:
    """Rows: model, dataset, swept keys, method; columns: `unpruned`, then each keep, largest first."""
    cells = frame.assign(column=frame["keep"].map(keep_label))
    pivot = cells.pivot_table(index=["model", "dataset", *keys, "method"], columns="column", values=values,
                              aggfunc="mean", dropna=False).dropna(how="all")
    order = sorted(pivot.columns, key=lambda c: (c != UNPRUNED, -float(c) if c != UNPRUNED else 0.0))
    return pivot[order].sort_index(key=lambda level: level.map(natural))


def sections(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(keep meaning, file suffix, runs) per budget/schedule/protocol of the pruned runs; the unpruned runs go in
    each."""
    unpruned = frame[frame["method"] == "none"]
    pruned = frame[frame["method"] != "none"]
    triples = sorted(set(zip(pruned["budget"], pruned["schedule"], pruned["protocol"], strict=True)))
    triples = triples or [("average", "auto", "official")]
    out = []
    for budget, schedule, protocol in triples:
        chosen = (pruned["budget"] == budget) & (pruned["schedule"] == schedule) & (pruned["protocol"] == protocol)
        runs = pruned[chosen]
        suffix = "" if len(triples) == 1 else f"_{budget}_{protocol}" + ("_paper" if schedule == "paper" else "")
        title = keep_meaning(budget, schedule, protocol)
        if len(triples) > 1:
            title += f", budget={budget} schedule={schedule} protocol={protocol}"
        out.append((title, suffix, pd.concat([runs, unpruned])))
    return out


def series_label(row: pd.Series, keys: list[str]) -> str:
    extra = [f"{k}={row[k]}" for k in keys if row[k] != MISSING]
    return " ".join([str(row["method"]), *extra])


def plots(frame: pd.DataFrame, metric: str, keys: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, ax: Any, name: str) -> None:
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    written: list[Path] = []
    frame = frame.assign(series=[series_label(row, keys) for _, row in frame.iterrows()])
    for title, suffix, runs in sections(frame):
        pruned, unpruned = runs[runs["method"] != "none"], runs[runs["method"] == "none"]
        if pruned.empty:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for label, group in pruned.groupby("series"):
            group = group.groupby("keep")[metric].mean()
            ax.plot(group.index, group.to_numpy(), "o-", label=label)
        for label, group in unpruned.groupby("series"):
            ax.axhline(group[metric].mean(), linestyle="--", color="grey", label=f"{label} (unpruned)")
        ax.set_xlabel(title)
        ax.set_ylabel(metric)
        save(fig, ax, f"metric_vs_keep{suffix}.png")
    if "prefill_tflops_per_sample" in frame.columns:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for label, group in frame.groupby("series"):
            group = group.sort_values("prefill_tflops_per_sample")
            ax.plot(group["prefill_tflops_per_sample"], group[metric], "*" if label == "none" else "o-", label=label)
        ax.set_xlabel("prefill TFLOPs per sample")
        ax.set_ylabel(metric)
        save(fig, ax, "metric_vs_tflops.png")
    hist = frame[frame["kept_row_histogram"].map(lambda h: isinstance(h, list) and len(h) > 0)]
    if len(hist):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        hist = hist.assign(bins=hist["kept_row_histogram"].map(len))
        mixed = hist["bins"].nunique() > 1
        for (label, bins), group in hist.groupby(["series", "bins"]):
            rows = pd.DataFrame(group["kept_row_histogram"].tolist()).mean()
            label = f"{label} ({bins} row bands)" if mixed else label
            ax.plot([(i + 0.5) / bins for i in range(bins)], rows, "o-", label=label)
        ax.set_xlabel("image row of kept tokens (0 = top, 1 = bottom; one point per row)")
        ax.set_ylabel("fraction of kept tokens")
        save(fig, ax, "kept_rows.png")
    return written


def markdown(frame: pd.DataFrame) -> str:
    """A table with empty cells (no run, no baseline) shown as `-` instead of nan."""
    return frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval=MISSING)


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def counts_line(frame: pd.DataFrame, points: list[sweep_status.Point]) -> str:
    """`16 runs, 2 points that could not run, 1 crashed/unfinished point`: every point of the folder counted."""
    could_not = sum(p.state == "could_not_run" for p in points)
    broken = sum(p.state in ("crashed", "unfinished") for p in points)
    shared = sum(p.state == "same_as" for p in points)
    parts = [plural(len(frame), "run"), f"{plural(could_not, 'point')} that could not run",
             plural(broken, "crashed/unfinished point")]
    if shared:
        parts.append(f"{plural(shared, 'prune=none point')} sharing another point's unpruned run")
    return ", ".join(parts)


def override_group(override: str) -> str:
    """`prune` for `prune.filter=x`, `+experiment=y`, `~layers`: the top-level key an override sets."""
    return override.lstrip("+~").split("=")[0].split(".")[0].split("/")[0]


def unpruned_hint(root: Path, frame: pd.DataFrame) -> str:
    """How to add the missing unpruned runs to this sweep folder: the pruned points' shared non-method overrides."""
    method_keys = ("prune", "experiment", *sweep_status.UNPRUNED_IGNORES)
    overrides = None
    for point in sweep_status.find_points(root):
        if point.state == "done":
            own = {o for o in point.overrides if override_group(o) not in method_keys}
            overrides = own if overrides is None else overrides & own
    names = [f"model={','.join(sorted(frame['model'].dropna().unique()))}",
             f"dataset={','.join(sorted(frame['dataset'].dropna().unique()))}"]
    extra = sorted(o for o in overrides or () if not o.startswith(("model=", "dataset=")))
    command = " ".join(["python -m clse_exp -m prune=none", *names, *extra, f"hydra.sweep.dir={root}"])
    return (f"No unpruned run (prune=none) in this folder, so nothing is relative to it. Add it with "
            f"`{command}` (one run whatever keep), then rerun this report.")


def write_report(root: Path) -> dict:
    frame, configs, points = collect(root)
    if frame.empty:
        states = f" ({counts_line(frame, points)})" if points else ""
        raise SystemExit(f"clse_exp.report: error: no summary.json under {root}{states}")
    keys = swept_keys(frame, configs)
    frame = pd.concat([frame, configs[keys]], axis=1)
    metric = headline_metric(frame)
    frame = add_relative(frame, metric, keys, root)
    has_unpruned = (frame["method"] == "none").any()
    columns = [*ID_COLUMNS, *keys, "n_samples", metric, "relative", "relative_note"]
    flat = frame.drop(columns=["kept_row_histogram", "wandb"])
    flat = flat[columns + [c for c in flat.columns if c not in columns]]
    flat.to_csv(root / "report.csv", index=False)
    counts = counts_line(frame, points)
    lines = [f"# Sweep report: {root}", "", f"{counts}. Headline metric: `{metric}` (relative = pruned / unpruned).",
             "Rows are told apart by " + (", ".join(f"`{k}`" for k in keys) if keys else "method only")
             + "; `unpruned` is the prune=none run (keep does not apply to it)."]
    for title, _, runs in sections(frame):
        lines += ["", f"## `{metric}` by {title}", "", markdown(table(runs, metric, keys).reset_index())]
        lines += ["", f"### Relative to unpruned, by {title}", ""]
        relative = table(runs, "relative", keys)
        if not has_unpruned:
            lines.append(unpruned_hint(root, frame))
        elif relative.empty:
            lines.append(f"No ratio is defined: the unpruned `{metric}` is 0 (or absent) for these runs, or their "
                         "samples differ (see below).")
        else:
            lines.append(markdown(relative.reset_index()))
        noted = runs[runs["relative_note"] != ""]
        if len(noted):
            lines += ["", "Runs whose samples differ from their unpruned run's:", ""]
            lines += [f"- `{row['run_dir']}` ({row['method']} keep={keep_label(row['keep'])}): {row['relative_note']}"
                      for _, row in noted.iterrows()]
    lines += ["", "## All runs", "", markdown(flat)]
    for heading, states in (("Points that could not run", ("could_not_run",)),
                            ("Crashed or unfinished points (rerun the same sweep command to resume them)",
                             ("crashed", "unfinished"))):
        listed = [p for p in points if p.state in states]
        if listed:
            lines += ["", f"## {heading}", ""]
            lines += [f"- `{p.folder.relative_to(root)}` ({' '.join(p.overrides) or 'no overrides recorded'}): "
                      f"{p.reason}" for p in listed]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    images = plots(frame, metric, keys, root)
    return {"runs": len(frame), "counts": counts, "metric": metric, "images": [str(p) for p in images],
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
    print(f"{result['counts']} -> {args.sweep_dir}/report.md, report.csv, {len(result['images'])} plots")
    online = wandb_report.wandb_online()
    if args.wandb or (args.wandb is None and online and result["wandb"] is not None):
        build_wandb_report(args.sweep_dir, result)
    elif args.wandb is None and not online:
        print(offline_hint(args.sweep_dir, result))


if __name__ == "__main__":
    main()
