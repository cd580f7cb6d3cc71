"""Every experiment preset runs as a sweep on the tiny model, and the report reads it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clse_exp.config import group_options

EXPECTED_POINTS = {"keep_sweep": 18, "ablate_bands": 12, "ablate_layer_pairs": 6, "paper_qwen2vl": 3}


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_preset_runs_as_a_sweep(preset, tmp_path):
    args = [sys.executable, "-m", "clse_exp", "-m", f"+experiment={preset}", "model=tiny_qwen2vl",
            "dataset.limit=1", "eval.reference=false", f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    done = len(list(tmp_path.rglob("summary.json")))
    failed = len(list(tmp_path.rglob("error.txt")))
    assert done + failed == EXPECTED_POINTS[preset] and done > 0
    report = subprocess.run([sys.executable, "-m", "clse_exp.report", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0 and (tmp_path / "report.md").exists()
