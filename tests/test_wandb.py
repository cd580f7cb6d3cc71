"""logger=wandb: an offline run's history, read back from its .wandb file without network, holds the metrics;
a W&B failure leaves the local results complete."""

from __future__ import annotations

import json
import struct
import time

from clse_exp.api import compose_config
from clse_exp.runner import run

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 7-byte header, then 32 KiB blocks of records
FLUSH_DEADLINE_S = 300  # generous: wandb's writer process may lag far behind on a loaded machine


def read_records(path) -> list:
    """Every complete record of the .wandb file, in order; a record still being written is left out."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, [], []
    if data[:4] != b":W&B":
        return records  # the header itself is not written yet
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of a split one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            records.append(record)
    return records


def finished_history(run_root) -> dict[str, str]:
    """The history of the offline run under `run_root`, once its writer has flushed the exit record.

    `run.finish()` returns before wandb's separate writer process has necessarily written the file, so
    poll (no fixed sleep) until the exit record, which wandb writes last, is on disk.
    """
    deadline = time.monotonic() + FLUSH_DEADLINE_S
    while True:
        files = list(run_root.glob("wandb/offline-run-*/run-*.wandb"))
        records = read_records(files[0]) if len(files) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"no exit record in {files} after {FLUSH_DEADLINE_S} s"
        time.sleep(0.2)
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history.update({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return history


def test_offline_run_history_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(["logger=wandb", "prune=clse", "keep=0.5", "dataset.limit=3"])
    summary = run(cfg, tmp_path)
    history = finished_history(tmp_path)
    assert float(history["metrics/first_token_kl"]) == summary["metrics"]["first_token_kl"]
    assert float(history["efficiency/flops_ratio"]) == summary["efficiency"]["flops_ratio"]
    assert history["predictions/nrows"] == "3" and history["predictions/_type"] == '"table-file"'
    assert any(key.startswith("kept_tokens/") for key in history)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3


def test_wandb_failure_keeps_local_results(tmp_path, monkeypatch):
    import wandb

    def broken(*_, **__):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    summary = run(compose_config(["logger=wandb", "dataset.limit=2"]), tmp_path)
    assert summary["n_samples"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["n_samples"] == 2
