"""`python -m clse_exp` end to end on the tiny model: files, every method, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import VIDEO_METHODS

from clse_exp.config import group_options


def cli(*overrides: str, model: str = "tiny_qwen2vl") -> list[str]:
    """The CLI on the 28-layer tiny model by default (keep=0.1 averaged over layers needs the real depth)."""
    return [sys.executable, "-m", "clse_exp", *overrides, f"model={model}"]


def read_predictions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_default_run_writes_predictions_and_summary(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clse_exp", f"hydra.run.dir={tmp_path}", "dataset.limit=6"],
                            capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_samples"] == 6
    assert {"accuracy", "agreement", "first_token_kl"} <= set(summary["metrics"])
    assert summary["environment"]["versions"]["torch"]
    efficiency = summary["efficiency"]
    assert 0 < efficiency["flops_ratio"] < 1 and 0 < efficiency["kv_ratio"] < 1
    assert efficiency["mean_batch_kv_bytes_measured"] > 0 and efficiency["mean_batch_prefill_s"] > 0
    assert summary["config"]["model"]["name"] == "toy_qwen2vl"
    records = read_predictions(tmp_path)
    assert [r["id"] for r in records] == [f"synthetic-test-{i:05d}" for i in range(6)]
    assert "accuracy" in result.stdout  # the results table


@pytest.mark.slow
def test_every_method_runs_from_the_cli(tmp_path):
    # LLaVA-1.5's family: every image method supports it (the CLIP-reading ones support only it); the video
    # methods all run on LLaVA-OneVision clips
    image = [name for name in group_options("prune") if name not in VIDEO_METHODS]
    sweeps = [(image, "tiny_llava", ()), (list(VIDEO_METHODS), "tiny_llava_onevision", ("dataset.variant=video",))]
    for methods, model, extra in sweeps:
        result = subprocess.run(cli("-m", f"prune={','.join(methods)}", "keep=0.3", "protocol=uniform",
                                    "dataset.limit=3", *extra, f"hydra.sweep.dir={tmp_path / model}",
                                    "hydra.sweep.subdir=${prune.name}", model=model),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    for method in group_options("prune"):
        folder = tmp_path / ("tiny_llava_onevision" if method in VIDEO_METHODS else "tiny_llava") / method
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["n_samples"] == 3
        if method != "none":
            assert abs(summary["retention"]["average"] - 0.3) < 0.02
            record = read_predictions(folder)[0]
            assert len(record["kept"]) < record["n_visual"]


@pytest.mark.slow
def test_clse_and_fastv_reach_keep_0_1(tmp_path):
    result = subprocess.run(cli("-m", "prune=clse,fastv", "keep=0.1", "protocol=uniform", "dataset.limit=2",
                                f"hydra.sweep.dir={tmp_path}",
                                "hydra.sweep.subdir=${prune.name}"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for method in ("clse", "fastv"):
        assert abs(json.loads((tmp_path / method / "summary.json").read_text())["retention"]["average"] - 0.1) < 0.01


@pytest.mark.slow  # a subprocess run; the default suite keeps the Ctrl-C and same-config resume tests
def test_sigkilled_run_resumes_with_every_sample_once(tmp_path):
    args = cli(f"hydra.run.dir={tmp_path}", "dataset.limit=16", "batch_size=1", "prune=clse", "keep=0.2")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = tmp_path / "predictions.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if predictions.exists() and len(predictions.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(read_predictions(tmp_path))
    assert 3 <= done_before < 16
    with predictions.open("a") as f:  # a write torn by the kill
        f.write('{"id": "synthetic-test-000')
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ids = [r["id"] for r in read_predictions(tmp_path)]
    assert sorted(ids) == [f"synthetic-test-{i:05d}" for i in range(16)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_samples"] == 16 and summary["timings"]["resumed_from"] == done_before


def test_same_config_resumes_in_its_content_addressed_folder(tmp_path):
    first = subprocess.run(cli("dataset.limit=2"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    second = subprocess.run(cli("dataset.limit=3", "batch_size=1"), capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert first.returncode == second.returncode == 0, second.stderr
    summaries = list((tmp_path / "outputs" / "runs").rglob("summary.json"))
    assert len(summaries) == 1  # batch size and limit do not change the folder
    summary = json.loads(summaries[0].read_text())
    assert summary["n_samples"] == 3 and summary["timings"]["resumed_from"] == 2


def test_a_folder_refuses_to_resume_another_run(tmp_path):
    """Resuming checks the folder's run identity (its config hash) and names the keys that differ."""
    from clse_exp.api import compose_config
    from clse_exp.errors import ConfigError
    from clse_exp.runner import run

    first = run(compose_config(["keep=0.6", "dataset.limit=2", "eval.reference=true"]), tmp_path)
    assert first["config"]["prune"]["name"] == "clse"
    with pytest.raises(ConfigError, match=r"holds another run's results \(prune.name: 'clse' there, 'random' now"):
        run(compose_config(["keep=0.6", "prune=random", "dataset.limit=2", "eval.reference=true"]), tmp_path)
    with pytest.raises(ConfigError, match="eval.reference: True there, False now"):
        run(compose_config(["keep=0.6", "dataset.limit=2", "eval.reference=false"]), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["prune"]["name"] == "clse"
    (tmp_path / "run.json").unlink()
    with pytest.raises(ConfigError, match="unknown run"):
        run(compose_config(["keep=0.6", "dataset.limit=2"]), tmp_path)


TINY_FAMILIES = ("tiny_qwen2vl", "tiny_qwen2_5vl", "tiny_qwen3vl", "tiny_llava", "tiny_llava15", "tiny_video_llava",
                 "tiny_internvl", "tiny_llava_onevision")


@pytest.mark.slow  # one sweep of every tiny family (~10 s)
def test_every_tiny_family_runs_pruned_from_the_cli(tmp_path):
    """Each family's own processor outputs reach its layout (LLaVA-OneVision's image_sizes crashed the runner)."""
    result = subprocess.run(cli("-m", "prune=clse", "keep=0.5", "dataset.limit=2", f"hydra.sweep.dir={tmp_path}",
                                "hydra.sweep.subdir=${model.name}", model=",".join(TINY_FAMILIES)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for model in TINY_FAMILIES:
        summary = json.loads((tmp_path / model / "summary.json").read_text())
        retention = summary["retention"]
        assert summary["n_samples"] == 2 and retention["text_only_samples"] == 0, model
        assert retention["visual_tokens_in"] > 0 and abs(retention["average"] - 0.5) < 0.05, model


@pytest.mark.slow  # a fresh interpreter (~4 s) for what tests/test_runner.py checks in process
def test_a_video_for_an_image_only_family_is_one_error_line_and_claims_no_folder(tmp_path):
    result = subprocess.run(cli("prune=clse", "keep=0.333", "dataset.variant=video", f"hydra.run.dir={tmp_path}",
                                model="tiny_llava15"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clse_exp: error: model tiny_llava15 (family llava) takes image "
                                                   "input only, but 48 of 48 samples carry a video")
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "predictions.jsonl").exists()
