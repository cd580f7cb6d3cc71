"""Sweeps and runs end honestly: failed points counted in one line with a non-zero exit, Ctrl-C and an
unwritable output folder are one line, prune=none runs once per sweep whatever keep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clse_exp import sweep_status

# The toy model (4 layers, the default): fastv cannot reach keep=0.1 (its layers 0-1 see every token).
TINY_SWEEP = ["prune=none,fastv", "keep=0.1,0.6", "dataset.limit=1", "eval.reference=false"]
FASTV_LINE = "  prune=fastv keep=0.1: keep=0.1 is not above 0.500000"


def cli(*args: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clse_exp", *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def files(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name))


def summary_lines(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("clse_exp: error: "))
    return lines[start:]


@pytest.mark.slow
def test_sweep_with_an_infeasible_point_ends_with_one_counting_line_and_exit_1(tmp_path):
    result = cli("-m", *TINY_SWEEP, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1, result.stderr
    lines = summary_lines(result.stderr)
    assert lines[0].startswith(f"clse_exp: error: 1 of 4 sweep points could not run (reasons in each point's "
                               f"error.txt or crash.txt under {tmp_path}; ")
    assert len(lines) == 2 and lines[1].startswith(FASTV_LINE)
    assert "Traceback" not in result.stderr
    # The other points' results are kept; prune=none ran once, its keep=0.6 twin points to that run.
    assert len(files(tmp_path, "summary.json")) == 2 and len(files(tmp_path, "error.txt")) == 1
    (same_as,) = files(tmp_path, "same_as.txt")
    owner = tmp_path / same_as.read_text().strip()
    assert json.loads((owner / "summary.json").read_text())["config"]["prune"]["name"] == "none"

    # A rerun into the same folder counts only its own points, and a point that now runs drops its stale error.
    fastv_06 = next(p.parent for p in files(tmp_path, "summary.json") if "/fastv/" in str(p))
    (fastv_06 / "error.txt").write_text("stale: from an earlier attempt\n")
    again = cli("-m", "prune=fastv", "keep=0.6", "dataset.limit=1", "eval.reference=false",
                f"hydra.sweep.dir={tmp_path}")
    assert again.returncode == 0, again.stderr
    assert f"clse_exp: all 1 sweep points have results in {tmp_path}" in again.stdout
    assert not (fastv_06 / "error.txt").exists()


@pytest.mark.slow
def test_local_launcher_sweep_counts_failed_points_too(tmp_path):
    result = cli("-m", "hydra/launcher=local", *TINY_SWEEP, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1, result.stderr
    lines = summary_lines(result.stderr)
    assert lines[0].startswith("clse_exp: error: 1 of 4 sweep points could not run")
    assert lines[1].startswith(FASTV_LINE)
    assert len(files(tmp_path, "summary.json")) == 2 and len(files(tmp_path, "same_as.txt")) == 1


def point(root: Path, name: str, mark: str, **contents: str) -> Path:
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- prune={name}\n- dataset.limit=1\n")
    (folder / sweep_status.POINT_MARK).write_text(mark)
    for file, text in contents.items():
        (folder / file.replace("_", ".")).write_text(text)
    return folder


def test_end_of_sweep_counts_crashed_and_unfinished_points_of_this_attempt_only(tmp_path):
    point(tmp_path, "clse", "now 0", summary_json="{}")
    point(tmp_path, "fastv", "now 1", predictions_jsonl='{"id": "a"}\n')
    point(tmp_path, "dart", "now 2", crash_txt="Traceback (most recent call last):\n  ...\nRuntimeError: boom\n")
    point(tmp_path, "pdrop", "earlier 3", error_txt="keep=0.1 is below 0.26\n")  # not this attempt's point
    code, text = sweep_status.end_of_sweep(tmp_path, "now")
    assert code == 1
    lines = text.splitlines()
    assert lines[0].startswith("clse_exp: error: 2 of 3 sweep points could not run")
    assert lines[1:] == ["  prune=fastv: no result (killed, out of memory, or still running; 1 sample saved)",
                         "  prune=dart: crashed: RuntimeError: boom"]  # in sweep order
    assert sweep_status.end_of_sweep(tmp_path, "earlier")[0] == 1
    assert sweep_status.end_of_sweep(tmp_path / "clse", None)[0] == 0


def test_unpruned_points_share_one_run_and_take_over_an_abandoned_claim(tmp_path):
    cfg = OmegaConf.create({"model": {"name": "m"}, "prune": {"name": "none"}, "layers": {"prune_layers": [2]},
                            "dataset": {"name": "d", "limit": 1}, "keep": 0.1, "budget": "average",
                            "schedule": "auto", "seed": 0, "eval": {"reference": False}})
    (tmp_path / sweep_status.ATTEMPT).write_text("now\n")
    first, second, third = (tmp_path / name for name in ("k01", "k05", "k09"))
    for folder in (first, second, third):
        folder.mkdir()
    assert sweep_status.unpruned_owner(cfg, first, tmp_path) is None  # the first claims the run
    (first / sweep_status.POINT_MARK).write_text("now 0")
    assert sweep_status.unpruned_owner(OmegaConf.merge(cfg, {"keep": 0.5, "layers": {"prune_layers": [5]}}),
                                       second, tmp_path) == first
    assert sweep_status.unpruned_owner(cfg, first, tmp_path) is None  # its own claim: runs (resumes)
    other_limit = OmegaConf.merge(cfg, {"dataset": {"limit": 2}})
    assert sweep_status.unpruned_owner(other_limit, third, tmp_path) is None  # a different run
    # A claim whose folder never finished, made by an earlier attempt, is taken over.
    (tmp_path / sweep_status.ATTEMPT).write_text("later\n")
    assert sweep_status.unpruned_owner(cfg, second, tmp_path) is None
    (second / sweep_status.POINT_MARK).write_text("later 1")  # what the callback writes when a point starts
    assert sweep_status.unpruned_owner(cfg, first, tmp_path) == second


@pytest.mark.parametrize("mode", [[], pytest.param(["-m"], marks=pytest.mark.slow)])
def test_unwritable_output_folder_is_one_line(mode):
    key = "hydra.sweep.dir" if mode else "hydra.run.dir"
    result = cli(*mode, f"{key}=/proc/clse_exp_unwritable", "dataset.limit=1", timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("clse_exp: error: cannot write the output folder /proc/clse_exp_unwritable "
                                     f"(No such file or directory); set {key}=<a writable folder>")
    full = cli(*mode, f"{key}=/proc/clse_exp_unwritable", timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_ctrl_c_is_one_line_and_exit_130_and_the_run_resumes(tmp_path):
    args = [sys.executable, "-m", "clse_exp", f"hydra.run.dir={tmp_path}", "dataset.limit=12", "batch_size=1",
            "eval.reference=false"]

    def default_sigint() -> None:  # a shell that starts pytest in the background makes children ignore SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    predictions = tmp_path / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while not (predictions.exists() and predictions.read_bytes().count(b"\n") >= 2):
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    saved = predictions.read_bytes().count(b"\n")
    assert stderr.strip() == (f"clse_exp: interrupted; {saved} samples saved in {tmp_path}; "
                              "rerun the same command to resume")
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["timings"]["resumed_from"] == saved


class FakeJob:
    """A submitit job as wait_for_jobs sees it: COMPLETED with a result, or CANCELLED without one."""

    def __init__(self, folder: Path, job_id: str, result=None, interrupt: bool = False):
        self.job_id, self._result, self._interrupt = job_id, result, interrupt
        self.state = "COMPLETED" if result is not None else "CANCELLED"
        pickle = folder / f"{job_id}_result.pkl"
        if result is not None:
            pickle.write_text("x")
        self.paths = type("Paths", (), {"result_pickle": pickle, "stderr": folder / f"{job_id}.err"})

    def wait(self):
        if self._interrupt:
            raise KeyboardInterrupt

    def results(self):
        return [self._result]


def test_lost_jobs_line_also_lists_the_points_that_could_not_run(tmp_path, capsys):
    from hydra_plugins.clse_exp_packed.submit import SweepJobsLost, wait_for_jobs

    (tmp_path / sweep_status.ATTEMPT).write_text("now\n")
    point(tmp_path, "fastv", "now 0", error_txt="keep=0.1 is below 0.51\n")
    point(tmp_path, "clse", "now 1", summary_json="{}")
    jobs = [FakeJob(tmp_path, "1_0", result="ok"), FakeJob(tmp_path, "1_1", result="ok"), FakeJob(tmp_path, "1_2")]
    with pytest.raises(SweepJobsLost) as lost:
        wait_for_jobs(jobs, ["#0 prune=fastv", "#1 prune=clse", "#2 prune=dart"], str(tmp_path))
    lines = str(lost.value).splitlines()
    assert lines[0].startswith("clse_exp: error: 1 of 3 sweep jobs ended without a result")
    assert lines[2:] == ["and 1 more sweep point could not run:", "  prune=fastv: keep=0.1 is below 0.51"]
    with pytest.raises(SystemExit) as stopped:
        wait_for_jobs([FakeJob(tmp_path, "2_0", interrupt=True)], ["#0"], str(tmp_path))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.startswith("clse_exp: interrupted (jobs already submitted may still be running")
