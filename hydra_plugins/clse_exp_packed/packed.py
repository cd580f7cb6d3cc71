"""Several sweep points per submitit job (local or SLURM), run one after another in one process.

Loading a 7B model costs more than evaluating one cheap sweep point; clse_exp caches loaded models per
process (keyed by id, dtype, attention implementation), so points packed into one job share the load
and only attach a different pruner.
"""

# No `from __future__ import annotations` here: Hydra's plugin scan imports this module in a way that
# breaks dataclasses with postponed annotations.
import logging
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from clse_exp.errors import ConfigError
from hydra_plugins.clse_exp_packed.submit import SubmittingLauncher

log = logging.getLogger(__name__)


class PackedLauncher(SubmittingLauncher):
    """`points_per_job` sweep points per submitted job; results come back in sweep order."""

    def __init__(self, points_per_job: int = 4, **params: Any) -> None:
        super().__init__(**params)
        if points_per_job < 1:
            raise ConfigError(f"hydra.launcher.points_per_job={points_per_job} must be >= 1")
        self.points_per_job = points_per_job

    def run_points(self, points: list[tuple]) -> list[JobReturn]:
        """The job body: each point is (overrides, job_dir_key, job_num, job_id, singleton_state)."""
        return [BaseSubmititLauncher.__call__(self, *point) for point in points]

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        executor = self._executor()
        points = self._points(job_overrides, initial_job_idx)
        packs = [points[i : i + self.points_per_job] for i in range(0, len(points), self.points_per_job)]
        log.info(f"{len(points)} sweep points in {len(packs)} jobs of up to {self.points_per_job}")
        jobs = executor.map_array(self.run_points, packs)
        labels = ["; ".join(self._label(point) for point in pack) for pack in packs]
        return [result for results in self._wait(jobs, labels) for result in results]


class PackedLocalLauncher(PackedLauncher):
    _EXECUTOR = "local"


class PackedSlurmLauncher(PackedLauncher):
    _EXECUTOR = "slurm"


@dataclass
class PackedLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.clse_exp_packed.packed.PackedLocalLauncher"
    points_per_job: int = 4


@dataclass
class PackedSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.clse_exp_packed.packed.PackedSlurmLauncher"
    points_per_job: int = 4


ConfigStore.instance().store(group="hydra/launcher", name="packed_local", node=PackedLocalConf, provider="clse_exp")
ConfigStore.instance().store(group="hydra/launcher", name="packed_slurm", node=PackedSlurmConf, provider="clse_exp")
