"""The config tree composes, and bad input ends the run with one line naming the value and the choices,
before any weights load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import slow_except

from clse_exp import models
from clse_exp.api import compose_config
from clse_exp.config import group_options, validate_run
from clse_exp.data import load_samples
from clse_exp.errors import ConfigError

GROUPS = ("model", "prune", "dataset", "logger")


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    for option in group_options(group):
        cfg = compose_config([f"{group}={option}"])
        assert cfg[group].name == option
        assert cfg.dataset.split in cfg.dataset.splits


@pytest.mark.parametrize(("overrides", "reference", "layers"), [
    (["prune=clse", "model=tiny_qwen2vl"], 0, (1, 10, 19)),
    (["prune=clse", "model=tiny_llava"], 0, (1, 11, 21)),
    (["prune=clse", "model=tiny_video_llava"], 2, (3,)),
    (["prune=clse", "model=toy_qwen2vl"], 0, (1,)),
    (["prune=fastv", "model=tiny_qwen2vl"], 0, (2,)),
    (["prune=pdrop", "model=tiny_llava"], 0, (8, 16, 24)),
    (["prune=divprune", "model=tiny_qwen2vl"], 0, (0,)),
    (["prune=fastv", "model=tiny_qwen2vl", "layers.prune_layers=[5]"], 0, (5,)),
])
def test_methods_own_their_layers_and_users_can_override(overrides, reference, layers):
    pruner = validate_run(compose_config([*overrides, "keep=0.4"]))
    assert (pruner.layers.reference_layer, pruner.layers.prune_layers) == (reference, layers)


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["keep=1.5"], ["keep=1.5", "(0, 1]"]),
    (["keep=0"], ["keep=0", "(0, 1]"]),
    (["budget=mean"], ["budget='mean'", "average, final"]),
    (["protocol=paper"], ["protocol='paper'", "official, uniform"]),
    (["batch_size=0"], ["batch_size=0", ">= 1"]),
    (["dataset.limit=-2"], ["dataset.limit=-2", ">= 0"]),
    (["dataset.split=dev"], ["dev", "train, validation, test"]),
    (["dataset.size=0"], ["dataset.size=0", ">= 1"]),
    (["dataset.size=-5"], ["dataset.size=-5", ">= 1"]),
    (["dataset.qtypes=[]"], ["dataset.qtypes=[]", "colour"]),
    (["dataset.qtypes=[hue]"], ["'hue'", "colour"]),
    (["dataset.max_new_tokens=0"], ["dataset.max_new_tokens=0", ">= 1"]),
    (["device=cuda"], ["device=cuda", "no CUDA device"]),
    (["device=mps"], ["device=mps"]),
    (["device=tpu"], ["device='tpu'", "auto, cpu, cuda"]),
    (["model.attn_implementation=flash_attention_2"], ["flash_attention_2"]),
    (["model.dtype=int8"], ["model.dtype='int8'", "bfloat16"]),
    (["model=tiny_qwen2vl", "prune.shape=[1,2]"], ["prune.shape=[1.0, 2.0]", "non-increasing"]),
    (["model=tiny_qwen2vl", "prune.shape=[0.1,0.5,1.0]"], ["prune.shape", "non-increasing"]),
    (["model=tiny_qwen2vl", "prune=pdrop", "prune.shape=[-1,0.5,0.2]"], ["prune.shape", "positive"]),
    (["model=tiny_qwen2vl", "prune.shape=[1.0,0.5]"], ["prune.shape", "3 prune layers"]),
    (["model=tiny_qwen2vl", "prune=fastv", "layers.prune_layers=[]"], ["prune_layers=[]", "prunes nothing"]),
    (["model=tiny_qwen2vl", "layers.prune_layers=[40]"], ["40", "0..27"]),
    (["model=tiny_qwen2vl", "layers.reference_layer=5", "layers.prune_layers=[2]"],
     ["reference_layer=5", "first prune layer 2"]),
    (["model=tiny_qwen2vl", "prune=pdrop", "keep=0.1"], ["keep=0.1", "0.250000", "[7, 14, 21]"]),
    (["prune=clse", "keep=0.2"], ["keep=0.2", "0.250000"]),  # the toy: one cut at layer 1 of 4
    (["model=tiny_qwen2vl", "prune=fastv", "schedule=paper"], ["schedule=paper", "prune=fastv"]),
    (["model=tiny_qwen2vl", "prune=clse", "budget=final", "keep=0.3"], ["budget=final", "protocol=uniform"]),
    (["prune.score_type=spectral"], ["prune.score_type='spectral'", "clse_attn"]),
    (["prune.filter=notch"], ["prune.filter='notch'", "gaussian_highpass"]),
    (["prune.kv_policy=drop"], ["prune.kv_policy='drop'", "ragged, crop"]),
    (["prune.temperature=0"], ["prune.temperature=0", "> 0"]),
    (["dataset=mme", "dataset.path=/no/such/mme"], ["dataset.path='/no/such/mme'", "does not exist"]),
    (["dataset=videomme"], ["dataset.video_root is null", "dataset=videomme", "<videoID>.mp4"]),
    (["dataset=mvbench", "dataset.num_frames=0"], ["dataset.num_frames=0", ">= 1"]),
    (["dataset=egoschema_subset", "dataset.video_root=/no/such/videos"], ["dataset.video_root='/no/such/videos'",
                                                                         "not a directory"]),
    (["model=qwen2vl", "model.path=/no/such/model"], ["/no/such/model", "hub id"]),
])
def test_bad_values_fail_before_any_weights_load(overrides, fragments, monkeypatch):
    def no_weights(*_, **__):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "load", no_weights)
    with pytest.raises(ConfigError) as err:
        validate_run(compose_config(overrides))
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_hub_model_that_is_not_cached_fails_fast_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: the variable alone comes too late
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="model.path='Qwen/Qwen2-VL-7B-Instruct' is not in the local Hugging Face "
                                          "cache .* and HF_HUB_OFFLINE is set; download it"):
        validate_run(compose_config(["model=qwen2vl"]))


def test_a_hub_dataset_that_is_not_cached_fails_with_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_samples(compose_config(["dataset=pope"]).dataset)
    message = str(err.value)
    assert "\n" not in message and "'lmms-lab/POPE'" in message and "dataset.path=" in message, message


def test_typed_knobs_reject_wrong_types_and_unknown_keys():
    with pytest.raises(ConfigError, match="cutoff_ratio"):
        compose_config(["prune.cutoff_ratio=abc"])
    with pytest.raises(ConfigError, match="prune.cutof_ratio"):
        compose_config(["prune.cutof_ratio=0.2"])


def run_cli(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI on the 28-layer tiny model unless a test names a model (the messages quote its depth)."""
    model = [] if any(o.startswith("model=") for o in overrides) else ["model=tiny_qwen2vl"]
    return subprocess.run([sys.executable, "-m", "clse_exp", *overrides, *model], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


CLI_CASES = [
    (("prune=fastvv",), ("fastvv", "clse")),
    (("model=qwen9",), ("qwen9", "tiny_qwen2vl")),
    (("keep=abc",), ("abc", "keep")),
    (("prune.shape=[1,2]",), ("prune.shape=[1.0, 2.0]",)),
    (("dataset.size=0",), ("dataset.size=0",)),
]


@pytest.mark.parametrize(("overrides", "expected"), slow_except(CLI_CASES, [CLI_CASES[2]]),
                         ids=[" ".join(o) for o, _ in CLI_CASES])
def test_bad_input_is_one_clear_line_from_the_cli(overrides, expected, tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", "dataset.limit=1", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert not (tmp_path / "predictions.jsonl").exists()


@pytest.mark.slow
def test_full_error_shows_the_traceback(tmp_path):
    result = run_cli("keep=1.5", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_lists_groups_and_options():
    result = run_cli("--help")
    for text in ("prune: ", "clse", "fastv", "model: ", "tiny_qwen2vl", "protocol: official"):
        assert text in result.stdout
