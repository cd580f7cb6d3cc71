"""Results on disk, the source of truth: predictions appended line by line, summary written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
        if not self.predictions_path.exists():
            return []
        lines = self.predictions_path.read_text().splitlines()
        records, seen = [], set()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("id") not in seen:
                seen.add(record.get("id"))
                records.append(record)
        if len(records) != len(lines) or not self.predictions_path.read_text().endswith("\n"):
            self._atomic_write(self.predictions_path, "".join(json.dumps(r) + "\n" for r in records))
        return records

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
