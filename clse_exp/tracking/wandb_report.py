"""W&B report of a sweep, built with wandb-workspaces: the headline metric against keep and against prefill
TFLOPs, one run set (one colour) per method, each filtered to the sweep's W&B group.

`build_report` only assembles the report object (no network); `save_report` uploads it and returns its URL.
The local report (report.md, report.csv, PNGs) is the source of truth and never waits on W&B.
"""

from __future__ import annotations

import copy
import os
import shlex
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clse_exp.run_id import HASHED_KEYS, config_hash
from clse_exp.tracking.wandb_sink import has_api_key

# Keys as WandbSink logs them: summary["metrics"] under metrics/, summary["efficiency"] under efficiency/,
# and the resolved config (so `keep` is the config key).
METRIC_PREFIX = "metrics/"
KEEP_KEY = "keep"
FLOPS_KEY = "efficiency/prefill_tflops_per_sample"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
OFFLINE_MODES = ("offline", "disabled", "dryrun")


@dataclass
class SweepTarget:
    """Where a sweep's runs were logged in W&B, and their run ids per method."""

    project: str
    entity: str | None
    group: str | None
    runs: dict[str, list[str]] = field(default_factory=dict)  # method -> W&B run ids
    elsewhere: int = 0  # runs of the sweep logged to another project/group (not in the report)


def run_identity(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """entity, project, group and run id of one run from its summary.json config; None without logger=wandb."""
    logger = cfg.get("logger") or {}
    if logger.get("name") != "wandb":
        return None
    # The id runner.run gives WandbSink: the content hash of the science config (deep copies: the hash
    # drops dataset.limit in place).
    run_id = config_hash(*(copy.deepcopy(cfg.get(key)) for key in HASHED_KEYS))
    return {"entity": logger.get("entity"), "project": logger.get("project") or "clse-exp",
            "group": logger.get("group"), "run_id": run_id}


def sweep_target(runs: Iterable[tuple[str, dict[str, Any] | None]]) -> SweepTarget | None:
    """The sweep's W&B place from (method, run_identity) pairs: the most common (entity, project, group)."""
    logged = [(method, ident) for method, ident in runs if ident]
    if not logged:
        return None
    places = Counter((i["entity"], i["project"], i["group"]) for _, i in logged)
    (entity, project, group), count = places.most_common(1)[0]
    target = SweepTarget(project=project, entity=entity, group=group, elsewhere=len(logged) - count)
    for method, ident in logged:
        if (ident["entity"], ident["project"], ident["group"]) == (entity, project, group):
            ids = target.runs.setdefault(method, [])
            if ident["run_id"] not in ids:
                ids.append(ident["run_id"])
    return target


def build_report(entity: str, project: str, group: str | None, metric: str, runs: dict[str, list[str]],
                 sweep: str) -> Any:
    """The wr.Report (not saved; no network): a note and one panel grid with a run set per method and two
    scatter plots, metric vs keep and metric vs prefill TFLOPs per sample."""
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError as err:
        raise ImportError("wandb-workspaces is not installed (pip install wandb-workspaces)") from err

    runsets = []
    for index, (method, ids) in enumerate(runs.items()):
        filters = [expr.Metric("Group") == group] if group else []
        filters.append(expr.Metric("ID").isin(list(ids)))
        color = COLORS[index % len(COLORS)]
        runsets.append(wr.Runset(entity=entity, project=project, name=method, filters=expr.And(*filters),
                                 run_settings={run_id: wr.RunSettings(color=color) for run_id in ids}))
    y = wr.SummaryMetric(METRIC_PREFIX + metric)
    panels = [
        wr.ScatterPlot(title=f"{metric} vs keep", x=wr.Config(KEEP_KEY), y=y,
                       layout=wr.Layout(x=0, y=0, w=12, h=8)),
        wr.ScatterPlot(title=f"{metric} vs prefill TFLOPs per sample", x=wr.SummaryMetric(FLOPS_KEY), y=y,
                       layout=wr.Layout(x=12, y=0, w=12, h=8)),
    ]
    where = f"W&B group {group}" if group else "the runs of this sweep"
    note = (f"Headline metric {metric} (summary key {METRIC_PREFIX + metric}) against the requested keep and "
            f"against analytic prefill TFLOPs per sample ({FLOPS_KEY}), one run set and colour per method, "
            f"over {where}. The local report.md and report.csv of the sweep folder hold the full tables.")
    return wr.Report(project=project, entity=entity, title=f"clse-exp sweep {sweep}",
                     description=f"{metric} vs keep and prefill TFLOPs, by method ({', '.join(runs)})",
                     blocks=[wr.P(note), wr.PanelGrid(runsets=runsets, panels=panels)])


def save_report(report: Any) -> str:
    """Upload the report to W&B; returns its URL."""
    report.save()
    return report.url


def publish(target: SweepTarget, metric: str, sweep: str) -> str:
    """Build and save the sweep's report (the API's default entity when logger.entity was null); its URL."""
    entity = target.entity
    if not entity:
        import wandb

        entity = wandb.Api().default_entity
    return save_report(build_report(entity, target.project, target.group, metric, target.runs, sweep))


def wandb_online() -> bool:
    """An API key is configured and WANDB_MODE does not keep W&B offline."""
    return os.environ.get("WANDB_MODE", "").lower() not in OFFLINE_MODES and has_api_key()


def sync_command(root: Path, run_dirs: Iterable[str]) -> str:
    """`wandb sync` of the sweep's offline runs: a glob when every run folder lies at the same depth."""
    depths = {len(Path(d).parts) for d in run_dirs}
    if len(depths) != 1:
        return "wandb sync <run dir>/wandb/offline-run-*"
    return f"wandb sync {shlex.quote(str(root))}/{'*/' * depths.pop()}wandb/offline-run-*"
