"""`python -m clse_exp [overrides]`: one run (or a sweep with -m) driven by the Hydra config in conf/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from clse_exp.config import register_schemas
from clse_exp.errors import ConfigError
from clse_exp.run_id import register_resolver

register_schemas()
register_resolver()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from clse_exp.runner import run

    hydra_cfg = HydraConfig.get()
    try:
        run(cfg, hydra_cfg.runtime.output_dir)
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"clse_exp: error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # one infeasible point must not end the sweep
            Path(hydra_cfg.runtime.output_dir, "error.txt").write_text(f"{err}\n")
            return
        sys.exit(2)


if __name__ == "__main__":
    main()
