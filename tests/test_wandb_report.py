"""The W&B report of a sweep (wandb-workspaces), without network: the report object's run sets and panels,
the run ids read back from summary.json, the offline hint, and a failing save that keeps the local report."""

from __future__ import annotations

import json
import sys

import pytest
import wandb_workspaces.reports.v2 as wr
from omegaconf import OmegaConf
from wandb_workspaces import expr

from clse_exp import report
from clse_exp.run_id import HASHED_KEYS, config_hash
from clse_exp.tracking import wandb_report

LOCAL_FILES = ("report.md", "report.csv", "metric_vs_keep.png", "metric_vs_tflops.png")


def run_config(method, keep, logger="wandb", group="pope-keep"):
    return {"model": {"name": "m"}, "dataset": {"name": "d", "loader": "synthetic", "limit": 4},
            "prune": {"name": method}, "keep": keep, "budget": "average", "schedule": "auto", "protocol": "official",
            "layers": {"reference_layer": 0, "prune_layers": [2]}, "seed": 0,
            "eval": {"max_new_tokens": 8},
            "logger": {"name": logger, "project": "clse-exp", "entity": "lab", "group": group, "mode": "auto"}}


def fake_run(root, method, keep, accuracy, **logger):
    """A finished sweep point; returns the W&B run id runner.run gives it (hash of the DictConfig nodes)."""
    cfg = run_config(method, keep, **logger)
    folder = root / method / f"keep{keep}"
    folder.mkdir(parents=True)
    summary = {"config": cfg, "n_samples": 4, "metrics": {"accuracy": accuracy}, "retention": {"average": keep},
               "efficiency": {"prefill_tflops_per_sample": keep * 2}}
    (folder / "summary.json").write_text(json.dumps(summary))
    node = OmegaConf.create(cfg)
    return config_hash(*(node[key] for key in HASHED_KEYS))


def fake_sweep(root):
    return {"none": [fake_run(root, "none", 1.0, 0.8)],
            "clse": [fake_run(root, "clse", 0.1, 0.6), fake_run(root, "clse", 0.5, 0.75)],
            "fastv": [fake_run(root, "fastv", 0.1, 0.4)]}


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["python -m clse_exp.report", *map(str, args)])
    report.main()
    return capsys.readouterr()


def test_report_object_has_a_run_set_per_method_in_the_group_and_both_scatter_plots(monkeypatch):
    import wandb

    def no_network(*_, **__):
        raise AssertionError("building the report must not call the W&B API")

    monkeypatch.setattr(wandb, "Api", no_network)
    runs = {"clse": ["a1", "a2"], "fastv": ["b1"]}
    built = wandb_report.build_report("lab", "clse-exp", "pope-keep", "accuracy", runs, "pope-keep")
    assert isinstance(built, wr.Report)
    assert "pope-keep" in built.title and (built.entity, built.project) == ("lab", "clse-exp")
    (grid,) = [block for block in built.blocks if isinstance(block, wr.PanelGrid)]
    assert [runset.name for runset in grid.runsets] == ["clse", "fastv"]
    colors = []
    for runset, ids in zip(grid.runsets, runs.values(), strict=True):
        assert (runset.entity, runset.project) == ("lab", "clse-exp")
        parsed = expr.expr_to_filters(runset.filters)
        leaves = {(leaf.key.section, leaf.key.name): (leaf.op, leaf.value) for leaf in parsed.filters}
        assert parsed.op == "AND" and leaves == {("run", "group"): ("=", "pope-keep"), ("run", "name"): ("IN", ids)}
        assert set(runset.run_settings) == set(ids)
        colors.append({settings.color for settings in runset.run_settings.values()})
    assert all(len(c) == 1 for c in colors) and colors[0] != colors[1]  # one colour per method
    keep_plot, flops_plot = grid.panels
    assert isinstance(keep_plot, wr.ScatterPlot) and isinstance(flops_plot, wr.ScatterPlot)
    assert keep_plot.x == wr.Config("keep") and keep_plot.y == wr.SummaryMetric("metrics/accuracy")
    assert flops_plot.x == wr.SummaryMetric("efficiency/prefill_tflops_per_sample")
    assert flops_plot.y == wr.SummaryMetric("metrics/accuracy")


