"""Every experiment preset runs as a sweep, ends with an honest exit code, and the report reads it."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from clse_exp.config import CONF_DIR, group_options

# Points per preset, with the unpruned model as one (keep- and layer-independent) point where it fits the sweep.
EXPECTED_POINTS = {"keep_sweep": 21, "ablate_bands": 12, "ablate_layer_pairs": 12, "paper_qwen2vl": 6}
# keep_sweep on the 4-layer toy model (cheap; several budgets unreachable there), the others on the 28-layer tiny
# model (ablate_bands' keep=0.25 and the paper's layers need real depth).
MODEL = {"keep_sweep": "toy_qwen2vl"}


def sweep_params(preset: str) -> dict[str, list[str]]:
    text = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text()
    params = yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    return {key: str(values).split(",") for key, values in params.items()}


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_preset_sweeps_the_expected_points_with_the_unpruned_baseline(preset):
    params = sweep_params(preset)
    assert math.prod(len(values) for values in params.values()) == EXPECTED_POINTS[preset]
    # prune=none is a point wherever the swept keys exist for it (prune.* knobs do not: the report says how).
    assert ("none" in params.get("prune", [])) == (not any(k.startswith("prune.") for k in params))


@pytest.mark.slow
@pytest.mark.parametrize("preset", group_options("experiment"))
def test_preset_runs_as_a_sweep(preset, tmp_path):
    model = MODEL.get(preset, "tiny_qwen2vl")
    args = [sys.executable, "-m", "clse_exp", "-m", f"+experiment={preset}", f"model={model}", "dataset.limit=1",
            "eval.reference=false", f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    done = len(list(tmp_path.rglob("summary.json")))
    failed = len(list(tmp_path.rglob("error.txt")))
    shared = len(list(tmp_path.rglob("same_as.txt")))
    assert done + failed + shared == EXPECTED_POINTS[preset] and done > 0, result.stderr
    assert not list(tmp_path.rglob("crash.txt")), result.stderr
    if failed:  # budgets the model's layers cannot reach: listed, non-zero exit, the other points kept
        assert result.returncode == 1, result.stderr
        assert f"clse_exp: error: {failed} of {EXPECTED_POINTS[preset]} sweep points could not run" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
    report = subprocess.run([sys.executable, "-m", "clse_exp.report", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert report.stdout.startswith(f"{done} runs, {failed} point")
    markdown = (tmp_path / "report.md").read_text()
    if "none" in sweep_params(preset).get("prune", []):
        assert "| none " in markdown and "No unpruned run" not in markdown
    else:
        assert "python -m clse_exp -m prune=none" in markdown
