"""A new user's mistakes are one line naming the bad value and the valid choices (exit 2), never a traceback,
and never a 20-30 s wait on an unreachable hub (issue 22, the tools)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from clse_exp import load_model
from clse_exp.cli_errors import one_line
from clse_exp.config import CONF_DIR, group_options, register_schemas
from clse_exp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def _compose_error(config: str, overrides: list[str]) -> BaseException:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(Exception) as caught:
            compose(config_name=config, overrides=overrides)
    GlobalHydra.instance().clear()
    return caught.value


@pytest.mark.parametrize(("overrides", "line"), [
    (["model=nonexistent"], f"model='nonexistent' is not valid; choose one of: {', '.join(group_options('model'))}"),
    (["prune=nonexistent"], "prune='nonexistent' is not valid; choose one of: cdpruner, clse, dart,"),
    (["kep=0.1"], "kep is not a config key (did you mean keep?); keys of the run config: keep, budget,"),
    (["prune.cutof_ratio=0.2"], "prune.cutof_ratio is not a config key (did you mean prune.cutoff_ratio?); keys of "
                                "prune: name,"),
    (["keep=abc"], "keep: Value 'abc' of type 'str' could not be converted to Float"),
    (["+experiment=nope"], "experiment='nope' is not valid; choose one of: ablate_bands,"),
    (["keep=["], "cannot parse the override 'keep=['"),
])
def test_composition_errors_are_one_line_naming_the_value_and_the_choices(overrides: list[str], line: str) -> None:
    message = one_line(_compose_error("config", overrides))
    assert message is not None and message.startswith(line) and "\n" not in message


def test_only_our_own_programs_get_the_one_line_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another Hydra app that imports clse_exp keeps Hydra's own report."""
    import types

    from clse_exp.cli_errors import program

    assert program() is None  # pytest is the program here
    main = types.SimpleNamespace(__spec__=types.SimpleNamespace(name="clse_exp.bench"))
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert program() == "clse_exp.bench"
    main.__spec__.name = "clse_exp.__main__"
    assert program() == "clse_exp"
    main.__spec__.name = "someone_elses_app"
    assert program() is None


@pytest.mark.slow  # fresh interpreters: ~5 s each
@pytest.mark.parametrize(("module", "args", "start"), [
    ("clse_exp", ["model=nonexistent"], "clse_exp: error: model='nonexistent' is not valid; choose one of: "),
    ("clse_exp", ["kep=0.1"], "clse_exp: error: kep is not a config key (did you mean keep?)"),
    ("clse_exp", ["-m", "prune=clse,nope"], "clse_exp: error: prune='nope' is not valid"),
    ("clse_exp", ["prune=nope", "--help"], "clse_exp: error: prune='nope' is not valid"),
    ("clse_exp.toy.train", ["optim.stepz=2"], "clse_exp.toy.train: error: optim.stepz is not a config key (did you "
                                              "mean optim.steps?)"),
    ("clse_exp.bench", ["methods=nope"], "clse_exp.bench: error: methods=nope must be a list"),
    ("clse_exp.bench", ["modle.dtype=float16"],
     "clse_exp.bench: error: modle is not a config key (did you mean model?)"),
    ("clse_exp.bench", ["visual_tokens=50"], "clse_exp.bench: error: visual_tokens=50 is not a square number"),
    ("clse_exp.bench", ["model.path=/nonexistent"], "clse_exp.bench: error: model.path='/nonexistent' does not exist"),
    ("clse_exp.bench", ["model.dtype=float8"], "clse_exp.bench: error: model.dtype='float8' is not valid; choose one "
                                               "of: auto, float32, bfloat16, float16"),
    ("clse_exp", ["-m", "hydra/launcher=slurm", "+cluster=local", "keep=0.5"],
     "clse_exp: error: the SLURM launcher: no SLURM controller was found"),
    ("clse_exp.protocol_diff", ["none"], "clse_exp.protocol_diff: error: method='none' is not valid; choose one of: "),
])
def test_cli_mistakes_are_one_line_and_exit_2(module: str, args: list[str], start: str, tmp_path: Path) -> None:
    if "SLURM" in start and subprocess.run(["sh", "-c", "command -v sbatch"], capture_output=True).returncode == 0:
        pytest.skip("a SLURM client is installed here; the no-controller case needs a machine without one")
    hydra_app = module != "clse_exp.protocol_diff" and "--help" not in args  # argparse takes no override after --help
    out = [f"hydra.{'sweep' if '-m' in args else 'run'}.dir={tmp_path}"] if hydra_app else []
    done = subprocess.run([sys.executable, "-m", module, *args, *out], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **OFFLINE}, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(start), done.stderr


@pytest.mark.slow
def test_full_error_still_shows_hydras_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "clse_exp", "model=nonexistent", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **OFFLINE, "HYDRA_FULL_ERROR": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr and "MissingConfigException" in done.stderr


# ------------------------------------------------------------------------------------------------ SLURM launcher
def test_slurm_launcher_without_a_client_says_how_to_run_locally(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from hydra_plugins.clse_exp_packed.submit import check_slurm_controller

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"no SLURM controller was found \(sbatch, srun, scontrol not on PATH\); run "
                                          r"the sweep on this machine with hydra/launcher=local"):
        check_slurm_controller()


