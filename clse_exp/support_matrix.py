"""`python -m clse_exp.support_matrix`: what the CLI does for every method x tiny family x input x protocol.

The README's support table must not be a claim someone typed: this module runs the CLI itself on every
point (one Hydra multirun per tiny family, so start-up is paid 8 times, not 600) and classifies each point:

* runs: exit 0 and the achieved layer-averaged retention is within tolerance of the asked `keep`
  (`atol` plus half a token per visual grid/frame: counts are whole tokens per grid);
* runs (official count): exit 0, retention off `keep`, but the run flags it (`budget_unreachable`):
  an official count rule departed from `keep`, or a grid was too small, and the run says so;
* refused: one line naming why, before any weights load (in a sweep: a one-line error.txt and no
  "model ... loaded" in the point's log; `--confirm-refusals` also reruns one point per distinct reason as a
  single run and requires exit 2 with exactly one stderr line `clse_exp: error: ...`);
* WRONG: anything else (a traceback, silent retention drift, a refusal after loading, a multi-line error,
  a missing result).

It writes matrix.json (every point: status, why, the single-run command that reproduces it) and matrix.md
(the table). `--write-readme` replaces the README block between the support-matrix markers with that table,
so the README shows what the CLI did, and `tests/test_support_matrix.py` checks the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clse_exp.config import CONF_DIR

VARIANTS = ("image", "multi_image", "video")
PROTOCOLS = ("official", "uniform")
RUNS, OFFICIAL, REFUSED, WRONG = "runs", "runs (official count)", "refused", "WRONG"
STATUSES = (RUNS, OFFICIAL, REFUSED, WRONG)
SYMBOLS = {RUNS: "✓", OFFICIAL: "≈", REFUSED: "·", WRONG: "✗"}
VARIANT_LETTERS = {"image": "i", "multi_image": "m", "video": "v"}
README = Path(__file__).resolve().parent.parent / "README.md"
MARK_START, MARK_END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
ERROR_PREFIX = "clse_exp: error: "
WEIGHTS_LOADED = re.compile(r"model \S+ loaded in ")  # runner.run logs this once the weights are in memory
UNPRUNED = "none"


@dataclass(frozen=True)
class Settings:
    """What every point runs with: the smallest work that still prefills and takes one cached decode step."""

    keep: float = 0.33
    limit: int = 1
    max_new_tokens: int = 2  # 2, not 1: the second token runs a decode step on the pruned cache
    atol: float = 0.02

    def overrides(self) -> list[str]:
        return [f"keep={self.keep}", f"dataset.limit={self.limit}", f"dataset.max_new_tokens={self.max_new_tokens}",
                "dataset=synthetic", "logger=none", "eval.reference=false", "batch_size=1"]


@dataclass(frozen=True)
class Key:
    method: str
    family: str  # the tiny model's config name (model=...)
    variant: str
    protocol: str

    def overrides(self) -> list[str]:
        return [f"model={self.family}", f"prune={self.method}", f"dataset.variant={self.variant}",
                f"protocol={self.protocol}"]


@dataclass
class Outcome:
    """One point's verdict; `command` reruns it alone (`python -m clse_exp ...`)."""

    status: str
    detail: str
    command: str = ""
    retention: dict[str, Any] = field(default_factory=dict)
    folder: str = ""


