"""The runner's guards, in process: family layouts from the adapter, inputs a family cannot take refused
before any weights load, retention over the samples that have visual tokens, and a refused run's folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from helpers import noise_image, samples

from clse_exp import models
from clse_exp.api import compose_config
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.lmms.__main__ import summary_for
from clse_exp.pruning.build import build_pruner
from clse_exp.runner import IDENTITY_FILE, answer_batch, run, summarize


def _no_weights(*_args, **_kwargs):
    raise AssertionError("weights were loaded")


def test_llava_onevision_batch_is_laid_out_from_its_own_processor_outputs():
    """The runner names no family's keys: LLaVA-OneVision's layout needs image_sizes and batch_num_images."""
    cfg = compose_config(["model=tiny_llava_onevision", "prune=clse", "keep=0.5", "eval.reference=false"])
    loaded = models.load(cfg.model, "cpu")
    records = answer_batch(loaded, samples(2), 2, build_pruner(cfg, loaded), False, "synthetic")
    assert len(records) == 2
    assert all(r["n_visual"] > 0 and len(r["kept"]) < r["n_visual"] for r in records)
    inputs = loaded.prepare(samples(2))
    assert [sum(s.length for s in segments) for segments in loaded.layout(inputs)] == [r["n_visual"] for r in records]


@pytest.mark.parametrize("model", ["tiny_llava15", "tiny_llava"])
def test_video_for_an_image_only_family_is_refused_before_weights_load(model, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load", _no_weights)
    cfg = compose_config([f"model={model}", "prune=clse", "keep=0.333", "dataset.variant=video", "dataset.limit=2",
                          "logger=none"])
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"model {model} (family llava) takes image input only" in message
    assert "2 of 2 samples carry a video" in message and "video_llava" in message and "qwen2_vl" in message
    assert not (tmp_path / IDENTITY_FILE).exists()  # a refused run claims no folder


def test_a_visual_input_the_processor_drops_is_never_answered(tiny_llava):
    """Past the up-front check (e.g. a direct API call), LLaVA-1.5's processor would drop a video and the model
    answer from the text: the batch is refused instead of passing for a pruned sample."""
    frames = [noise_image(i, 112) for i in range(4)]
    with pytest.raises(ValueError, match="the llava processor dropped its video"):
        tiny_llava.prepare([Sample("v0", "What is moving?", "", [], frames)])


def test_a_run_refused_after_claiming_its_folder_leaves_it_free(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise ConfigError("model.path='x' is not reachable")

    monkeypatch.setattr(models, "load", refuse)
    overrides = ["model=tiny_qwen2vl", "dataset.limit=1", "logger=none"]
    with pytest.raises(ConfigError):
        run(compose_config(overrides), tmp_path)
    assert not (tmp_path / IDENTITY_FILE).exists()
    # a folder that holds saved samples of this run stays claimed: its resume must still refuse other configs
    (tmp_path / IDENTITY_FILE).write_text(json.dumps({"hash": "x", "config": {}}))
    (tmp_path / "predictions.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ConfigError, match="holds another run's results"):
        run(compose_config(overrides), tmp_path)
    assert (tmp_path / IDENTITY_FILE).exists()


def test_retention_is_averaged_over_samples_with_visual_tokens():
    cfg = compose_config(["model=tiny_qwen2vl", "prune=clse", "keep=0.5", "eval.reference=false"])
    loaded = models.load(cfg.model, "cpu")
    batch = [*samples(2, (1,)), Sample("t0", "Is water wet? Answer with one word.", "yes")]
    records = answer_batch(loaded, batch, 2, build_pruner(cfg, loaded), False, "synthetic")
    summary = summarize(cfg, records, "synthetic", {}, {})["retention"]
    with_images = [r["retention"]["average"] for r in records[:2]]
    assert records[2]["n_visual"] == 0
    assert summary["average"] == pytest.approx(sum(with_images) / 2)
    assert summary["text_only_samples"] == 1
    assert summary["visual_tokens_in"] == (records[0]["n_visual"] + records[1]["n_visual"]) / 2


def test_lmms_summary_counts_text_only_docs_apart_and_each_doc_once():
    """lmms-eval's toy task with 2 of 8 docs text-only and every image kept at 0.5 reported 0.625; a
    multiple-choice doc writes one line per choice, all one pruned prompt."""
    image = {"n_visual": 64, "retention": {"average": 0.5, "final": 0.25}, "kept": list(range(32)),
             "grids": [[1, 8, 8]]}
    text = {"n_visual": 0, "retention": {"average": 1.0, "final": 1.0}, "kept": [], "grids": []}
    records = [{"id": f"test/{i}", **(text if i < 2 else image)} for i in range(8)]
    records += [{**records[3], "continuation": "blue"}]  # a second choice of doc 3
    cfg = compose_config(["model=tiny_qwen2vl", "prune=clse", "device=cpu"])
    results = {"results": {"toy": {"accuracy,none": 0.5}}}
    args = argparse.Namespace(include_path=None, limit=None)
    summary = summary_for("toy", records, results, cfg, args, Path("results.json"))
    assert summary["retention"]["average"] == 0.5 and summary["retention"]["text_only_samples"] == 2
    assert (summary["n_samples"], summary["n_requests"]) == (8, 9)
