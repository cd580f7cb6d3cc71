"""Submitit launchers whose lost jobs end the sweep with a short, readable error.

hydra-submitit-launcher waits for the jobs one by one and lets the first job without a result (cancelled,
killed for memory or time, node failure) escape as submitit's UncompletedJobError: a long traceback,
after a fixed 15 s wait for a result file that a cancelled job will never write, while the remaining
jobs are no longer watched. Here every job is waited for, and if any ended without a result the sweep
fails with one line per lost job: its sweep points, the scheduler's state and its log file.
`hydra/launcher=slurm` and `hydra/launcher=local` use these; the packed launchers share the same waiting.
"""

# No `from __future__ import annotations` (see packed.py: Hydra's plugin scan imports this module).
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from clse_exp.errors import ConfigError
from clse_exp.sweep_status import attempt_points, failure_lines

log = logging.getLogger(__name__)

# Final states after which no result file can still appear (SLURM's names; submitit's local executor
# reports INTERRUPTED for a killed process). A requeued (preempted, timed-out) job is still waited for.
LOST_STATES = ("CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "INTERRUPTED")


class SweepJobsLost(CompactHydraException):
    """Some submitted jobs ended without a result. Printed by Hydra as is, without a traceback."""


def _failure_line(err: Exception) -> str:
    """The last line of the job's traceback inside submitit's FailedJobError text (it sits between dashes)."""
    parts, current = [], []
    for line in str(err).splitlines():
        if line.strip() and set(line.strip()) == {"-"}:
            parts.append(current)
            current = []
        else:
            current.append(line)
    parts.append(current)
    body = parts[1] if len(parts) > 2 else parts[0]
    lines = [line.strip() for line in body if line.strip()]
    return lines[-1] if lines else type(err).__name__


def wait_for_jobs(jobs: Sequence[Any], labels: Sequence[str], sweep_dir: str) -> list[Any]:
    """Each job's first result, in order; raises SweepJobsLost naming every job that returned none."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    results, lost = [], []
    for job, label in zip(jobs, labels, strict=True):
        try:
            job.wait()
        except KeyboardInterrupt:
            print(f"clse_exp: interrupted (jobs already submitted may still be running; finished points are kept in "
                  f"{sweep_dir}); rerun the same command with hydra.sweep.dir={sweep_dir} to resume", file=sys.stderr)
            raise SystemExit(130) from None
        state = str(job.state)
        where = f"log: {job.paths.stderr}"
        if not job.paths.result_pickle.exists() and state.upper().startswith(LOST_STATES):
            lost.append(f"  {label}: job {job.job_id} {state} ({where})")
            continue
        try:
            results.append(job.results()[0])
        except FailedJobError as err:  # a subclass of UncompletedJobError: first
            lost.append(f"  {label}: job {job.job_id} failed: {_failure_line(err)} ({where})")
        except UncompletedJobError:
            lost.append(f"  {label}: job {job.job_id} {state}, no result written ({where})")
    if lost:
        head = (f"clse_exp: error: {len(lost)} of {len(jobs)} sweep jobs ended without a result "
                f"(finished points are in {sweep_dir}; rerun with hydra.sweep.dir={sweep_dir} to resume the rest):")
        points = attempt_points(Path(sweep_dir))  # the jobs that did return may hold points that could not run
        failed = failure_lines(points, Path(sweep_dir), ("could_not_run", "crashed"))
        plural = "s" if len(failed) != 1 else ""
        more = [f"and {len(failed)} more sweep point{plural} could not run:", *failed] if failed else []
        raise SweepJobsLost("\n".join([head, *lost, *more]))
    return results


LOCAL_HINT = ("run the sweep on this machine with hydra/launcher=local (or without hydra/launcher), or start a "
              "one-node SLURM with `sudo launchers/local-slurm/start.sh` and use +cluster=local")


def check_slurm_controller(timeout_s: float = 10.0) -> None:
    """Raise ConfigError (one line) unless a SLURM controller answers: without one, submitit fails with a
    traceback (no `srun`) or `sbatch` waits and retries before failing."""
    missing = [tool for tool in ("sbatch", "srun", "scontrol") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"the SLURM launcher: no SLURM controller was found ({', '.join(missing)} not on PATH); "
                          + LOCAL_HINT)
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"the SLURM launcher: no SLURM controller was found (`scontrol ping` gave no answer in "
                          f"{timeout_s:g} s); {LOCAL_HINT}") from None
    answer = " ".join((ping.stdout + ping.stderr).split())
    if ping.returncode != 0 or "UP" not in answer.split():
        raise ConfigError(f"the SLURM launcher: no SLURM controller was found (`scontrol ping`: {answer[:160]}); "
                          + LOCAL_HINT)


class SubmittingLauncher(BaseSubmititLauncher):
    """What the launchers here share: the executor, the sweep points as job arguments, the waiting."""

    def _executor(self) -> Any:
        import submitit

        if self._EXECUTOR == "slurm":
            check_slurm_controller()
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        return executor

    def _points(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[tuple]:
        """(overrides, job_dir_key, job_num, job_id, singleton_state) per point: the arguments of __call__."""
        points = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            points.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        return points

    @staticmethod
    def _label(point: tuple) -> str:
        return f"#{point[2]} {' '.join(filter_overrides(point[0]))}".rstrip()

    def _wait(self, jobs: Sequence[Any], labels: Sequence[str]) -> list[Any]:
        return wait_for_jobs(jobs, labels, str(self.config.hydra.sweep.dir))


class PointLauncher(SubmittingLauncher):
    """One sweep point per job, like hydra-submitit-launcher (requeue on timeout included)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        executor = self._executor()
        points = self._points(job_overrides, initial_job_idx)
        jobs = executor.map_array(self, *zip(*points, strict=True))
        return self._wait(jobs, [self._label(p) for p in points])


class LocalLauncher(PointLauncher):
    _EXECUTOR = "local"


class SlurmLauncher(PointLauncher):
    _EXECUTOR = "slurm"
