"""`python -m clse_exp.report` on hand-made sweep folders with known numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from clse_exp.report import write_report


def fake_run(root, name, method="clse", keep=0.5, accuracy=0.5, *, budget="average", schedule="auto", prune=None,
             dataset=None, histogram=None, overrides=None):
    """A finished sweep point: .hydra/overrides.yaml and a summary.json whose config is `resolved`."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    cfg = {"model": {"name": "m", "path": "org/m"}, "dataset": {"name": "d", "limit": 10, **(dataset or {})},
           "prune": {"name": method, **(prune or {})}, "keep": keep, "budget": budget, "schedule": schedule,
           "layers": {"name": "paper", "reference_layer": 0, "prune_layers": [2]}, "seed": 0, "batch_size": 8}
    summary = {"config": cfg, "n_samples": 10, "metrics": {"accuracy": accuracy, "note": "text is ignored"},
               "retention": {"average": keep, "kept_row_histogram": histogram or [0.5, 0.5]},
               "efficiency": {"prefill_tflops_per_sample": keep * 2}}
    (folder / "summary.json").write_text(json.dumps(summary))
    overrides = overrides or [f"prune={method}", f"keep={keep}", "dataset.limit=10"]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


def report(root):
    result = subprocess.run([sys.executable, "-m", "clse_exp.report", str(root)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0], (root / "report.md").read_text(), pd.read_csv(root / "report.csv")


def md_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, as lists of stripped cells."""
    block = markdown.split(heading, 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_counts_relative_performance_and_every_point_state(tmp_path):
    fake_run(tmp_path, "none_k1", "none", 1.0, 0.8)
    fake_run(tmp_path, "none_k05", "none", 0.5, 0.8)  # an older sweep ran prune=none once per keep: one baseline
    fake_run(tmp_path, "clse_k01", "clse", 0.1, 0.6)
    fake_run(tmp_path, "clse_k05", "clse", 0.5, 0.8)
    fake_run(tmp_path, "fastv_k01", "fastv", 0.1, 0.4, histogram=[0.1, 0.9])
    infeasible = tmp_path / "pdrop_k01"
    (infeasible / ".hydra").mkdir(parents=True)
    (infeasible / ".hydra" / "overrides.yaml").write_text("- prune=pdrop\n- keep=0.1\n")
    (infeasible / "error.txt").write_text("keep=0.1 is below 0.26\n")
    crashed = tmp_path / "dart_k01"  # killed: Hydra's .hydra/ and some predictions, no result
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / ".hydra" / "overrides.yaml").write_text("- prune=dart\n- keep=0.1\n")
    (crashed / "predictions.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c')
    shared = tmp_path / "none_k025"
    (shared / ".hydra").mkdir(parents=True)
    (shared / "same_as.txt").write_text("none_k1\n")

    counts, markdown, frame = report(tmp_path)
    assert counts.startswith("5 runs, 1 point that could not run, 1 crashed/unfinished point, "
                             "1 prune=none point sharing another point's unpruned run -> ")
    rows = frame.set_index(["method", "keep"])
    assert rows.loc[("clse", 0.1), "relative"] == 0.6 / 0.8
    assert rows.loc[("fastv", 0.1), "relative"] == 0.5
    assert frame[frame["method"] == "none"]["keep"].isna().all()  # keep does not apply to the unpruned run
    table = md_rows(markdown, "## `accuracy` by keep (layer-averaged)")
    assert table == [["m", "d", "clse", "-", "0.8", "0.6"], ["m", "d", "fastv", "-", "-", "0.4"],
                     ["m", "d", "none", "0.8", "-", "-"]]
    header = markdown.split("## `accuracy` by keep (layer-averaged)")[1].split("\n\n")[1].splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["model", "dataset", "method", "unpruned", "0.5", "0.1"]
    assert md_rows(markdown, "### Relative to unpruned")[1] == ["m", "d", "fastv", "-", "-", "0.5"]
    assert "- `pdrop_k01` (prune=pdrop keep=0.1): keep=0.1 is below 0.26" in markdown
    assert "- `dart_k01` (prune=dart keep=0.1): no result (killed, out of memory, or still running; 2 samples saved)" \
        in markdown
    for image in ("metric_vs_keep.png", "metric_vs_tflops.png", "kept_rows.png"):
        assert (tmp_path / image).stat().st_size > 0


def test_every_swept_key_is_a_column_and_a_row_key(tmp_path):
    # ablate_bands: filter x cutoff at one keep; fastv's score_type differs from CLSE's by default, which is the
    # method, not a sweep; model.path follows model.name.
    accuracy = {("gaussian_highpass", 0.1): 0.1, ("gaussian_highpass", 0.2): 0.2, ("ideal_highpass", 0.1): 0.3,
                ("ideal_highpass", 0.2): 0.4}
    for (kind, cutoff), value in accuracy.items():
        fake_run(tmp_path, f"clse_{kind}_{cutoff}", "clse", 0.25, value,
                 prune={"filter": kind, "cutoff_ratio": cutoff, "score_type": "clse_attn"})
    fake_run(tmp_path, "fastv", "fastv", 0.25, 0.9, prune={"score_type": "attn"})
    _, markdown, frame = report(tmp_path)
    assert {"prune.filter", "prune.cutoff_ratio"} <= set(frame.columns)
    assert "prune.score_type" not in frame.columns and "model.path" not in frame.columns
    table = md_rows(markdown, "## `accuracy` by keep (layer-averaged)")
    assert table == [["m", "d", "-", "-", "fastv", "0.9"],
                     ["m", "d", "0.1", "gaussian_highpass", "clse", "0.1"],
                     ["m", "d", "0.1", "ideal_highpass", "clse", "0.3"],
                     ["m", "d", "0.2", "gaussian_highpass", "clse", "0.2"],
                     ["m", "d", "0.2", "ideal_highpass", "clse", "0.4"]]
    assert "No unpruned run (prune=none) in this folder" in markdown
    assert f"`python -m clse_exp -m prune=none model=m dataset=d dataset.limit=10 hydra.sweep.dir={tmp_path}`" \
        in markdown


def test_a_key_that_differs_between_methods_is_shown_and_blocks_a_false_baseline(tmp_path):
    fake_run(tmp_path, "none", "none", 1.0, 0.8, dataset={"limit": 5})
    fake_run(tmp_path, "clse", "clse", 0.5, 0.4)
    fake_run(tmp_path, "clse_5", "clse", 0.5, 0.2, dataset={"limit": 5})
    _, markdown, frame = report(tmp_path)
    assert "dataset.limit" in frame.columns
    rows = frame.set_index(["method", "dataset.limit"])
    assert rows.loc[("clse", 5), "relative"] == 0.2 / 0.8
    assert pd.isna(rows.loc[("clse", 10), "relative"])  # no unpruned run on the same 10 samples


@pytest.mark.parametrize(("budget", "schedule", "label"), [
    ("final", "auto", "keep (fraction after the last cut)"),
    ("average", "auto", "keep (layer-averaged)"),
    ("average", "paper", "keep (layer-averaged, as each method's official count rule reads it; see retention for "
                         "what it kept)"),
])
def test_keep_axis_says_what_keep_meant(tmp_path, budget, schedule, label):
    fake_run(tmp_path, "a", "clse", 0.5, 0.4, budget=budget, schedule=schedule)
    _, markdown, _ = report(tmp_path)
    assert f"## `accuracy` by {label}\n" in markdown


def test_mixed_budgets_are_separate_tables_and_plots(tmp_path):
    fake_run(tmp_path, "none", "none", 1.0, 0.8)
    fake_run(tmp_path, "avg", "fastv", 0.5, 0.4)
    fake_run(tmp_path, "final", "fastv", 0.5, 0.2, budget="final")
    result = write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    average = md_rows(markdown, "## `accuracy` by keep (layer-averaged), budget=average schedule=auto protocol=uniform")
    final = md_rows(markdown, "## `accuracy` by keep (fraction after the last cut), budget=final schedule=auto "
                              "protocol=uniform")
    assert average == [["m", "d", "fastv", "-", "0.4"], ["m", "d", "none", "0.8", "-"]]
    assert final == [["m", "d", "fastv", "-", "0.2"], ["m", "d", "none", "0.8", "-"]]
    names = {p.rsplit("/", 1)[1] for p in result["images"]}
    assert {"metric_vs_keep_average_uniform.png", "metric_vs_keep_final_uniform.png", "kept_rows.png"} <= names


def test_report_on_a_folder_without_results_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clse_exp.report", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "no summary.json" in result.stderr
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "error.txt").write_text("keep=0.1 is below 0.26\n")
    result = subprocess.run([sys.executable, "-m", "clse_exp.report", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.stderr.strip() == (f"clse_exp.report: error: no summary.json under {tmp_path} "
                                     "(0 runs, 1 point that could not run, 0 crashed/unfinished points)")


def with_predictions(folder, answers: dict[str, str], correct: set[str]) -> None:
    """Give a fake run the predictions.jsonl our runner writes: one record per sample id (the summary's
    n_samples and accuracy follow), right where the id is in `correct`."""
    lines = [json.dumps({"id": i, "doc": {"answer": a}, "prediction": a if i in correct else "wrong"})
             for i, a in answers.items()]
    (folder / "predictions.jsonl").write_text("".join(f"{line}\n" for line in lines))
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(task="synthetic", n_samples=len(answers))
    summary["metrics"]["accuracy"] = len(correct & set(answers)) / len(answers)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_relative_is_on_the_shared_samples_or_refused_when_the_sample_sets_differ(tmp_path):
    answers = {f"s{i}": "red" for i in range(8)}
    # unpruned on 8 samples, right on s0..s5 (0.75); on the first 4 it is right on all of them (1.0)
    with_predictions(fake_run(tmp_path, "none", "none", 1.0), answers, {f"s{i}" for i in range(6)})
    # clse on the first 4 samples, right on 2 of them: 0.5 there; the honest ratio is 0.5 / 1.0, not 0.5 / 0.75
    with_predictions(fake_run(tmp_path, "clse_k05", "clse", 0.5), dict(list(answers.items())[:4]), {"s0", "s1"})
    # fastv on 4 samples without predictions.jsonl: no way to compare on common samples
    fastv = fake_run(tmp_path, "fastv_k05", "fastv", 0.5, 0.25)
    summary = json.loads((fastv / "summary.json").read_text())
    (fastv / "summary.json").write_text(json.dumps({**summary, "n_samples": 4}))
    # dart on the same 8 samples: the plain ratio, no note
    with_predictions(fake_run(tmp_path, "dart_k05", "dart", 0.5), answers, {"s0", "s1", "s2"})

    _, markdown, frame = report(tmp_path)
    rows = frame.set_index("method")
    assert rows.loc["clse", "relative"] == 0.5
    assert rows.loc["clse", "relative_note"] == "on the 4 samples shared with the unpruned run (4 vs 8 samples)"
    assert pd.isna(rows.loc["fastv", "relative"])
    assert rows.loc["fastv", "relative_note"].startswith("no ratio: 4 samples vs the unpruned run's 8")
    assert "predictions.jsonl does not list exactly the samples its summary counted" in rows.loc["fastv",
                                                                                                 "relative_note"]
    assert rows.loc["dart", "relative"] == 0.375 / 0.75 and pd.isna(rows.loc["dart", "relative_note"])
    # fastv has no ratio, so no row; the note under the table says why
    assert md_rows(markdown, "### Relative to unpruned") == [["m", "d", "clse", "-", "0.5"],
                                                             ["m", "d", "dart", "-", "0.5"],
                                                             ["m", "d", "none", "1", "-"]]
    assert "- `clse_k05` (clse keep=0.5): on the 4 samples shared with the unpruned run (4 vs 8 samples)" in markdown
    assert "- `fastv_k05` (fastv keep=0.5): no ratio: 4 samples vs the unpruned run's 8" in markdown
