"""Results on disk, the source of truth: predictions appended line by line, summary written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clse_exp.errors import ConfigError


class LocalSink:
    """`predictions.jsonl` (one flushed line per sample) and `summary.json` in one run folder.

    A run killed mid-write leaves at most one torn last line; opening the sink drops it, so a rerun
    into the same folder resumes with every finished sample exactly once.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.predictions_path = self.run_dir / "predictions.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self._records = self._read_and_repair()

    def _read_and_repair(self) -> list[dict]:
        """The finished records, once each; a torn last line (a killed write) is dropped and the file rewritten.

        Anything else that is not a record (a `null` or non-object line, a record without a string `id`,
        bytes that are not UTF-8, broken JSON before the last line) is damage no run of ours writes: it
        raises ConfigError naming the file and line, so no sample is dropped or answered twice silently.
        """
        if not self.predictions_path.exists():
            return []
        data = self.predictions_path.read_bytes()
        lines = data.split(b"\n")
        torn_allowed = not data.endswith(b"\n")  # only an unterminated last line can be a killed write
        if not torn_allowed:
            lines.pop()  # the empty piece after the final newline
        records, seen, rewrite = [], set(), torn_allowed
        for number, raw in enumerate(lines, start=1):
            last = number == len(lines)
            if not raw.strip():
                rewrite = True
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                if last and torn_allowed:
                    continue
                raise self._damaged(number, f"not UTF-8 JSON ({err})") from None
            if not isinstance(record, dict):
                raise self._damaged(number, f"{json.dumps(record)[:40]} is not a JSON object")
            if not isinstance(record.get("id"), str):
                raise self._damaged(number, f"a record without a string \"id\" (keys: {', '.join(sorted(record)[:8])})")
            if record["id"] in seen:  # a sample written twice (concurrent writers): keep the first
                rewrite = True
                continue
            seen.add(record["id"])
            records.append(record)
        if rewrite:
            self._atomic_write(self.predictions_path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def _damaged(self, line: int, problem: str) -> ConfigError:
        return ConfigError(f"{self.predictions_path}, line {line}: {problem}; each line must be one prediction "
                           "record. Fix or delete that line (or the run folder), then rerun to resume")

    @property
    def records(self) -> list[dict]:
        return list(self._records)

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self._records}

    def append(self, record: dict[str, Any]) -> None:
        with self.predictions_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._records.append(record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._atomic_write(self.summary_path, json.dumps(summary, indent=2, default=str) + "\n")

    @staticmethod
    def _atomic_write(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
