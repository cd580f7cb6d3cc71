"""`python -m clse_exp [overrides]`: one run (or a sweep with -m) driven by the Hydra config in conf/.

A bad value is one line and exit 2; Ctrl-C is one line and exit 130 (resume by rerunning). In a sweep a
point that cannot run or crashes records why in its folder (error.txt, crash.txt) and the sweep goes on;
the sweep then ends with one line counting those points and a non-zero exit (clse_exp.sweep_status).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from clse_exp import sweep_status
from clse_exp.config import register_schemas, validate_run
from clse_exp.errors import ConfigError
from clse_exp.run_id import register_resolver

register_schemas()
register_resolver()


def saved_samples(run_dir: Path) -> int:
    """Finished prediction lines in the run folder (a torn last line does not count)."""
    path = run_dir / "predictions.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def interrupted_line(run_dir: Path, sweep_dir: Path | None) -> str:
    rerun = "rerun the same command" + ("" if sweep_dir is None else f" with hydra.sweep.dir={sweep_dir}")
    return f"clse_exp: interrupted; {saved_samples(run_dir)} samples saved in {run_dir}; {rerun} to resume"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from clse_exp.runner import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = sweep_status.sweep_root(run_dir, hydra_cfg.sweep.subdir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        validate_run(cfg)  # a bad value is reported even for a prune=none point that another point runs
        owner = sweep_status.unpruned_owner(cfg, run_dir, sweep_dir) if sweep_dir else None
        if owner is not None:
            (run_dir / sweep_status.SAME_AS).write_text(f"{owner.relative_to(sweep_dir)}\n")
            print("clse_exp: prune=none ignores keep, budget, schedule, protocol and layers; this point shares "
                  f"{owner}")
            return
        run(cfg, run_dir)
    except ConfigError as err:
        if full_error:
            raise
        print(f"clse_exp: error: {err}", file=sys.stderr)
        if sweep_dir is None:
            sys.exit(2)
        (run_dir / sweep_status.ERROR).write_text(f"{err}\n")  # one infeasible point must not end the sweep
    except KeyboardInterrupt:
        if full_error:
            raise
        print(interrupted_line(run_dir, sweep_dir), file=sys.stderr)
        sys.exit(130)
    except Exception:
        if sweep_dir is None or full_error:
            raise
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, end="")
        (run_dir / sweep_status.CRASH).write_text(trace)  # counted at the end of the sweep, which goes on


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before or after a run (Hydra startup, logging teardown)
        print("clse_exp: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # `--help` composes outside Hydra's reporter (clse_exp.cli_errors covers the rest)
        from clse_exp.cli_errors import one_line

        line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else one_line(err)
        if line is None:
            raise
        print(f"clse_exp: error: {line}", file=sys.stderr)
        sys.exit(2)
