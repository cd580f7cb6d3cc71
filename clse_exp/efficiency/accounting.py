"""Per-sample cost of a prefill next to the unpruned one, from the engine's record: FLOPs and KV-cache bytes."""

from __future__ import annotations

from typing import Any

import torch

from clse_exp.efficiency.flops import prefill_flops
from clse_exp.efficiency.kv_cache import analytic_kv_bytes
from clse_exp.pruning.record import SampleRecord


def sample_costs(config: Any, record: SampleRecord, dtype: torch.dtype) -> dict:
    """FLOPs from the tokens each layer processed and KV bytes from the tokens each layer cached (the
    record knows both, whatever the KV policy), next to the same for the unpruned prompt."""
    full = [record.n_prompt] * len(record.processed)
    flops, flops_full = prefill_flops(config, record.processed), prefill_flops(config, full)
    return {
        "prefill_flops": flops.flops,
        "prefill_flops_unpruned": flops_full.flops,
        "fastv_formula_flops": flops.fastv_formula,
        "kv_bytes": analytic_kv_bytes(config, record.cached, dtype),
        "kv_bytes_unpruned": analytic_kv_bytes(config, full, dtype),
    }


def run_costs(records: list[dict]) -> dict:
    """Means over samples, and the ratios pruned / unpruned of the totals."""
    if not records or "prefill_flops" not in records[0]:
        return {}
    total = {k: sum(r[k] for r in records) for k in ("prefill_flops", "prefill_flops_unpruned", "kv_bytes",
                                                      "kv_bytes_unpruned", "fastv_formula_flops")}
    n = len(records)
    vision = [r.get("vision_flops") for r in records]
    extra = {"vision_tflops_per_sample": sum(vision) / n / 1e12} if None not in vision else {}
    vision_unpruned = [r.get("vision_flops_unpruned") for r in records]
    if extra and None not in vision_unpruned and sum(vision_unpruned):  # a method that shrinks the encoder's input
        extra["vision_flops_ratio"] = sum(vision) / sum(vision_unpruned)
    aux = sum(r.get("aux_flops", 0) for r in records)
    if aux:  # work the method ran outside the model (CDPruner's CLIP text tower): shown, and in a second ratio
        extra["aux_tflops_per_sample"] = aux / n / 1e12
        extra["flops_ratio_with_aux"] = (total["prefill_flops"] + aux) / total["prefill_flops_unpruned"]
    return {
        **extra,
        "prefill_tmacs_per_sample": total["prefill_flops"] / n / 2e12,
        "prefill_tflops_per_sample": total["prefill_flops"] / n / 1e12,
        "flops_ratio": total["prefill_flops"] / total["prefill_flops_unpruned"],
        "fastv_formula_tflops_per_sample": total["fastv_formula_flops"] / n / 1e12,
        "kv_mib_per_sample": total["kv_bytes"] / n / 2**20,
        "kv_ratio": total["kv_bytes"] / total["kv_bytes_unpruned"],
    }
