"""The README tells the truth: every shell block says where it runs, the `cpu` ones run as written on the toy
and tiny models (each with `dataset.limit=1`), and the configs table lists every option of each group."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clse_exp.config import group_options

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKS = ("cpu", "cpu-long", "real", "cluster", "setup")  # the README's legend, above "## Toy model"
BLOCK = re.compile(r"^```bash(?:[ \t]+(\S+))?[ \t]*\n(.*?)^```", re.M | re.S)
TABLE_GROUPS = ("prune", "dataset", "logger", "experiment", "cluster")
SMALL = {"dataset.limit": "1", "eval.reference": "false"}  # a few seconds per run point


def shell_blocks() -> list[tuple[str | None, str]]:
    """(mark, body) of every ```bash block of the README."""
    return [(match.group(1), match.group(2)) for match in BLOCK.finditer(README.read_text())]


def commands(body: str) -> list[list[str]]:
    """The block's commands as argv lists: continuation lines joined, comments dropped, `&&` chains split."""
    joined = body.replace("\\\n", " ")
    out: list[list[str]] = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            out.append(argv[:cut])
            argv = argv[cut + 1:]
    return [argv for argv in out if argv]


def table_row(group: str) -> str:
    (row,) = [line for line in README.read_text().splitlines() if line.startswith(f"| `{group}` |")]
    return row


def test_every_shell_block_says_where_it_runs() -> None:
    blocks = shell_blocks()
    assert blocks
    unmarked = [body.splitlines()[0] for mark, body in blocks if mark not in MARKS]
    assert not unmarked, f"README blocks without one of the marks {MARKS}: {unmarked}"
    assert any(mark == "cpu" for mark, _ in blocks)


@pytest.mark.parametrize("group", TABLE_GROUPS)
def test_configs_table_lists_every_option(group: str) -> None:
    options = re.split(r"(?<!\\)\|", table_row(group))[2]  # a `\|` inside a cell is not a column
    listed = {token for token in re.findall(r"`([^`]+)`", options) if re.fullmatch(r"\w+", token)}
    assert listed == set(group_options(group))


def test_every_model_config_is_named_in_the_readme() -> None:
    text = README.read_text()
    assert not [name for name in group_options("model") if f"`{name}`" not in text]


def _small(argv: list[str], out: Path, sweep: bool) -> list[str]:
    """`argv` with the small-run overrides it does not set itself, and its output folder under `out`."""
    given = {arg.split("=", 1)[0] for arg in argv if "=" in arg}
    extra = [f"{key}={value}" for key, value in SMALL.items() if key not in given]
    return [*argv, *extra, f"hydra.{'sweep' if sweep else 'run'}.dir={out}"]


@pytest.mark.slow
def test_readme_cpu_commands_run_as_written(tmp_path: Path) -> None:
    runs = [argv for mark, body in shell_blocks() if mark == "cpu" for argv in commands(body)]
    assert runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    last_sweep: Path | None = None
    started = time.monotonic()
    for index, argv in enumerate(runs):
        assert argv[:2] == ["python", "-m"], f"a cpu block runs python modules only: {argv}"
        module, args = argv[2], argv[3:]
        out = tmp_path / f"cmd{index}"
        if module == "clse_exp":
            sweep = "-m" in args
            args = _small(args, out, sweep)
            last_sweep = out if sweep else last_sweep
        elif module == "clse_exp.report":
            assert last_sweep is not None, "the README reports a sweep it has not run yet"
            args = [str(last_sweep) if arg.startswith("outputs/multirun/") else arg for arg in args]
        else:
            pytest.fail(f"no small-run rule for `python -m {module}`: mark its block cpu-long or add one here")
        begun = time.monotonic()
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stderr[-3000:]}"
        print(f"{time.monotonic() - begun:5.1f} s  {shlex.join(argv)}")
    print(f"{len(runs)} README commands in {time.monotonic() - started:.0f} s")
