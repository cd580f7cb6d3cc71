"""`python -m clse_exp [overrides]`: one run (or a sweep with -m) driven by the Hydra config in conf/."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clse_exp.config import register_schemas
from clse_exp.errors import ConfigError

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from clse_exp.runner import run

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"clse_exp: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
