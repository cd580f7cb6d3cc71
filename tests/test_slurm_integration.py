"""hydra/launcher=slurm against a real single-node SLURM on this machine (launchers/local-slurm).

Needs root on Debian/Ubuntu: start.sh installs SLURM, munge and MariaDB with apt and starts the daemons;
stop.sh stops them after the tests. Runs only with CLSE_SLURM_IT=1 (.ci/run sets it, so in CI it always
runs; with the variable set, a machine that cannot run it is a failure, not a skip).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "launchers" / "local-slurm"
RUN_DIR = Path(os.environ.get("CLSE_SLURM_RUN_DIR", "/run/clse-local-slurm"))
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CLSE_SLURM_IT") != "1",
                       reason="SLURM integration test: set CLSE_SLURM_IT=1 (root, Debian; .ci/run does)"),
]


def is_running(pid: int, name: str) -> bool:
    """Process `pid` exists, is `name`, and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm == name and state != "Z"


def live_daemons() -> dict[str, int]:
    """The daemons whose recorded PID is alive and still that daemon."""
    alive = {}
    for name in DAEMONS:
        try:
            pid = int((RUN_DIR / f"{name}.pid").read_text())
        except (OSError, ValueError):
            continue
        if is_running(pid, name):
            alive[name] = pid
    return alive


def job_ids(sweep_dir: Path) -> list[str]:
    """SLURM job ids (`123`, or `123_0` for array tasks) from submitit's folders in the sweep."""
    return sorted(p.name for p in sweep_dir.glob(".submitit/*") if re.fullmatch(r"\d+(_\d+)?", p.name))


def run_script(name: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SLURM / name)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("CLSE_SLURM_IT=1 but this is not root on a Debian-like machine: start.sh cannot run here")
    started = time.monotonic()
    result = run_script("start.sh")
    print(f"start.sh: {time.monotonic() - started:.1f}s\n{result.stdout}")
    daemons = live_daemons()  # munged and MariaDB only where start.sh found none running already (CI: all five)
    try:
        assert result.returncode == 0, f"start.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        assert {"slurmdbd", "slurmctld", "slurmd"} <= set(daemons), f"running after start.sh: {daemons}"
        yield
    finally:
        stopped = run_script("stop.sh", timeout=180)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    left = [name for name, pid in daemons.items() if is_running(pid, name)]
    assert not left, f"still running after stop.sh: {left}"


def sweep_args(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "clse_exp", "-m", "hydra/launcher=slurm", "+cluster=local", *overrides,
            "model=tiny_qwen2vl", f"hydra.sweep.dir={sweep_dir}"]


def test_sweep_runs_every_point_on_slurm_and_reports(slurm, tmp_path):
    result = subprocess.run(sweep_args(tmp_path, "prune=clse,random", "keep=0.25,0.5", "dataset.size=4"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summaries = sorted(tmp_path.rglob("summary.json"))
    assert len(summaries) == 4 and len({p.parent for p in summaries}) == 4
    # The points ran as one SLURM job array, and accounting saw each task complete.
    job_dirs = [name for name in job_ids(tmp_path) if "_" in name]
    assert len(job_dirs) == 4, job_ids(tmp_path)
    array_id = job_dirs[0].split("_")[0]
    expected = sorted(f"{d}|COMPLETED" for d in job_dirs)
    for _ in range(60):  # a task has written its result a moment before its process exits
        states = sorted(subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", array_id],
                                       capture_output=True, text=True, timeout=60).stdout.split())
        if states == expected:
            break
        time.sleep(0.5)
    assert states == expected

    report = subprocess.run([sys.executable, "-m", "clse_exp.report", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "4 runs, 0 points that could not run, 0 crashed/unfinished points" in report.stdout
    with open(tmp_path / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["method"], float(row["keep"])) for row in rows) == [
        ("clse", 0.25), ("clse", 0.5), ("random", 0.25), ("random", 0.5)]
    assert all(row["n_samples"] == "4" for row in rows)
    all_runs = (tmp_path / "report.md").read_text().split("## All runs", 1)[1]
    assert all_runs.count("| tiny_qwen2vl | synthetic |") == 4


def test_cancelled_job_ends_the_sweep_with_a_clear_error(slurm, tmp_path):
    # 2000 samples keep the point busy for minutes: it is cancelled while it evaluates.
    sweep = subprocess.Popen(sweep_args(tmp_path, "prune=random", "keep=0.25", "dataset.size=2000",
                                        "eval.reference=false"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        job_id = None
        while time.monotonic() < deadline and sweep.poll() is None:
            job_id = job_id or next(iter(job_ids(tmp_path)), None)
            evaluating = any(p.stat().st_size for p in tmp_path.rglob("predictions.jsonl"))
            if job_id and evaluating:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the job never started evaluating (job {job_id}, sweep exit {sweep.poll()})")
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        assert state.strip() == "RUNNING", state
        subprocess.run(["scancel", job_id], check=True, timeout=30)
        cancelled = time.monotonic()
        try:
            _, stderr = sweep.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep still waits 120 s after its SLURM job was cancelled")
        waited = time.monotonic() - cancelled
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    print(f"sweep exited {waited:.1f}s after scancel:\n{stderr}")
    assert sweep.returncode != 0
    assert f"job {job_id} CANCELLED" in stderr and "1 of 1 sweep jobs ended without a result" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not list(tmp_path.rglob("summary.json"))
