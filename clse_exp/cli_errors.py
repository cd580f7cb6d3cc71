"""One line and exit 2 for a config our Hydra entry points cannot compose.

Hydra reports a bad group option (`model=nonexistent`), a key that does not exist (`kep=0.1`), a value of the
wrong type (`keep=abc`) or an override it cannot parse in 5-24 lines with exit code 1; a launcher that
cannot start (`hydra/launcher=slurm` without a controller) raises ConfigError inside Hydra and shows a
traceback. `install()` wraps Hydra's reporter so these become `<prog>: error: <one line>` naming the bad
value and the valid choices, exit 2, like every other refused config here. It acts only while one of our
own modules is the program (`python -m clse_exp`, `clse_exp.bench`, `clse_exp.toy.train`), so another Hydra
app that imports clse_exp keeps Hydra's own report; HYDRA_FULL_ERROR=1 still raises with the full traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Callable
from typing import Any

from clse_exp.errors import ConfigError

_MARK = "_clse_exp_one_line"


def program() -> str | None:
    """The running program's module name when it is one of ours (`clse_exp`, `clse_exp.bench`), else None."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    if name != "clse_exp.__main__" and not name.startswith("clse_exp."):
        return None
    return name.removesuffix(".__main__")


def _first_line(text: Any) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _keys_of(cause: Any) -> list[str]:
    """The keys a struct config node accepts: its dataclass fields, else the parent node's keys."""
    object_type = getattr(cause, "object_type", None)
    if object_type is not None and dataclasses.is_dataclass(object_type):
        return [f.name for f in dataclasses.fields(object_type)]
    parent = getattr(cause, "parent_node", None)
    try:
        return [str(key) for key in parent.keys()] if parent is not None else []
    except Exception:  # a node that cannot list its keys: say nothing rather than something wrong
        return []


def one_line(err: BaseException) -> str | None:
    """The one-line message for a composition or launcher error, or None for an error this does not know."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(err, ConfigError):
        return " ".join(str(err).split())
    if isinstance(err, HydraException) and isinstance(err.__cause__, ConfigError):  # e.g. raised by a launcher's init
        return " ".join(str(err.__cause__).split())
    if isinstance(err, MissingConfigException):
        missing = err.missing_cfg_file or ""
        if "/" in missing and err.options:
            group, value = missing.rsplit("/", 1)
            return f"{group}={value!r} is not valid; choose one of: {', '.join(err.options)}"
        return _first_line(err)
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {_first_line(err.message)}"
    if isinstance(err, ConfigCompositionException):
        cause = err.__cause__
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and getattr(cause, "full_key", None):
            key = str(cause.full_key)
            name = key.rsplit(".", 1)[-1]
            valid = _keys_of(cause)
            parent = key.rsplit(".", 1)[0] if "." in key else "the run config"
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {key[: len(key) - len(name)]}{close[0]}?)" if close else ""
            listed = f"; keys of {parent}: {', '.join(valid)}" if valid else ""
            return f"{key} is not a config key{hint}{listed}"
        if isinstance(cause, OmegaConfBaseException):
            where = getattr(cause, "full_key", None)
            message = getattr(cause, "msg", None) or _first_line(cause)
            return f"{where}: {_first_line(message)}" if where else f"{_first_line(err)}: {_first_line(message)}"
        return _first_line(err)
    return None


def _reporting(func: Callable[[], Any], prog: str) -> Any:
    """Run `func`; an error `one_line` knows ends the program with that line and exit 2."""
    try:
        return func()
    except Exception as err:
        line = one_line(err)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        sys.exit(2)


def install() -> None:
    """Wrap Hydra's error reporter (idempotent); it acts only while one of our modules is the program."""
    from hydra._internal import utils as hydra_utils

    original = hydra_utils.run_and_report
    if getattr(original, _MARK, False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        prog = program()
        if prog is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return original(func)
        return original(lambda: _reporting(func, prog))

    setattr(run_and_report, _MARK, True)
    hydra_utils.run_and_report = run_and_report
