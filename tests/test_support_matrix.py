"""The support matrix: its classifier on made-up outcomes (fast) and the real matrix through the CLI (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clse_exp import support_matrix as sm
from clse_exp.support_matrix import OFFICIAL, REFUSED, RUNS, WRONG, Settings

S = Settings(keep=0.33, limit=1, max_new_tokens=2, atol=0.02)


def summary(average: float | None = 0.33, unreachable: int = 0, asked: float = 0.33, n: int = 1,
            text_only: int = 0) -> dict:
    ret = {} if average is None else {"asked": asked, "average": average, "final": average,
                                      "budget_unreachable_samples": unreachable, "text_only_samples": text_only}
    return {"n_samples": n, "retention": ret}


@pytest.mark.parametrize(("kwargs", "method", "want"), [
    ({"average": 0.335}, "fastv", RUNS),
    ({"average": 0.36}, "fastv", WRONG),  # drift no record admits to
    ({"average": 0.36, "unreachable": 1}, "dart", OFFICIAL),  # the run says the count departed
    ({"average": 0.33, "asked": 0.5}, "fastv", WRONG),  # recorded a different ask
    ({"average": 0.33, "n": 0}, "fastv", WRONG),  # answered nothing
    ({"average": 0.33, "text_only": 1}, "fastv", WRONG),  # answered from the text alone
    ({"average": None}, "fastv", WRONG),  # a pruned run that reports no retention
    ({"average": None}, "none", RUNS),  # the unpruned model has nothing to retain
    ({"average": 0.5}, "none", WRONG),
])
def test_classify_summary(kwargs: dict, method: str, want: str) -> None:
    assert sm.classify_summary(summary(**kwargs), method, S)[0] == want


def test_rounding_allowance_is_half_a_token_per_frame() -> None:
    """A 3 x 3 frame cannot keep exactly a third: whole tokens per grid are not drift."""
    records = [{"n_visual": 36, "grids": [[4, 3, 3]]}, {"n_visual": 64, "grids": [[1, 8, 8]]}]
    assert sm.rounding_allowance(records) == pytest.approx((0.5 * 4 / 36 + 0.5 / 64) / 2)
    assert sm.rounding_allowance([]) == 0.0
    assert sm.classify_summary(summary(average=0.36), "fastv", S, allowance=0.005)[0] == WRONG
    assert sm.classify_summary(summary(average=0.36), "fastv", S, allowance=0.02)[0] == RUNS


LOADED = "[2026-01-01 00:00:00][clse_exp][INFO] - model tiny_llava loaded in 0.0 s on cpu (torch.float32)\n"


@pytest.mark.parametrize(("rc", "stderr", "summ", "log", "want"), [
    (0, "", summary(), "", RUNS),
    (0, "some warning\n", summary(average=0.2), "", WRONG),
    (0, "", None, "", WRONG),  # exit 0 and no results
    (2, "clse_exp: error: prune=cdpruner supports model families: llava\n", None, "", REFUSED),
    (2, "clse_exp: error: the budget cannot be met\n", None, LOADED, WRONG),  # after the weights loaded
    (2, "UserWarning: something\nclse_exp: error: a reason\n", None, "", WRONG),  # more than one line
    (2, "\n\nclse_exp: error: a reason\n\n", None, "", REFUSED),  # blank lines are not lines
    (1, "Traceback (most recent call last):\n  File x\nValueError: boom\n", None, "", WRONG),
    (2, "usage: something else\n", None, "", WRONG),  # exit 2 that is not the CLI's own line
    (130, "clse_exp: interrupted\n", None, "", WRONG),
])
def test_classify_single(rc: int, stderr: str, summ: dict | None, log: str, want: str) -> None:
    status, detail = sm.classify_single(rc, stderr, summ, log, "fastv", S)
    assert status == want, detail


def test_classify_single_names_the_traceback() -> None:
    _, detail = sm.classify_single(1, "Traceback (most recent call last):\nValueError: boom\n", None, "", "x", S)
    assert detail == "exit 1: ValueError: boom"


def test_classify_refusal_from_a_sweep_folder() -> None:
    assert sm.classify_refusal("a reason\n", "") == (REFUSED, "a reason")
    assert sm.classify_refusal("a reason\nsecond line\n", "")[0] == WRONG
    assert sm.classify_refusal("", "")[0] == WRONG
    assert sm.classify_refusal("a reason\n", LOADED)[0] == WRONG


def _point(folder: Path, overrides: list[str], files: dict[str, str]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    for name, text in files.items():
        (folder / name).write_text(text)


def test_sweep_outcomes_read_every_point_state(tmp_path: Path) -> None:
    """Done, refused, crashed and shared (prune=none) points, as the CLI's sweep leaves them."""
    root = tmp_path / "runs" / "tiny_x"
    base = ["model=tiny_x", "dataset.variant=image"]
    rec = json.dumps({"n_visual": 64, "grids": [[1, 8, 8]]}) + "\n"
    _point(root / "a", [*base, "prune=fastv", "protocol=official"],
           {"summary.json": json.dumps(summary()), "predictions.jsonl": rec})
    _point(root / "b", [*base, "prune=cdpruner", "protocol=official"], {"error.txt": "not this family\n"})
    _point(root / "c", [*base, "prune=dart", "protocol=official"], {"crash.txt": "Traceback\nKeyError: 3\n"})
    _point(root / "d", [*base, "prune=none", "protocol=official"], {"summary.json": json.dumps(summary(None))})
    _point(root / "e", [*base, "prune=none", "protocol=uniform"], {"same_as.txt": "d\n"})
    _point(root / "f", [*base, "prune=pdrop", "protocol=official"], {"predictions.jsonl": ""})  # killed
    got = {k.method + "/" + k.protocol: o.status for k, o in sm.sweep_outcomes(tmp_path, "tiny_x", S).items()}
    assert got == {"fastv/official": RUNS, "cdpruner/official": REFUSED, "dart/official": WRONG,
                   "none/official": RUNS, "none/uniform": RUNS, "pdrop/official": WRONG}