def test_slurm_launcher_with_a_controller_down_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hydra_plugins.clse_exp_packed.submit import check_slurm_controller

    for tool, script in (("sbatch", "exit 0"), ("srun", "exit 0"),
                         ("scontrol", "echo 'Slurmctld(primary) at node is DOWN'; exit 1")):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match=r"no SLURM controller was found \(`scontrol ping`: Slurmctld\(primary\) at "
                                          r"node is DOWN\); run the sweep on this machine"):
        check_slurm_controller()
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'Slurmctld(primary) at node is UP'\n")
    check_slurm_controller()


# -------------------------------------------------------------------------------------------------- protocol_diff
@pytest.mark.parametrize(("args", "line"), [
    (["none"], "method='none' is not valid; choose one of: cdpruner, clse,"),
    (["nope"], "method='nope' is not valid"),
    (["clse", "--samples", "0"], "--samples=0 must be >= 1"),
    (["clse", "--width", "0"], "--width=0 must be a multiple of 8 and at least 32"),
    (["clse", "--width", "7"], "--width=7 must be a multiple of 8 and at least 32"),
    (["clse", "--model", "qwen9"], "--model='qwen9' is not valid; choose one of: "),
    (["clse", "--variant", "audio"], "--variant='audio' is not valid; choose one of: image, multi_image, video"),
    (["fastvid", "--variant", "video", "--frames", "0"], "--frames=0 must be >= 1"),
    (["clse", "--model", "llava15"], "model.path='llava-hf/llava-1.5-7b-hf' is not in the local Hugging Face cache"),
])
def test_protocol_diff_refuses_in_one_line_with_exit_2(args: list[str], line: str, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub import constants

    from clse_exp import protocol_diff

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # llava15 is never cached here
    monkeypatch.setattr(sys, "argv", ["protocol_diff", *args])
    monkeypatch.setattr("clse_exp.models._build_tiny", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as caught:
        protocol_diff.main()
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clse_exp.protocol_diff: error: {line}"), lines


# ---------------------------------------------------------------------------------------------------------- bench
def _bench_cfg(overrides: list[str]):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize(("overrides", "match"), [
    (["visual_tokens=50"], r"visual_tokens=50 is not a square number .* e\.g\. visual_tokens=49 or 64"),
    (["model.path=/nonexistent"], r"model.path='/nonexistent' does not exist"),
    (["model.dtype=float8"], r"model.dtype='float8' is not valid; choose one of: auto, float32, bfloat16, float16"),
    (["model.path=org/not-cached"], r"model.path='org/not-cached' is not in the local Hugging Face cache"),
])
def test_bench_refuses_before_building_a_model(overrides: list[str], match: str, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from huggingface_hub import constants

    from clse_exp.bench import validate

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=match):
        validate(_bench_cfg(overrides))


# ----------------------------------------------------------------------------------------------------- load_model
@pytest.mark.parametrize(("cfg", "match"), [
    ({"name": "x"}, r"model config \{'name': 'x'.*\} has no family: give a conf/model name \(one of: internvl3_5, "
                    r"llava15,.*toy_qwen2vl, video_llava\) or a config with name, family \(one of: qwen2_vl,"),
    ({"family": "llava"}, r"has no name"),
    ({"nme": "x"}, r"model config: Key 'nme' not in 'ModelConfig'; a model config's keys: name, family, path,"),
    ("x", r"model='x' is not valid; choose one of: internvl3_5,"),
])
def test_load_model_with_a_bad_config_is_one_config_error_line(cfg: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        load_model(cfg, "cpu")
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------------------------ hub
@pytest.fixture
def unused_port() -> int:
    """A localhost port bound but not listening: connecting is refused at once (never a real address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_uncached_model_with_an_unreachable_hub_fails_in_seconds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 unused_port: int,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from huggingface_hub import constants

    from clse_exp.models import describe, hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{unused_port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub.hub_unreachable.cache_clear()
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"model.path='llava-hf/llava-1.5-7b-hf' is not in the local Hugging Face "
                                          rf"cache \({tmp_path}\) and the hub \(http://127.0.0.1:{unused_port}\) is "
                                          r"unreachable .*; download it where the hub is reachable \(`hf download "
                                          r"llava-hf/llava-1.5-7b-hf`"):
        describe({"name": "llava15", "family": "llava", "path": "llava-hf/llava-1.5-7b-hf"})
    assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]
    hub.hub_unreachable.cache_clear()


def test_cached_model_with_an_unreachable_hub_is_read_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              unused_port: int) -> None:
    from huggingface_hub import constants

    from clse_exp.models import hub

    snapshot = tmp_path / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{unused_port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub.hub_unreachable.cache_clear()
    hub.ensure_available("org/cached")
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"  # later requests do not retry either
    hub.hub_unreachable.cache_clear()


@pytest.mark.slow  # a fresh interpreter (~5 s of imports here)
def test_cli_with_an_unreachable_hub_is_one_line_within_seconds(tmp_path: Path, unused_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{unused_port}", HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "clse_exp", "model=llava15", "dataset.limit=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "is not in the local Hugging Face cache" in lines[0] and "unreachable" in lines[0]
    assert "Retry" not in done.stdout + done.stderr
    assert elapsed < 10, f"{elapsed:.1f} s"
