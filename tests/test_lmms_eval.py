"""lmms-eval end to end: a local lmms-eval task (tests/lmms_task) over our synthetic questions, answered by the
`clse_exp` lmms-eval model with pruning, scores what our own runner scores on the same samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")  # the `lmms` extra; .ci/run installs it, so CI always runs these

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_task.build import write_task  # noqa: E402

from clse_exp.api import compose_config  # noqa: E402
from clse_exp.data.sample import Sample  # noqa: E402
from clse_exp.data.synthetic import COLOURS, SHAPES, make_sample, synthetic_dataset  # noqa: E402
from clse_exp.data.video import sample_frames  # noqa: E402
from clse_exp.generation import continuation_logprobs, prepare  # noqa: E402
from clse_exp.lmms.__main__ import _set_flag, main  # noqa: E402
from clse_exp.lmms.model import PrunedLMM, cut_at_stops  # noqa: E402
from clse_exp.models import load  # noqa: E402
from clse_exp.pruning.build import build_pruner  # noqa: E402
from clse_exp.report import collect  # noqa: E402
from clse_exp.runner import answer_batch, run  # noqa: E402

SIZE, BATCH = 8, 4
QTYPES = ["colour", "shape"]  # what the toy answers (conf/dataset/synthetic.yaml)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("lmms_task"), SIZE)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # lmms-eval's dataset cache stays in the test's folder


def _lmms(task_dir: Path, out: Path, model_args: str, *extra: str) -> int:
    return main(["--model", "clse_exp", "--model_args", model_args, "--tasks", "clse_synthetic", "--include_path",
                 str(task_dir), "--batch_size", str(BATCH), "--output_path", str(out), *extra])


@pytest.mark.parametrize("method", ["clse", pytest.param("random", marks=pytest.mark.slow)])
def test_lmms_eval_scores_what_our_runner_scores(task_dir: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "lmms"
    assert _lmms(task_dir, out, f"model=toy_qwen2vl,prune={method},keep=0.5", "--log_samples") == 0

    results_file = next(out.rglob("*_results.json"))
    lmms_accuracy = json.loads(results_file.read_text())["results"]["clse_synthetic"]["accuracy,none"]
    ours = run(compose_config([f"prune={method}", "keep=0.5", f"dataset.size={SIZE}", f"batch_size={BATCH}",
                               "eval.reference=false", "logger=none"]), tmp_path / "ours")
    assert lmms_accuracy == ours["metrics"]["accuracy"]
    assert 0.0 < lmms_accuracy < 1.0  # pruning at 0.5 costs the trained toy some answers, not all

    # the same answers and the same kept tokens, request by request (lmms-eval asks in document order)
    stats_dir = results_file.parent / results_file.name.replace("_results.json", "_clse_exp") / "clse_synthetic"
    lmms_records = [json.loads(line) for line in (stats_dir / "predictions.jsonl").read_text().splitlines()]
    our_records = [json.loads(line) for line in (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in lmms_records] == list(range(SIZE))
    for theirs, mine in zip(lmms_records, our_records, strict=True):
        assert theirs["prediction"] == mine["prediction"]
        assert theirs["kept"] == mine["kept"]
        assert theirs["prefill_flops"] == mine["prefill_flops"] < theirs["prefill_flops_unpruned"]
        assert theirs["kv_bytes"] == mine["kv_bytes"]

    summary = json.loads((stats_dir / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] == lmms_accuracy
    assert summary["retention"]["average"] == pytest.approx(ours["retention"]["average"])
    assert summary["efficiency"]["flops_ratio"] == pytest.approx(ours["efficiency"]["flops_ratio"])
    assert summary["config"]["prune"]["name"] == method and summary["config"]["batch_size"] == BATCH
    assert summary["environment"]["versions"]["torch"]
    row = collect(out)[0].iloc[0]  # python -m clse_exp.report reads it like one of our runs
    assert (row["method"], row["dataset"], row["accuracy"]) == (method, "clse_synthetic", lmms_accuracy)
    samples_file = next(out.rglob("*_samples_clse_synthetic.jsonl"))  # lmms-eval's own --log_samples output
    assert len(samples_file.read_text().splitlines()) == SIZE


@pytest.mark.parametrize("prune", ["none", pytest.param("clse", marks=pytest.mark.slow)])
def test_multiple_choice_scores_each_choice_as_a_continuation_after_the_pruned_prompt(task_dir: Path,
                                                                                       tmp_path: Path,
                                                                                       prune: str) -> None:
    """loglikelihood requests: lmms-eval's accuracy is the argmin over choices of our continuation's mean
    negative log-likelihood (prompt pruned as when answering), and the trained toy picks the right colour or
    shape unpruned."""
    out = tmp_path / "lmms"
    assert _lmms(task_dir, out, f"model=toy_qwen2vl,prune={prune},keep=0.5", "--tasks", "clse_synthetic_mc") == 0
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]["clse_synthetic_mc"]

    cfg = compose_config([f"prune={prune}", "keep=0.5"])
    loaded = load(cfg.model, "cpu")
    pruner = build_pruner(cfg, loaded)
    right = 0
    for sample in synthetic_dataset(SIZE, split="test", qtypes=QTYPES):
        choices = list(COLOURS) if sample.question.startswith("What colour") else list(SHAPES)
        inputs = prepare(loaded, [sample] * len(choices), pruner)
        losses = [-c.logprob / c.tokens for c in continuation_logprobs(loaded, inputs, choices, pruner)]
        right += choices[losses.index(min(losses))] == sample.answer  # lmms-eval: argmin of the mean loss
    assert results["acc,none"] == right / SIZE
    if prune == "none":
        assert right / SIZE >= 0.75

    # like generate requests, the scored ones leave per-request records and a summary the report reads
    stats_dir = next(out.rglob("*_clse_exp")) / "clse_synthetic_mc"
    records = [json.loads(line) for line in (stats_dir / "predictions.jsonl").read_text().splitlines()]
    choices = sum(len(COLOURS) if s.question.startswith("What colour") else len(SHAPES)
                  for s in synthetic_dataset(SIZE, split="test", qtypes=QTYPES))
    assert len(records) == choices and {r["doc_id"] for r in records} == set(range(SIZE))
    assert all(r["continuation"] in (*COLOURS, *SHAPES) and r["loglikelihood"] < 0 and r["prefill_flops"] > 0
               for r in records)
    summary = json.loads((stats_dir / "summary.json").read_text())
    assert (summary["n_samples"], summary["n_requests"]) == (SIZE, choices)
    assert summary["metrics"]["acc"] == results["acc,none"]
    assert (summary["efficiency"]["flops_ratio"] == 1.0) == (prune == "none")
    if prune != "none":
        assert summary["retention"]["average"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(("model_args", "named"), [
    ("model=toy_qwen2vl,prune=clse,keep=2", "keep=2.0"),
    ("prune=bogus", "prune='bogus'"),
    ("prune=clse,prune.not_a_knob=1", "'prune.not_a_knob'"),
    ("prune=clse,prune.score_type=xx", "prune.score_type='xx'"),
    ("prune=clse,batch_size=8", "--batch_size"),
    ("num_frames=0", "num_frames=0"),
])
def test_bad_model_arg_is_one_line_before_any_weights_load(task_dir: Path, tmp_path: Path, model_args: str,
                                                           named: str, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("clse_exp.lmms.model.load", lambda *a, **k: pytest.fail("weights loaded"))
    assert _lmms(task_dir, tmp_path / "out", model_args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clse_exp.lmms: error: ") and named in lines[0], lines
    assert not (tmp_path / "out").exists()  # lmms-eval never started


@pytest.mark.slow  # a fresh interpreter: ~15 s of imports for what main()'s return code shows
def test_bad_model_arg_exits_nonzero_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "clse_exp.lmms", "--model_args", "prune=clse,keep=2", "--tasks",
                           "clse_synthetic", "--output_path", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("clse_exp.lmms: error: keep=2.0 is outside (0, 1]")


def test_unknown_task_is_one_line_and_exit_2_before_lmms_eval_starts(task_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """lmms-eval itself prints a traceback and exits 0; the wrapper checks the names against lmms-eval's index."""
    assert _lmms(task_dir, tmp_path / "out", "prune=clse", "--tasks", "clse_synthetc") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("clse_exp.lmms: error: --tasks clse_synthetc: no such lmms-eval task")
    assert "clse_synthetic" in lines[0]  # the close match
    assert not (tmp_path / "out").exists()