def tiny_families() -> list[str]:
    """Every tiny offline model config (conf/model/tiny_*.yaml): a new family is in the matrix by existing."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("tiny_*.yaml"))


def all_methods() -> list[str]:
    from clse_exp.pruning.methods import method_names

    return method_names()


def single_command(key: Key, settings: Settings) -> list[str]:
    return [sys.executable, "-m", "clse_exp", *key.overrides(), *settings.overrides()]


def shown_command(key: Key, settings: Settings) -> str:
    return shlex.join(["python", *single_command(key, settings)[1:]])


# ---- classification (pure: the fast tests feed it synthetic inputs) ----

def rounding_allowance(records: Iterable[dict[str, Any]]) -> float:
    """Half a token per grid (or video frame) over the sample's visual tokens, averaged over samples.

    Counts are whole tokens per grid, so a 3 x 3 frame cannot keep exactly a third: that is not drift.
    """
    shares = []
    for rec in records:
        n_visual = rec.get("n_visual") or 0
        grids = rec.get("grids") or [[1, 0, 0]]
        if n_visual:
            shares.append(0.5 * sum(int(g[0]) for g in grids) / n_visual)
    return sum(shares) / len(shares) if shares else 0.0


def classify_summary(summary: dict[str, Any], method: str, settings: Settings, allowance: float = 0.0,
                     ) -> tuple[str, str]:
    """runs / runs (official count) / WRONG for a run that exited 0, from its summary.json."""
    n = summary.get("n_samples")
    if n != settings.limit:
        return WRONG, f"answered {n} of {settings.limit} samples"
    ret = summary.get("retention") or {}
    if method == UNPRUNED:
        average = ret.get("average", 1.0)
        if abs(average - 1.0) > 1e-9:
            return WRONG, f"prune=none kept {average:.3f} of the visual tokens"
        return RUNS, "unpruned"
    if "average" not in ret:
        return WRONG, "no retention in summary.json"
    asked, average = ret.get("asked"), float(ret["average"])
    if asked is None or abs(float(asked) - settings.keep) > 1e-9:
        return WRONG, f"retention.asked={asked} but keep={settings.keep}"
    if ret.get("text_only_samples"):
        return WRONG, f"{ret['text_only_samples']} samples answered without their visual input"
    tol = settings.atol + allowance
    off = average - settings.keep
    said = f"average {average:.3f}, final {float(ret.get('final', float('nan'))):.3f} for keep {settings.keep}"
    if ret.get("budget_unreachable_samples"):
        return OFFICIAL, f"{said}; {ret['budget_unreachable_samples']} sample(s) flagged budget_unreachable"
    if abs(off) <= tol:
        return RUNS, said
    return WRONG, f"{said}: off by {off:+.3f} (tolerance {tol:.3f}) and not flagged budget_unreachable"


def classify_refusal(error_text: str, log_text: str) -> tuple[str, str]:
    """refused when the reason is one line and no weights were loaded first, else WRONG."""
    lines = [line for line in error_text.splitlines() if line.strip()]
    if not lines:
        return WRONG, "refused with an empty reason"
    if len(lines) > 1:
        return WRONG, f"refused with {len(lines)} lines: {lines[0][:200]}"
    if WEIGHTS_LOADED.search(log_text):
        return WRONG, f"refused after the weights loaded: {lines[0]}"
    return REFUSED, lines[0]


def classify_single(returncode: int, stderr: str, summary: dict[str, Any] | None, log_text: str,
                    method: str, settings: Settings, allowance: float = 0.0) -> tuple[str, str]:
    """The verdict for one `python -m clse_exp` process from its exit code, stderr and results."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if returncode == 0:
        if summary is None:
            return WRONG, "exit 0 without summary.json"
        return classify_summary(summary, method, settings, allowance)
    if returncode == 2 and lines and lines[-1].startswith(ERROR_PREFIX):
        if len(lines) > 1:
            return WRONG, f"exit 2 with {len(lines)} stderr lines, first: {lines[0][:200]}"
        return classify_refusal(lines[0][len(ERROR_PREFIX):], log_text)
    last = lines[-1][:300] if lines else "(no stderr)"
    return WRONG, f"exit {returncode}: {last}"


# ---- running ----

def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _records(folder: Path) -> list[dict[str, Any]]:
    out = []
    for line in _read(folder / "predictions.jsonl").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _retention(summary: dict[str, Any] | None) -> dict[str, Any]:
    ret = (summary or {}).get("retention") or {}
    keys = ("asked", "average", "final", "budget_unreachable_samples", "text_only_samples")
    return {k: ret[k] for k in keys if k in ret}


