"""Kernel and host-sync budgets of the engine (issue 21), counted on the CPU with clse_exp.efficiency.counts.

On a GPU a host sync stalls the launch queue and every kernel is a launch, so what the engine adds over the
stock forward is what makes pruning slower than its FLOPs say. The budgets: a pruned decode step launches no
more kernels and syncs no more than the stock step; a prefill syncs O(1) times (the prompt read once, the plan
uploaded once, at most one upload per stage), the same at batch 1 and 8; every method, image or video, selects
for the whole batch, so it launches the same kernels at batch 1 and 8; the engine's kernels over the stock forward stay
under 50 + 150 per stage (plus a greedy method's own allowance).
Model: Qwen2-VL-7B's depth and heads at 1/16 width (LLaVA-1.5's geometry for the CLIP-reading methods).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import VIDEO_METHODS, noise_image, slow_except
from omegaconf import OmegaConf

from clse_exp import bench, load_model
from clse_exp.api import make_pruner
from clse_exp.data.sample import Sample
from clse_exp.efficiency.counts import count_ops, host_side, upload
from clse_exp.generation import prepare
from clse_exp.pruning.methods import METHODS

CONF = OmegaConf.load(bench.Path(bench.__file__).parent / "conf" / "bench.yaml")
# beyond the engine's budget (the prompt read, the plan upload, one upload a stage): SparseVLM uploads its planned
# cluster counts and density noise at each stage; CDPruner runs transformers' CLIP text tower (2 syncs, once for the
# batch) on instructions it uploads
EXTRA_SYNCS = {"sparsevlm": lambda stages: stages, "cdpruner": lambda stages: 3}
# the method's own work over the ENGINE's kernels per stage (DPC-kNN clustering, the DPP's per-pick updates,
# PruMerge+'s IQR quantiles and neighbour merge)
OWN_KERNELS = {"sparsevlm": 150, "cdpruner": 300, "prumerge_plus": 50}
LLAVA_ONLY = ("prumerge_plus", "cdpruner", "vispruner")
DECODE_TOKENS = 3


def test_counter_tells_syncs_from_kernels_and_views():
    x = torch.arange(12.0).view(3, 4)
    with count_ops() as tally:
        x.t()  # a view: an op, no kernel
        y = x * 2  # a kernel
        y.sum().item()  # a kernel and a scalar read
        x[x > 3]  # a boolean mask: data-dependent shape
        x.nonzero()
        x.tolist()
        torch.tensor([], dtype=torch.long)  # an empty tensor uploads nothing
        torch.tensor([1, 2])  # host data: an upload
    counts = tally.get("all")
    assert counts.sync_ops == {"_local_scalar_dense": 1, "index": 1, "nonzero": 1, "tolist": 1, "lift_fresh": 1}
    assert counts.syncs == 5
    assert counts.kernels < counts.ops


def test_host_side_and_uploads_are_counted_apart():
    with count_ops("device") as tally:
        with host_side():
            host = torch.arange(4) + 1
        upload(host, torch.device("cpu"))
    assert tally.get("host").ops == 2 and tally.get("host").syncs == 0
    assert tally.get("device").sync_ops == {"upload": 1}


def _model(family: str):
    cfg = OmegaConf.merge(CONF, OmegaConf.load(bench.Path(bench.__file__).parent / "conf" / "bench_preset" /
                                                "qwen2vl_7b.yaml"))
    cfg.model.family, cfg.model.scale, cfg.visual_tokens, cfg.model.dtype = family, 0.0625, 64, "float32"
    cfg.model.vocab_size = None
    return cfg, bench.build_model(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def models():
    return {family: _model(family) for family in ("qwen2_vl", "llava")}


def _counts(models, family: str, method: str | None, protocol: str, batch: int) -> dict:
    cfg, loaded = models[family]
    samples = bench.bench_samples(cfg, batch)
    pruner = None if method is None else make_pruner(method, keep=0.33, protocol=protocol)
    inputs = prepare(loaded, samples, pruner)
    out = bench.count_generate(loaded, inputs, pruner, DECODE_TOKENS)
    out["stages"] = 0 if pruner is None else len(pruner.layers.prune_layers)
    return out


CASES = [(method, protocol) for method in sorted(METHODS) if method not in ("none", *VIDEO_METHODS)
         for protocol in ("official", "uniform")]


FAST_CASES = {("clse", "official"), ("fastv", "uniform"), ("divprune", "official"), ("sparsevlm", "official")}


@pytest.mark.parametrize(("method", "protocol"), slow_except(CASES, FAST_CASES))
def test_engine_budgets(models, method, protocol):
    family = "llava" if method in LLAVA_ONLY else "qwen2_vl"
    stock = _counts(models, family, None, protocol, 8)
    runs = {batch: _counts(models, family, method, protocol, batch) for batch in (1, 8)}
    for batch, run in runs.items():
        # decode: nothing beyond the stock step, whatever the method, protocol or batch
        assert run["decode_step_kernels"] <= stock["decode_step_kernels"], (batch, run["sync_sites"])
        assert run["decode_step_syncs"] <= stock["decode_step_syncs"], (batch, run["sync_sites"]["decode"])
    one, eight = runs[1], runs[8]
    extra = EXTRA_SYNCS.get(method, lambda stages: 0)(one["stages"])
    ceiling = stock["prefill_syncs"] + 2 + one["stages"] + extra
    assert eight["prefill_syncs"] == one["prefill_syncs"] <= ceiling, eight["sync_sites"]["prefill"]
    # every method selects for the whole batch: batch 8 launches the kernels batch 1 does
    assert eight["prefill_kernels"] <= 1.01 * one["prefill_kernels"]
    own = OWN_KERNELS.get(method, 0) * one["stages"]
    assert eight["prefill_kernels"] - stock["prefill_kernels"] <= 50 + 150 * one["stages"] + own


def test_syncs_do_not_grow_with_depth(models):
    """Two depths of the same family: the prefill's syncs are the same (nothing is read per layer)."""
    cfg, _ = models["qwen2_vl"]
    shallow = OmegaConf.merge(cfg, {"model": {"num_layers": 12}})
    loaded = bench.build_model(shallow, torch.device("cpu"))
    deep = _counts(models, "qwen2_vl", "clse", "uniform", 8)
    pruner = make_pruner("clse", keep=0.33, protocol="uniform")
    inputs = prepare(loaded, bench.bench_samples(shallow, 8), pruner)
    counts = bench.count_generate(loaded, inputs, pruner, DECODE_TOKENS)
    assert counts["prefill_syncs"] == deep["prefill_syncs"]


