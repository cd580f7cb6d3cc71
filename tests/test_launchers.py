"""Launcher presets: submitit-local sweeps really run; the SLURM preset composes with a cluster preset."""

from __future__ import annotations

import subprocess
import sys


def test_local_submitit_sweep_runs_every_point(tmp_path):
    args = [sys.executable, "-m", "clse_exp", "-m", "hydra/launcher=local", "prune=none,random", "keep=0.3",
            "dataset.limit=1", "eval.reference=false", f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.rglob("summary.json"))) == 2
    assert list(tmp_path.glob(".submitit/*"))  # the jobs went through submitit


def test_slurm_preset_takes_the_cluster_settings():
    args = [sys.executable, "-m", "clse_exp", "hydra/launcher=slurm", "+cluster=local", "--cfg", "hydra"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    launcher = result.stdout.split("  launcher:")[1]
    assert "SlurmLauncher" in launcher and "partition: debug" in launcher and "WANDB_MODE=offline" in launcher


def test_packed_launcher_loads_the_model_once_per_job(tmp_path):
    import json

    args = [sys.executable, "-m", "clse_exp", "-m", "hydra/launcher=packed_local", "hydra.launcher.points_per_job=2",
            "prune=none,random,fastv", "keep=0.3", "dataset.limit=1", "eval.reference=false",
            f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summaries = {}
    for path in tmp_path.rglob("summary.json"):
        summary = json.loads(path.read_text())
        summaries[summary["config"]["prune"]["name"]] = summary["timings"]["load_s"]
    assert set(summaries) == {"none", "random", "fastv"}
    job_folders = [p for p in (tmp_path / ".submitit").iterdir() if p.name != "%j"]
    assert len(job_folders) == 2  # 3 points packed into jobs of 2 + 1
    # The second point of the first job reuses the model its first point loaded.
    assert summaries["random"] < 0.1 * summaries["none"]
