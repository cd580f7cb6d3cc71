"""Per-sample cost of a pruned prefill next to the unpruned one: FLOPs and KV-cache bytes."""

from __future__ import annotations

from typing import Any

import torch

from clse_exp.efficiency.flops import prefill_flops
from clse_exp.efficiency.kv_cache import analytic_kv_bytes


def sample_costs(config: Any, prompt_tokens: int, record: dict, kv_policy: str, dtype: torch.dtype) -> dict:
    """`record` is a pruner trace record (empty when nothing was pruned). Crop keeps only the final
    survivors in every layer's cache; ragged keeps what each layer processed."""
    layers = config.get_text_config().num_hidden_layers
    full = [prompt_tokens] * layers
    if record:
        n_text = prompt_tokens - record["n_visual"]
        tokens = [n_text + v for v in record["visual_per_layer"]]
        cached = [min(t, tokens[-1]) for t in tokens] if kv_policy == "crop" else tokens
    else:
        tokens = cached = full
    flops, flops_full = prefill_flops(config, tokens), prefill_flops(config, full)
    kv, kv_full = analytic_kv_bytes(config, cached, dtype), analytic_kv_bytes(config, full, dtype)
    return {
        "prefill_flops": flops.flops,
        "prefill_flops_unpruned": flops_full.flops,
        "fastv_formula_flops": flops.fastv_formula,
        "kv_bytes": kv,
        "kv_bytes_unpruned": kv_full,
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
    return {
        **extra,
        "prefill_tmacs_per_sample": total["prefill_flops"] / n / 2e12,
        "prefill_tflops_per_sample": total["prefill_flops"] / n / 1e12,
        "flops_ratio": total["prefill_flops"] / total["prefill_flops_unpruned"],
        "fastv_formula_tflops_per_sample": total["fastv_formula_flops"] / n / 1e12,
        "kv_mib_per_sample": total["kv_bytes"] / n / 2**20,
        "kv_ratio": total["kv_bytes"] / total["kv_bytes_unpruned"],
    }