def _matrix(statuses: dict[tuple[str, str], str]) -> dict:
    points = [{"method": m, "family": f, "variant": v, "protocol": p, "status": statuses.get((m, f), RUNS)}
              for m in ("none", "fastv") for f in ("tiny_a", "tiny_b") for v in sm.VARIANTS for p in sm.PROTOCOLS]
    counts = {s: sum(p["status"] == s for p in points) for s in sm.STATUSES}
    return {"settings": {"keep": 0.33, "limit": 1, "max_new_tokens": 2, "atol": 0.02},
            "families": ["tiny_a", "tiny_b"], "methods": ["none", "fastv"], "variants": list(sm.VARIANTS),
            "protocols": list(sm.PROTOCOLS), "counts": counts, "points": points}


def test_render_and_readme_block() -> None:
    table = sm.render_markdown(_matrix({("fastv", "tiny_b"): REFUSED}))
    assert "| method | a | b |" in table
    assert "| `fastv` | ✓✓ ✓✓ ✓✓ | ·· ·· ·· |" in table
    assert "24 points: 18 runs, 0 runs (official count), 6 refused, 0 WRONG." in table
    readme = f"# x\n\nbefore\n{sm.MARK_START}\nold table\n{sm.MARK_END}\nafter\n"
    new = sm.replace_readme_block(readme, table)
    assert sm.readme_block(new) == table
    assert new.startswith("# x\n\nbefore\n") and new.endswith(f"{sm.MARK_END}\nafter\n")
    assert sm.readme_block("no markers") is None


def test_every_tiny_family_and_method_is_in_the_matrix() -> None:
    assert {"tiny_llava", "tiny_qwen2vl", "tiny_video_llava"} <= set(sm.tiny_families())
    assert sm.all_methods()[0] == "none" and "clse" in sm.all_methods()


@pytest.fixture(scope="module")
def matrix_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole matrix through the CLI once: 8 sweeps of 78 points, a few minutes on 2 cores."""
    out = tmp_path_factory.mktemp("support") / "matrix"
    sm.main(["--out", str(out)])
    return out


@pytest.mark.slow
def test_support_matrix_has_no_wrong_point(matrix_out: Path) -> None:
    wrong = sm.wrong_lines(json.loads((matrix_out / "matrix.json").read_text()))
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_readme_support_table_is_the_generated_one(matrix_out: Path) -> None:
    assert sm.readme_block(sm.README.read_text()) == (matrix_out / "matrix.md").read_text(), (
        "README's support table is stale: run python -m clse_exp.support_matrix --write-readme")