@pytest.mark.parametrize(("family", "method"), [("qwen2_vl", "clse"), ("llava", "divprune")])
def test_padded_batch_decode_budget(models, family, method):
    """Prompts of different lengths (left padding, ragged cuts) under the official rules: divprune on LLaVA
    renumbers positions (`cache_length`), so its decode steps read rotary and masks from the prefill's buffers."""
    cfg, loaded = models[family]
    base = bench.bench_samples(cfg, 1)[0]
    samples = [base, replace(base, question="Name the colours."), replace(base, question=base.question * 2)]
    pruner = make_pruner(method, keep=0.33, protocol="official")
    stock = bench.count_generate(loaded, loaded.prepare(samples), None, DECODE_TOKENS)
    pruned = bench.count_generate(loaded, prepare(loaded, samples, pruner), pruner, DECODE_TOKENS)
    assert pruner.rules.decode == ("cache_length" if method == "divprune" else "original")
    assert pruned["decode_step_kernels"] <= stock["decode_step_kernels"]
    assert pruned["decode_step_syncs"] <= stock["decode_step_syncs"]


@pytest.fixture(scope="module")
def onevision():
    return load_model("tiny_llava_onevision", "cpu")


def _video_counts(loaded, method: str | None, protocol: str, batch: int, **knobs) -> dict:
    """One generate over `batch` different 8-frame clips of one shape (so data-dependent plans differ)."""
    samples = [Sample(f"v{b}", "What moves in the video?", "", [],
                      video=[noise_image(60 + 10 * b + i, 112) for i in range(8)]) for b in range(batch)]
    pruner = None if method is None else make_pruner(method, keep=0.33, protocol=protocol, **knobs)
    return bench.count_generate(loaded, prepare(loaded, samples, pruner), pruner, DECODE_TOKENS)


@pytest.mark.parametrize("method", VIDEO_METHODS)
@pytest.mark.parametrize("protocol", ["official", "uniform"])
def test_video_method_budgets(onevision, method, protocol):
    """The video methods on 8-frame clips: decode steps cost what the stock step costs (DyCoke's decode-step
    pruning, its second stage, is extra work by design and counted with it switched off); the prefill's host
    syncs and kernels do not grow with the batch (every clip of the batch is scored at once)."""
    knobs = {"decode_pruning": False} if method == "dycoke" else {}
    stock = _video_counts(onevision, None, protocol, 4)
    runs = {batch: _video_counts(onevision, method, protocol, batch, **knobs) for batch in (1, 4)}
    for batch, run in runs.items():
        assert run["decode_step_kernels"] <= stock["decode_step_kernels"], (batch, run["sync_sites"])
        assert run["decode_step_syncs"] <= stock["decode_step_syncs"], (batch, run["sync_sites"]["decode"])
    assert runs[4]["prefill_syncs"] == runs[1]["prefill_syncs"], runs[4]["sync_sites"]["prefill"]
    assert runs[4]["prefill_kernels"] <= 1.01 * runs[1]["prefill_kernels"], (runs[1]["prefill_kernels"],
                                                                             runs[4]["prefill_kernels"])


def test_vision_capture_costs_the_same_at_any_batch():
    """Qwen2.5-VL packs a batch's images into one encoder call; reading a vision block's input for a method
    (VisionZip here) splits it per image on the host and uploads the row maps once, so the vision phase adds
    the same syncs and no kernels whatever the batch."""
    cfg, loaded = _model("qwen2_5_vl")
    extra = {}
    for batch in (1, 4):
        samples = bench.bench_samples(cfg, batch)
        pruner = make_pruner("visionzip", keep=0.33, protocol="uniform")
        stock = bench.count_generate(loaded, loaded.prepare(samples), None, DECODE_TOKENS)
        pruned = bench.count_generate(loaded, prepare(loaded, samples, pruner), pruner, DECODE_TOKENS)
        assert pruned["vision_kernels"] == stock["vision_kernels"]
        extra[batch] = pruned["vision_syncs"] - stock["vision_syncs"]
    assert extra[1] == extra[4] <= 3, extra