def test_failed_evaluation_is_one_line_and_exits_nonzero(task_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """An error inside lmms-eval's evaluation: one line naming it and exit 1, not its traceback and exit 0."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the checkpoint is damaged")

    monkeypatch.setattr("clse_exp.lmms.model.load", broken)
    assert _lmms(task_dir, tmp_path / "out", "model=toy_qwen2vl,prune=clse") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("clse_exp.lmms: error: the evaluation failed: RuntimeError: the checkpoint "
                                            "is damaged (--verbosity DEBUG shows the traceback)")


def test_other_model_whose_class_cannot_import_is_one_line() -> None:
    from clse_exp.errors import ConfigError
    from clse_exp.lmms.__main__ import check_model

    with pytest.raises(ConfigError, match=r"--model 'nope' is not an lmms-eval model; choose one of: .*llava_hf"):
        check_model("nope")
    try:
        import decord  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"--model llava_hf: lmms-eval's class for it cannot be imported here "
                                              r"\(No module named 'decord'\)"):
            check_model("llava_hf")


@pytest.mark.slow  # a fresh interpreter and lmms-eval's registry: ~10 s
def test_other_model_that_cannot_run_exits_nonzero_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "clse_exp.lmms", "--model", "no_such_model", "--tasks", "pope",
                           "--output_path", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clse_exp.lmms: error: --model 'no_such_model' is not an lmms-eval")


def _write_video(path: Path, frames: list) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def test_video_file_is_sampled_into_frames_and_answered_like_our_runner(tmp_path: Path) -> None:
    """A task whose doc_to_visual gives a video path (as lmms-eval's video tasks do)."""
    docs = []
    for index in range(2):
        sample = make_sample(index, variant="video", num_frames=4, qtypes=QTYPES)
        _write_video(tmp_path / f"{index}.mp4", sample.video)
        docs.append({"video": str(tmp_path / f"{index}.mp4"), "question": sample.question})
    lm = PrunedLMM(batch_size="2", model="toy_qwen2vl", prune="clse", keep=0.5, num_frames=4,
                   stats_dir=str(tmp_path / "stats"))
    lm.task_dict = {"video_task": {"test": docs}}
    requests = [Instance("generate_until", (doc["question"], {"max_new_tokens": 4, "until": ["\n\n"]},
                                            lambda d: [d["video"]], i, "video_task", "test"), idx=0,
                         metadata={"task": "video_task", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]
    answers = lm.generate_until(requests)

    ours = answer_batch(lm.loaded, [Sample(str(i), d["question"], "", [], sample_frames(d["video"], 4))
                                    for i, d in enumerate(docs)], 4, lm.pruner, reference=False, task="synthetic")
    assert answers == [r["prediction"] for r in ours]
    records = [json.loads(line) for line in (tmp_path / "stats" / "video_task" / "predictions.jsonl").open()]
    assert [r["grids"] for r in records] == [r["grids"] for r in ours]
    assert records[0]["grids"][0][0] == 2  # 4 frames in temporal pairs: one video, not 4 images
    assert [r["kept"] for r in records] == [r["kept"] for r in ours]


def test_stop_strings_cut_the_answer() -> None:
    assert cut_at_stops("red\n\nblue", ["\n\n"]) == "red"
    assert cut_at_stops("red. Blue", [".", "\n"]) == "red"
    assert cut_at_stops("red", []) == "red"


def test_model_args_flag_is_replaced_in_either_form() -> None:
    assert _set_flag(["--tasks", "t", "--model_args", "keep=0.5"], "--model_args", "x") == ["--tasks", "t",
                                                                                        "--model_args", "x"]
    assert _set_flag(["--model_args=keep=0.5", "--tasks", "t"], "--model_args", "x") == ["--tasks", "t",
                                                                                      "--model_args", "x"]
    assert _set_flag(["--tasks", "t"], "--model_args", "x") == ["--tasks", "t", "--model_args", "x"]
