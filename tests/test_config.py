"""The config tree composes, and bad input ends the run with one line naming the value and the choices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clse_exp.api import compose_config
from clse_exp.config import group_options

GROUPS = ("model", "prune", "layers", "dataset", "logger")


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    for option in group_options(group):
        cfg = compose_config([f"{group}={option}"])
        assert cfg[group].name == option
        # Every interpolation resolves (layers read the model's paper layers).
        assert cfg.layers.prune_layers is not None and cfg.dataset.split in cfg.dataset.splits


def test_methods_pick_their_default_layers_and_users_can_override():
    assert list(compose_config(["prune=fastv"]).layers.prune_layers) == [2]
    assert list(compose_config(["prune=divprune"]).layers.prune_layers) == [0]
    assert list(compose_config(["prune=clse", "model=qwen2vl"]).layers.prune_layers) == [1, 10, 19]
    assert list(compose_config(["prune=clse", "model=llava15"]).layers.prune_layers) == [1, 11, 21]
    single = compose_config(["prune=fastv", "layers=single", "layers.prune_layers=[5]", "model=tiny_qwen2vl"])
    assert list(single.layers.prune_layers) == [5]


def run_cli(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI on the 28-layer tiny model unless a test names a model (the messages quote its depth)."""
    model = [] if any(o.startswith("model=") for o in overrides) else ["model=tiny_qwen2vl"]
    return subprocess.run([sys.executable, "-m", "clse_exp", *overrides, *model], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


BAD_INPUTS = [
    (("prune=fastvv",), ("fastvv", "clse")),
    (("model=qwen9",), ("qwen9", "tiny_qwen2vl")),
    (("keep=1.5",), ("keep=1.5", "(0, 1]")),
    (("keep=0",), ("keep=0", "(0, 1]")),
    (("keep=abc",), ("abc", "keep")),
    (("batch_size=0",), ("batch_size=0", ">= 1")),
    (("dataset.limit=-2",), ("dataset.limit=-2", ">= 0")),
    (("dataset.split=dev",), ("dev", "train, validation, test")),
    (("prune=clse", "layers=single", "layers.prune_layers=[40]"), ("40", "0..27")),
    (("prune=clse", "layers=single", "layers.reference_layer=5", "layers.prune_layers=[2]"),
     ("reference_layer=5", "prune layer 2")),
    (("model=qwen2vl", "model.path=/no/such/model"), ("/no/such/model", "hub id")),
    (("budget=mean",), ("budget='mean'", "average, final")),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(overrides, expected, tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", "dataset.limit=1", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, result.stderr


def test_full_error_shows_the_traceback(tmp_path):
    result = run_cli("keep=1.5", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_lists_groups_and_options():
    result = run_cli("--help")
    for text in ("prune: ", "clse", "fastv", "model: ", "tiny_qwen2vl", "layers: "):
        assert text in result.stdout
