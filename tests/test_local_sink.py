"""predictions.jsonl on resume: a torn last line is repaired silently, any other damage is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clse_exp.errors import ConfigError
from clse_exp.tracking.local import LocalSink

GOOD = [{"id": "a", "prediction": "red"}, {"id": "b", "prediction": "blue"}]


def write(tmp_path, data: bytes):
    (tmp_path / "predictions.jsonl").write_bytes(data)


def lines(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_torn_last_line_is_dropped_and_the_file_repaired(tmp_path):
    write(tmp_path, lines(*GOOD) + b'{"id": "c", "predic')
    sink = LocalSink(tmp_path)
    assert sink.done_ids() == {"a", "b"}
    assert (tmp_path / "predictions.jsonl").read_bytes() == lines(*GOOD)
    sink.append({"id": "c", "prediction": "green"})
    assert [r["id"] for r in LocalSink(tmp_path).records] == ["a", "b", "c"]


def test_duplicate_ids_keep_the_first_record(tmp_path):
    write(tmp_path, lines(GOOD[0], {"id": "a", "prediction": "late"}, GOOD[1]))
    assert LocalSink(tmp_path).records == GOOD
    assert (tmp_path / "predictions.jsonl").read_bytes() == lines(*GOOD)


@pytest.mark.parametrize(("middle", "problem"), [
    (b"null\n", "null is not a JSON object"),
    (b"[1, 2]\n", "[1, 2] is not a JSON object"),
    (b'{"prediction": "red"}\n', 'a record without a string "id" (keys: prediction)'),
    (b'{"id": 3}\n', 'a record without a string "id" (keys: id)'),
    (b'{"id": "c", "prediction": "\xff\xfe"}\n', "not UTF-8 JSON"),
    (b'{"id": "c", "pred\n', "not UTF-8 JSON"),
])
def test_damaged_line_names_file_and_line(tmp_path, middle, problem):
    original = lines(GOOD[0]) + middle + lines(GOOD[1])
    write(tmp_path, original)
    with pytest.raises(ConfigError) as err:
        LocalSink(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'predictions.jsonl'}, line 2: {problem}")
    assert "\n" not in message
    assert (tmp_path / "predictions.jsonl").read_bytes() == original  # nothing is dropped


@pytest.mark.parametrize("last", [b"null", b'{"prediction": "red"}'])
def test_unterminated_last_line_that_parses_is_not_taken_for_a_torn_write(tmp_path, last):
    write(tmp_path, lines(*GOOD) + last)
    with pytest.raises(ConfigError, match=", line 3: "):
        LocalSink(tmp_path)


@pytest.mark.slow
def test_damaged_predictions_stop_the_cli_with_one_line(tmp_path):
    args = [sys.executable, "-m", "clse_exp", f"hydra.run.dir={tmp_path}", "dataset.limit=1", "eval.reference=false"]
    assert subprocess.run(args, capture_output=True, timeout=300).returncode == 0  # the folder now holds this run
    with (tmp_path / "predictions.jsonl").open("ab") as f:
        f.write(b"null\n")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"clse_exp: error: {tmp_path}/predictions.jsonl, line 2:")
    assert "Traceback" not in result.stderr
