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
    if name in ("videomme", "mvbench", "egoschema_subset", "longvideobench_val_v"):
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


NEW_VIDEO = ["egoschema_subset", "longvideobench_val_v"]


def test_egoschema_prompt_is_lmms_evals():
    """lmms-eval@75571cfe0fa3:lmms_eval/tasks/egoschema/utils.py:52-58: the question, each option on its own line
    as given, and the post prompt of utils.py:56 (= egoschema_subset.yaml:17)."""
    from clse_exp.data.prompts import PROMPTS

    doc = {"question": "What is c doing overall?", "option": ["A. cooks", "B. cleans", "C. reads", "D. paints",
                                                               "E. sleeps"]}
    assert PROMPTS["egoschema"](doc) == ("What is c doing overall?\nA. cooks\nB. cleans\nC. reads\nD. paints\n"
                                         "E. sleeps\nAnswer with the option's letter from the given choices directly.")


def test_longvideobench_prompt_is_lmms_evals():
    """lmms-eval@75571cfe0fa3:lmms_eval/tasks/longvideobench/utils.py:130-137, 152 and longvideobench_val_v.yaml:27:
    "N/A" options are skipped (the letters close up), "X. text" lines, the post prompt ends in a newline."""
    from clse_exp.data.prompts import PROMPTS

    doc = {"question": "What appears first?", "option0": "a cat", "option1": "a dog", "option2": "N/A",
           "option3": "a fish", "option4": "N/A"}
    assert PROMPTS["longvideobench"](doc) == ("What appears first?\nA. a cat\nB. a dog\nC. a fish\n"
                                              "Answer with the option's letter from the given choices directly.\n")


def _fastvid_overrides(name: str, data) -> list[str]:
    extra = write_benchmark(name, data)
    return [f"dataset={name}", "model=tiny_llava_onevision", "prune=fastvid", "keep=0.25", "dataset.limit=2",
            f"dataset.path={data}", "dataset.num_frames=4", *(f"dataset.{k}={v}" for k, v in extra.items())]


@pytest.mark.parametrize("name", NEW_VIDEO)
def test_new_video_benchmarks_run_with_fastvid_on_llava_onevision(name, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    summary = run(compose_config(_fastvid_overrides(name, tmp_path / "data")), tmp_path / "run")
    assert summary["n_samples"] + summary["skipped"]["count"] == 2 and summary["n_samples"] >= 1
    headline = {"egoschema_subset": "score", "longvideobench_val_v": "lvb_acc"}[name]
    assert 0.0 <= summary["metrics"][headline] <= 1.0
    assert summary["config"]["prune"]["name"] == "fastvid" and summary["efficiency"]["kv_ratio"] < 1  # it pruned
    record = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    assert record["question"].count("\n") >= 4 and "option's letter" in record["question"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_VIDEO)
def test_new_video_benchmarks_run_from_the_cli(name, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "clse_exp", *_fastvid_overrides(name, tmp_path / "data"),
               f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_samples"] + summary["skipped"]["count"] == 2 and summary["metrics"]
