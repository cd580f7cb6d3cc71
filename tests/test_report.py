"""`python -m clse_exp.report` on a hand-made sweep folder with known numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd


def fake_run(root, method, keep, accuracy, histogram=None):
    folder = root / method / f"keep{keep}"
    folder.mkdir(parents=True)
    cfg = {"model": {"name": "m"}, "dataset": {"name": "d"}, "prune": {"name": method}, "keep": keep,
           "budget": "average", "schedule": "auto", "layers": {"reference_layer": 0, "prune_layers": [2]}}
    summary = {"config": cfg, "n_samples": 10, "metrics": {"accuracy": accuracy, "note": "text is ignored"},
               "retention": {"average": keep, "kept_row_histogram": histogram or [0.5, 0.5]},
               "efficiency": {"prefill_tflops_per_sample": keep * 2}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_tables_relative_performance_and_plots(tmp_path):
    fake_run(tmp_path, "none", 1.0, 0.8)
    fake_run(tmp_path, "clse", 0.1, 0.6)
    fake_run(tmp_path, "clse", 0.5, 0.8)
    fake_run(tmp_path, "fastv", 0.1, 0.4, histogram=[0.1, 0.9])
    (tmp_path / "pdrop" / "keep0.1").mkdir(parents=True)
    (tmp_path / "pdrop" / "keep0.1" / "error.txt").write_text("keep=0.1 is below 0.26\n")
    result = subprocess.run([sys.executable, "-m", "clse_exp.report", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "report.csv").set_index(["method", "keep"])
    assert frame.loc[("clse", 0.1), "relative"] == 0.6 / 0.8
    assert frame.loc[("fastv", 0.1), "relative"] == 0.5
    report = (tmp_path / "report.md").read_text()
    assert "keep=0.1 is below 0.26" in report and "`accuracy`" in report
    for image in ("metric_vs_keep.png", "metric_vs_tflops.png", "kept_rows.png"):
        assert (tmp_path / image).stat().st_size > 0


def test_report_on_an_empty_folder_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clse_exp.report", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "no summary.json" in result.stderr
