"""Launcher presets: submitit-local sweeps really run; the SLURM preset composes with a cluster preset."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow  # a real submitit sweep of subprocesses (CI runs it with the slow tests)
def test_local_submitit_sweep_runs_every_point(tmp_path):
    args = [sys.executable, "-m", "clse_exp", "-m", "hydra/launcher=local", "prune=none,random", "keep=0.3",
            "dataset.limit=1", "eval.reference=false", f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.rglob("summary.json"))) == 2
    assert list(tmp_path.glob(".submitit/*"))  # the jobs went through submitit


@pytest.mark.slow
def test_slurm_preset_takes_the_cluster_settings():
    args = [sys.executable, "-m", "clse_exp", "hydra/launcher=slurm", "+cluster=local", "--cfg", "hydra"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    launcher = result.stdout.split("  launcher:")[1]
    assert "SlurmLauncher" in launcher and "partition: debug" in launcher and "WANDB_MODE=offline" in launcher


@pytest.mark.slow
def test_packed_launcher_loads_the_model_once_per_job(tmp_path):
    import json

    args = [sys.executable, "-m", "clse_exp", "-m", "hydra/launcher=packed_local", "hydra.launcher.points_per_job=2",
            "prune=none,random,fastv", "keep=0.3", "dataset.limit=1", "eval.reference=false", "model=tiny_qwen2vl",
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


def test_lost_jobs_end_the_sweep_with_one_line_each(tmp_path):
    from types import SimpleNamespace

    import pytest
    from submitit.core.utils import FailedJobError

    from hydra_plugins.clse_exp_packed.submit import SweepJobsLost, wait_for_jobs

    class FakeJob:
        def __init__(self, job_id, state, result=None, error=None):
            self.job_id, self.state, self._result, self._error = job_id, state, result, error
            pickle = tmp_path / f"{job_id}_result.pkl"
            if result is not None or error is not None:
                pickle.write_text("x")
            self.paths = SimpleNamespace(result_pickle=pickle, stderr=tmp_path / f"{job_id}_log.err")

        def wait(self):
            pass

        def results(self):
            if self._error:
                raise self._error
            return [self._result]

    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom"
    failed = FailedJobError(f"Job (task=0) failed during processing with trace:\n-----\n{trace}\n-----\nlogs: ...")
    jobs = [FakeJob("7_0", "COMPLETED", result="ok"), FakeJob("7_1", "CANCELLED by 0"),
            FakeJob("7_2", "FAILED", error=failed)]
    with pytest.raises(SweepJobsLost) as lost:
        wait_for_jobs(jobs, ["#0 keep=0.1", "#1 keep=0.2", "#2 keep=0.3"], "/sweep")
    lines = str(lost.value).splitlines()
    assert lines[0].startswith("clse_exp: error: 2 of 3 sweep jobs ended without a result")
    assert lines[1] == f"  #1 keep=0.2: job 7_1 CANCELLED by 0 (log: {tmp_path}/7_1_log.err)"
    assert lines[2] == f"  #2 keep=0.3: job 7_2 failed: RuntimeError: boom (log: {tmp_path}/7_2_log.err)"
    assert wait_for_jobs(jobs[:1], ["#0"], "/sweep") == ["ok"]