def _summary(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    env.pop("HYDRA_FULL_ERROR", None)  # the CLI's own one-line errors are what is checked
    return env


def sweep_command(family: str, methods: Sequence[str], variants: Sequence[str], protocols: Sequence[str],
                  settings: Settings, sweep_dir: Path) -> list[str]:
    return [sys.executable, "-m", "clse_exp", "-m", f"model={family}", f"prune={','.join(methods)}",
            f"dataset.variant={','.join(variants)}", f"protocol={','.join(protocols)}", *settings.overrides(),
            f"hydra.sweep.dir={sweep_dir}"]


def run_sweep(family: str, methods: Sequence[str], variants: Sequence[str], protocols: Sequence[str],
              settings: Settings, out: Path, threads: int) -> tuple[int, str]:
    """One multirun over every method x variant x protocol of a family: (exit code, last stderr line)."""
    sweep_dir = out / "runs" / family
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = sweep_command(family, methods, variants, protocols, settings, sweep_dir)
    with open(logs / f"{family}.out", "w") as so, open(logs / f"{family}.err", "w") as se:
        code = subprocess.run(cmd, stdout=so, stderr=se, env=_env(threads), check=False).returncode
    err = [line for line in _read(logs / f"{family}.err").splitlines() if line.strip()]
    return code, err[-1] if err else ""


def sweep_outcomes(out: Path, family: str, settings: Settings) -> dict[Key, Outcome]:
    """Every point a family's sweep left, classified from its folder (clse_exp.sweep_status states)."""
    from clse_exp.sweep_status import find_points

    root = out / "runs" / family
    found: dict[Key, Outcome] = {}
    if not root.exists():
        return found
    points = find_points(root)
    by_folder = {p.folder.resolve(): p for p in points}
    for point in points:
        o = dict(item.split("=", 1) for item in point.overrides if "=" in item)
        key = Key(o.get("prune", "?"), family, o.get("dataset.variant", "?"), o.get("protocol", "?"))
        target = point
        if point.state == "same_as":  # prune=none ignores the protocol: the sweep ran it once
            owner = root / _read(point.folder / "same_as.txt").strip().splitlines()[0]
            target = by_folder.get(owner.resolve(), point)
        found[key] = _classify_point(target, key, settings)
        found[key].folder = str(point.folder)
    return found


def _classify_point(point: Any, key: Key, settings: Settings) -> Outcome:
    folder = point.folder
    log = _read(folder / "clse_exp.log")
    if point.state == "done":
        summary = _summary(folder)
        status, detail = classify_summary(summary or {}, key.method, settings, rounding_allowance(_records(folder)))
        return Outcome(status, detail, retention=_retention(summary))
    if point.state == "could_not_run":
        status, detail = classify_refusal(_read(folder / "error.txt"), log)
        return Outcome(status, detail)
    if point.state == "crashed":
        return Outcome(WRONG, point.reason)
    return Outcome(WRONG, point.reason or point.state)


def run_single(key: Key, settings: Settings, out: Path, threads: int) -> Outcome:
    """The point as its own `python -m clse_exp` process: the CLI contract exactly (exit code, stderr)."""
    folder = out / "single" / key.family / key.method / key.variant / key.protocol
    cmd = [*single_command(key, settings), f"hydra.run.dir={folder}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), check=False)
    summary = _summary(folder) if proc.returncode == 0 else None
    log = proc.stdout + _read(folder / "clse_exp.log")
    status, detail = classify_single(proc.returncode, proc.stderr, summary, log, key.method, settings,
                                     rounding_allowance(_records(folder)))
    return Outcome(status, detail, retention=_retention(summary), folder=str(folder))


def confirm_refusals(outcomes: dict[Key, Outcome], settings: Settings, out: Path, jobs: int, threads: int) -> int:
    """Rerun one refused point per distinct reason alone; a disagreement makes every point with that reason WRONG."""
    groups: dict[str, list[Key]] = {}
    for key, outcome in outcomes.items():
        if outcome.status == REFUSED:
            groups.setdefault(outcome.detail, []).append(key)
    firsts = [keys[0] for keys in groups.values()]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        singles = list(pool.map(lambda k: run_single(k, settings, out, threads), firsts))
    for first, single in zip(firsts, singles, strict=True):
        reason = outcomes[first].detail
        if single.status == REFUSED and single.detail == reason:
            continue
        for key in groups[reason]:
            outcomes[key] = Outcome(WRONG, f"refused in the sweep ({reason}) but alone: {single.status}, "
                                           f"{single.detail}", folder=outcomes[key].folder)
    return len(firsts)


def build(settings: Settings, out: Path, families: Sequence[str], methods: Sequence[str],
          variants: Sequence[str] = VARIANTS, protocols: Sequence[str] = PROTOCOLS, jobs: int = 2,
          single: bool = False, confirm: bool = True) -> dict[str, Any]:
    """Run every point and return the matrix (also what matrix.json holds)."""
    started = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    keys = [Key(m, f, v, p) for f in families for m in methods for v in variants for p in protocols]
    outcomes: dict[Key, Outcome] = {}
    if single:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            outcomes.update(zip(keys, pool.map(lambda k: run_single(k, settings, out, threads), keys), strict=True))
        confirmed = 0
    else:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            ends = dict(zip(families, pool.map(
                lambda f: run_sweep(f, methods, variants, protocols, settings, out, threads), families), strict=True))
        for family in families:
            outcomes.update(sweep_outcomes(out, family, settings))
        for key in keys:
            if key not in outcomes:
                code, last = ends[key.family]
                outcomes[key] = Outcome(WRONG, f"the {key.family} sweep (exit {code}) left no result for this "
                                               f"point; its last stderr line: {last[:300]}")
        confirmed = confirm_refusals(outcomes, settings, out, jobs, threads) if confirm else 0
    for key in keys:
        outcomes[key].command = shown_command(key, settings)
    counts = Counter(outcomes[k].status for k in keys)
    return {
        "settings": asdict(settings),
        "families": list(families), "methods": list(methods), "variants": list(variants),
        "protocols": list(protocols),
        "mode": "single" if single else "sweep",
        "refusals_confirmed_alone": confirmed,
        "seconds": round(time.perf_counter() - started, 1),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "points": [{**asdict(k), **asdict(outcomes[k])} for k in keys],
    }


# ---- rendering ----

def _cell(points: dict[tuple[str, str, str, str], str], method: str, family: str, variants: Sequence[str],
          protocols: Sequence[str]) -> str:
    return " ".join("".join(SYMBOLS[points[(method, family, v, p)]] for p in protocols) for v in variants)


def render_markdown(matrix: dict[str, Any]) -> str:
    """The table (and legend) the README carries: deterministic, no timings."""
    s = matrix["settings"]
    variants, protocols = matrix["variants"], matrix["protocols"]
    status = {(p["method"], p["family"], p["variant"], p["protocol"]): p["status"] for p in matrix["points"]}
    order = " ".join(VARIANT_LETTERS.get(v, v) for v in variants)
    head = ["method", *(f.removeprefix("tiny_") for f in matrix["families"])]
    lines = [
        f"Generated by `python -m clse_exp.support_matrix --write-readme` (keep={s['keep']}, "
        f"`dataset=synthetic dataset.limit={s['limit']} dataset.max_new_tokens={s['max_new_tokens']}`, "
        f"tiny models). Each cell: {order} ({', '.join(variants)}), "
        f"each as {' then '.join(protocols)} protocol. "
        f"{SYMBOLS[RUNS]} runs, retention within tolerance of `keep`; "
        f"{SYMBOLS[OFFICIAL]} runs, retention off `keep` and flagged `budget_unreachable` (an official count rule or "
        f"too few tokens); {SYMBOLS[REFUSED]} refused with one line before any weights load; "
        f"{SYMBOLS[WRONG]} WRONG (crash, unflagged retention drift, or a refusal that is not one line before "
        f"the weights; matrix.json says which).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for method in matrix["methods"]:
        cells = [_cell(status, method, f, variants, protocols) for f in matrix["families"]]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    counts = matrix["counts"]
    lines += ["", f"{sum(counts.values())} points: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + "."]
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str | None:
    """What the README holds between the support-matrix markers (None: no markers)."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        return None
    return text[start + len(MARK_START):end].strip("\n") + "\n"


def replace_readme_block(text: str, table: str) -> str:
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        raise SystemExit(f"clse_exp: error: README has no {MARK_START} ... {MARK_END} block")
    return text[:start + len(MARK_START)] + "\n" + table + text[end:]


def wrong_lines(matrix: dict[str, Any]) -> list[str]:
    return [f"WRONG {p['method']} x {p['family']} x {p['variant']} x {p['protocol']}: {p['detail']}\n  {p['command']}"
            for p in matrix["points"] if p["status"] == WRONG]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clse_exp.support_matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/support_matrix"), help="folder for runs and results")
    parser.add_argument("--keep", type=float, default=Settings.keep)
    parser.add_argument("--limit", type=int, default=Settings.limit, help="samples per point")
    parser.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    parser.add_argument("--atol", type=float, default=Settings.atol,
                        help="retention tolerance on top of half a token per grid")
    parser.add_argument("--jobs", type=int, default=2, help="sweeps (or single runs) at a time")
    parser.add_argument("--families", nargs="+", default=None, help="tiny model configs (default: every tiny_*)")
    parser.add_argument("--methods", nargs="+", default=None, help="methods (default: every one and none)")
    parser.add_argument("--single", action="store_true", help="one process per point (slow, the exact CLI contract)")
    parser.add_argument("--no-confirm", action="store_true", help="skip rerunning one refusal per reason alone")
    parser.add_argument("--write-readme", nargs="?", const=README, type=Path, default=None, metavar="README",
                        help="replace the README's support-matrix block with the table")
    args = parser.parse_args(argv)
    if args.write_readme is not None and (args.families or args.methods):
        print("clse_exp: error: --write-readme takes the whole matrix; drop --families/--methods", file=sys.stderr)
        return 2
    settings = Settings(args.keep, args.limit, args.max_new_tokens, args.atol)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()) and not (out / "matrix.json").exists():
        print(f"clse_exp: error: {out} is not empty and holds no matrix.json; give --out a new folder",
              file=sys.stderr)
        return 2
    if (out / "runs").exists() or (out / "single").exists():  # a fresh run for every point: no resumed results
        import shutil

        shutil.rmtree(out / "runs", ignore_errors=True)
        shutil.rmtree(out / "single", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    matrix = build(settings, out, args.families or tiny_families(), args.methods or all_methods(),
                   jobs=args.jobs, single=args.single, confirm=not args.no_confirm)
    table = render_markdown(matrix)
    (out / "matrix.json").write_text(json.dumps(matrix, indent=1) + "\n")
    (out / "matrix.md").write_text(table)
    if args.write_readme is not None:
        args.write_readme.write_text(replace_readme_block(args.write_readme.read_text(), table))
    wrong = wrong_lines(matrix)
    print("\n".join(wrong) if wrong else "", end="\n" if wrong else "")
    counts = matrix["counts"]
    print(f"support matrix: {', '.join(f'{counts[s]} {s}' for s in STATUSES)} in {matrix['seconds']} s; "
          f"{out / 'matrix.md'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