def test_without_a_group_the_run_sets_select_the_sweep_runs_by_id():
    built = wandb_report.build_report("lab", "clse-exp", None, "accuracy", {"clse": ["a1"]}, "2026-01-01")
    (grid,) = [block for block in built.blocks if isinstance(block, wr.PanelGrid)]
    assert "Group" not in grid.runsets[0].filters and "a1" in grid.runsets[0].filters


def test_run_ids_from_summaries_are_the_ids_the_runner_gives_wandb():
    cfg = OmegaConf.create(run_config("clse", 0.25) | {"eval": {"max_new_tokens": "${seed}"}})
    expected = config_hash(*(cfg[key] for key in HASHED_KEYS))
    summary_cfg = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    assert wandb_report.run_identity(summary_cfg) == {"entity": "lab", "project": "clse-exp", "group": "pope-keep",
                                                      "run_id": expected}
    assert summary_cfg["dataset"]["limit"] == 4  # hashing leaves the summary untouched
    assert wandb_report.run_identity(run_config("clse", 0.25, logger="local")) is None


def test_sweep_target_groups_the_runs_by_method(tmp_path):
    ids = fake_sweep(tmp_path)
    fake_run(tmp_path, "dart", 0.1, 0.5, logger="local")
    fake_run(tmp_path, "random", 0.1, 0.3, group="other-sweep")
    target = report.write_report(tmp_path)["wandb"]
    assert (target.entity, target.project, target.group) == ("lab", "clse-exp", "pope-keep")
    assert target.runs == ids
    assert target.elsewhere == 1


@pytest.mark.parametrize("env", [{"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, {}],
                         ids=["wandb-mode-offline", "no-api-key"])
def test_offline_prints_sync_and_build_commands_and_writes_the_local_report(tmp_path, monkeypatch, capsys, env):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(wandb_report, "save_report", lambda _: pytest.fail("offline must not save a W&B report"))
    sweep = tmp_path / "sweep"
    fake_sweep(sweep)
    out = run_cli(monkeypatch, capsys, sweep).out
    assert f"wandb sync {sweep}/*/*/wandb/offline-run-*" in out
    assert f"python -m clse_exp.report {sweep} --wandb" in out
    for name in LOCAL_FILES:
        assert (sweep / name).stat().st_size > 0


@pytest.fixture
def online(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_online_saves_the_report_and_prints_its_url(tmp_path, monkeypatch, capsys, online):
    saved = []

    def fake_save(built):
        saved.append(built)
        return "https://wandb.ai/lab/clse-exp/reports/x"

    monkeypatch.setattr(wandb_report, "save_report", fake_save)
    fake_sweep(tmp_path)
    captured = run_cli(monkeypatch, capsys, tmp_path)
    assert "W&B report: https://wandb.ai/lab/clse-exp/reports/x" in captured.out and not captured.err
    (built,) = saved
    assert "pope-keep" in built.title
    (grid,) = [block for block in built.blocks if isinstance(block, wr.PanelGrid)]
    assert [runset.name for runset in grid.runsets] == ["clse", "fastv", "none"]


def test_a_failing_save_is_one_warning_and_the_local_report_stays(tmp_path, monkeypatch, capsys, online):
    def broken(_):
        raise RuntimeError("W&B is down\n  (503 from api.wandb.ai)")

    monkeypatch.setattr(wandb_report, "save_report", broken)
    fake_sweep(tmp_path)
    captured = run_cli(monkeypatch, capsys, tmp_path)
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert warnings == ["W&B report: warning: not built (W&B is down (503 from api.wandb.ai)); "
                        "the local report is complete."]
    assert "W&B report:" not in captured.out
    for name in LOCAL_FILES:
        assert (tmp_path / name).stat().st_size > 0


def test_no_wandb_skips_the_report_even_online(tmp_path, monkeypatch, capsys, online):
    monkeypatch.setattr(wandb_report, "save_report", lambda _: pytest.fail("--no-wandb must not save"))
    fake_sweep(tmp_path)
    captured = run_cli(monkeypatch, capsys, tmp_path, "--no-wandb")
    assert "W&B" not in captured.out + captured.err
