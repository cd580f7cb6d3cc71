"""How each point of a sweep ended, and the line a sweep ends with (a Hydra callback, `hydra.callbacks`).

A sweep point folder ends in one of these states (besides Hydra's .hydra/ and the results):
summary.json (done), error.txt (could not run: one line, e.g. a budget the layers cannot reach),
crash.txt (the run raised: its traceback), same_as.txt (a prune=none point: the unpruned run ignores
keep, budget, schedule, protocol and layers, so the sweep runs it once and the other such points name that folder).
A folder with none of them was killed (out of memory, time limit, node lost) or is still running.

The callback also refuses an output folder it cannot write before Hydra tries to log into it, and marks
each point with the sweep attempt that ran it, so a rerun into the same sweep folder counts only its own
points and a stale error.txt from an earlier attempt is removed when its point runs again.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from clse_exp.run_id import HASHED_KEYS, config_hash

SUMMARY, ERROR, CRASH, SAME_AS = "summary.json", "error.txt", "crash.txt", "same_as.txt"
ATTEMPT = ".clse_exp_sweep"  # in the sweep folder: the token of the attempt now running
POINT_MARK = ".clse_exp_point"  # in a point folder: "<token> <job number>" of the attempt that last ran it
CLAIMS = ".clse_exp_unpruned"  # sweep folder: which point runs each distinct unpruned config
UNPRUNED_IGNORES = ("keep", "budget", "schedule", "protocol", "layers")
STATES = ("done", "same_as", "could_not_run", "crashed", "unfinished")


@dataclass(frozen=True)
class Point:
    """One sweep point folder: its state, a one-line reason, the overrides that made it, its attempt."""

    folder: Path
    state: str
    reason: str
    overrides: tuple[str, ...]
    attempt: str | None
    job_num: int | None = None  # its place in the sweep, for listing points in sweep order


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def read_point(folder: Path) -> Point:
    """The point's state from the files in its folder (see the module docstring)."""
    overrides = yaml.safe_load(_read(folder / ".hydra" / "overrides.yaml") or "[]") or []
    overrides = tuple(o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/")))
    mark = (_read(folder / POINT_MARK) or "").split()
    attempt = mark[0] if mark else None
    job_num = int(mark[1]) if len(mark) > 1 and mark[1].isdigit() else None
    error, crash, same = (_read(folder / name) for name in (ERROR, CRASH, SAME_AS))
    if error is not None:
        state, reason = "could_not_run", (error.strip().splitlines() or ["(empty error.txt)"])[0]
    elif crash is not None:
        lines = [line for line in crash.strip().splitlines() if line.strip()]
        state, reason = "crashed", f"crashed: {lines[-1].strip() if lines else '(empty crash.txt)'}"
    elif (folder / SUMMARY).exists():
        state, reason = "done", ""
    elif same is not None:
        state, reason = "same_as", f"same run as {same.strip().splitlines()[0]} (prune=none ignores keep)"
    else:
        predictions = folder / "predictions.jsonl"
        saved = predictions.read_bytes().count(b"\n") if predictions.exists() else 0
        samples = f"{saved} sample{'s' if saved != 1 else ''} saved"
        state, reason = "unfinished", f"no result (killed, out of memory, or still running; {samples})"
    return Point(folder, state, reason, overrides, attempt, job_num)


def find_points(root: Path) -> list[Point]:
    """Every sweep point (or single run) folder under `root`, in path order."""
    markers = (SUMMARY, ERROR, CRASH, SAME_AS, POINT_MARK)
    folders = {p.parent for name in markers for p in root.rglob(name) if p.is_file()}
    folders |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    return [read_point(folder) for folder in sorted(folders)]


def labels(points: list[Point], root: Path) -> list[str]:
    """Each point's distinguishing overrides (those not shared by every point), else its folder."""
    common = set.intersection(*(set(p.overrides) for p in points)) if len(points) > 1 else set()
    out = []
    for point in points:
        own = [o for o in point.overrides if o not in common]
        out.append(" ".join(own) if own else str(point.folder.relative_to(root)))
    return out


def sweep_root(output_dir: str | Path, subdir: str) -> Path:
    """The sweep folder of a point: its output folder without the `hydra.sweep.subdir` part."""
    output_dir = Path(output_dir)
    depth = len(Path(subdir).parts)
    if depth and output_dir.parts[-depth:] == Path(subdir).parts:
        return output_dir.parents[depth - 1]
    return output_dir.parent


def unpruned_owner(cfg: DictConfig, point: Path, root: Path) -> Path | None:
    """For a prune=none point, the point of this sweep that runs the same unpruned config (None: this one).

    The first point to claim the config (an atomic hard link, safe with parallel jobs) runs it; a claim
    whose folder never finished and was not made by this attempt is taken over, so nothing is left unrun.
    """
    if cfg.prune.name != "none":
        return None
    key = config_hash(*(cfg[k] for k in HASHED_KEYS if k not in UNPRUNED_IGNORES), cfg.dataset.get("limit"))
    claims = root / CLAIMS
    claims.mkdir(exist_ok=True)
    claim = claims / key
    mine = str(point.resolve().relative_to(root.resolve()))
    with tempfile.NamedTemporaryFile("w", dir=claims, delete=False) as tmp:
        tmp.write(mine + "\n")
    try:
        os.link(tmp.name, claim)
        return None
    except FileExistsError:
        owner = root / claim.read_text().strip()
        token = (_read(root / ATTEMPT) or "").strip()
        if owner.resolve() == point.resolve():
            return None
        if not (owner / SUMMARY).exists() and (_read(owner / POINT_MARK) or "").split()[:1] != [token]:
            os.replace(tmp.name, claim)  # the earlier owner never finished: this point runs it now
            return None
        return owner
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def _check_writable(folder: Any, key: str) -> None:
    """One line instead of logging's 'Unable to configure handler' when the output folder is not writable."""
    folder = Path(str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        reason = err.strerror or type(err).__name__
        print(f"clse_exp: error: cannot write the output folder {folder} ({reason}); set {key}=<a writable folder>",
              file=sys.stderr)
        raise SystemExit(2) from None


def attempt_points(root: Path, token: str | None = None) -> list[Point]:
    """The points the sweep attempt `token` (default: the latest one started in `root`) ran."""
    token = token or (_read(root / ATTEMPT) or "").strip() or None
    points = [p for p in find_points(root) if token is None or p.attempt == token]
    return sorted(points, key=lambda p: -1 if p.job_num is None else p.job_num)


def failure_lines(points: list[Point], root: Path, states: tuple[str, ...]) -> list[str]:
    """`  <distinguishing overrides>: <reason>` for each point in one of `states`."""
    named = zip(points, labels(points, root), strict=True)
    return [f"  {label}: {point.reason}" for point, label in named if point.state in states]


def end_of_sweep(root: Path, token: str | None) -> tuple[int, str]:
    """(exit code, lines) for the points this attempt ran: 0 when every one has a result."""
    points = attempt_points(root, token)
    if not points:
        return 0, f"clse_exp: no sweep point ran in {root}"
    bad = failure_lines(points, root, ("could_not_run", "crashed", "unfinished"))
    if not bad:
        return 0, (f"clse_exp: all {len(points)} sweep points have results in {root} "
                   f"(tables and plots: python -m clse_exp.report {root})")
    head = (f"clse_exp: error: {len(bad)} of {len(points)} sweep points could not run (reasons in each point's "
            f"error.txt or crash.txt under {root}; the other points' results are kept; rerun with "
            f"hydra.sweep.dir={root} to resume):")
    return 1, "\n".join([head, *bad])


class SweepStatus(Callback):
    """Checks output folders up front, marks sweep points, and ends a sweep with its count of failed points."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.token: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # run.dir may interpolate ${hydra:...}
        _check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.root = Path(str(config.hydra.sweep.dir))
        _check_writable(self.root, "hydra.sweep.dir")
        self.token = uuid.uuid4().hex
        (self.root / ATTEMPT).write_text(self.token + "\n")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        point = Path(config.hydra.runtime.output_dir)
        root = sweep_root(point, str(config.hydra.sweep.subdir))
        for name in (ERROR, CRASH, SAME_AS):  # from an earlier attempt: this one decides afresh
            (point / name).unlink(missing_ok=True)
        (point / POINT_MARK).write_text(f"{(_read(root / ATTEMPT) or '').strip()} {config.hydra.job.num}\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.root is None:
            return
        code, text = end_of_sweep(self.root, self.token)
        print(text, file=sys.stderr if code else sys.stdout)
        if code:
            raise SystemExit(code)
