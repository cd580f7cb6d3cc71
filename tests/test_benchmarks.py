"""Every benchmark config runs end to end on the tiny model from a fixture in the real HF layout."""

from __future__ import annotations

import json

import pytest
from benchmark_fixtures import write_benchmark

from clse_exp.api import compose_config
from clse_exp.config import group_options
from clse_exp.runner import run

BENCHMARKS = [name for name in group_options("dataset") if name != "synthetic"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_from_a_local_copy(name, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # no stale cache across tests
    data = tmp_path / "data"
    extra = write_benchmark(name, data)
    overrides = [f"dataset={name}", f"dataset.path={data}", "dataset.max_new_tokens=3", "eval.reference=false",
                 "batch_size=2", *(f"dataset.{k}={v}" for k, v in extra.items())]
    if name in ("videomme", "mvbench"):
        overrides.append("dataset.num_frames=4")
    summary = run(compose_config(overrides), tmp_path / "run")
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["n_samples"] == summary["n_samples"] >= 2
    assert summary["skipped"]["count"] == 1 and summary["skipped"]["samples"][0]["reason"]
    assert summary["metrics"], "the task's scorer produced no metrics"


def test_seeded_subsample_is_stable_and_in_order():
    from clse_exp.data.hf import subsample

    first = subsample(100, 10, seed=3)
    assert first == subsample(100, 10, seed=3) == sorted(first) and len(set(first)) == 10
    assert subsample(100, 10, seed=4) != first and subsample(5, 10, seed=0) == list(range(5))
    assert set(first) <= set(subsample(100, 30, seed=3))  # nested: a larger limit extends the run
