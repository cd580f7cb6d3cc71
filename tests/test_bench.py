"""`python -m clse_exp.bench`: tables, the ideal pruned prefill and its overhead split, the presets, and the CUDA
timing paths (driven here by fake CUDA events). No timing is asserted: CI machines are noisy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import noise_image, samples
from omegaconf import OmegaConf

from clse_exp import load_model, make_pruner
from clse_exp.bench import OVERHEAD, build_model, model_spec, validate
from clse_exp.config import CONF_DIR
from clse_exp.data.sample import Sample
from clse_exp.efficiency import memory, timing
from clse_exp.efficiency.ideal import IdealUnavailable, Segments, ideal_text_model, segments_from_trace
from clse_exp.errors import ConfigError

SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=4", "model.num_kv_heads=2",
         "visual_tokens=64", "repeats=2", "warmup=0", "decode_tokens=2"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # small ops stall at OpenMP barriers on a loaded CPU


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_bench(tmp_path, *overrides):
    args = [sys.executable, "-m", "clse_exp.bench", f"hydra.run.dir={tmp_path}", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    return json.loads((tmp_path / "bench.json").read_text())


def preset(name: str, *overrides: str):
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "bench.yaml"), OmegaConf.load(CONF_DIR / "bench_preset" /
                                                                                   f"{name}.yaml"),
                           OmegaConf.from_dotlist(list(overrides)))


@pytest.mark.slow  # a bench subprocess (CI runs it with the slow tests)
def test_bench_tables_carry_ideal_times_and_an_overhead_split_that_sums(tmp_path):
    out = run_bench(tmp_path, *SMALL, "methods=[clse,fastv]", "keeps=[0.1,0.33]", "batch_sizes=[1,2]",
                    "memory_budget_gb=1")
    assert [(t["batch_size"], t["attn_implementation"]) for t in out["tables"]] == [(1, "sdpa"), (2, "sdpa")]
    for table in out["tables"]:
        rows = {(r["method"], r["keep"]): r for r in table["rows"]}
        assert rows[("none", 1.0)]["prefill_time_ratio"] == 1.0
        assert "0.166667" in rows[("fastv", 0.1)]["skipped"]  # K=2 of 12 layers cannot average 0.1
        for key in (("none", 1.0), ("clse", 0.1), ("clse", 0.33), ("fastv", 0.33)):
            row = rows[key]
            assert abs(row["retention_average"] - key[1]) < 0.02
            assert 0 < row["flops_ratio"] <= 1 and 0 < row["kv_ratio"] <= 1
            assert row["ideal_s"] > 0 and row["ideal_time_ratio"] > 0 and row["decode_tokens_per_s"] > 0
            total, *parts = (row[k] for k in OVERHEAD)
            assert total == pytest.approx(sum(parts), abs=1e-12)
            # measured parts nest: stages and per-layer kwargs run inside the hook bodies
            assert row["masks_gathers"] >= 0 and row["hooks"] >= 0 and row["scoring"] >= 0
            if key[0] != "none":
                assert row["scoring"] > 0 and row["masks_gathers"] > 0
        assert rows[("clse", 0.1)]["kv_ratio"] < rows[("clse", 0.33)]["kv_ratio"] < 1
        # the analytic batch that fits 1 GiB grows as the KV cache shrinks
        assert rows[("none", 1.0)]["max_batch"] < rows[("clse", 0.33)]["max_batch"] < rows[("clse", 0.1)]["max_batch"]
    assert (tmp_path / "bench.png").stat().st_size > 0
    text = (tmp_path / "bench.md").read_text()
    assert "| clse | 0.1 |" in text and "batch 2" in text and "| decode and KV" in text


@pytest.mark.slow
def test_llava_bench_feeds_clip_sized_images_to_the_clip_methods(tmp_path):
    out = run_bench(tmp_path, *SMALL, "model.family=llava", "methods=[visionzip,prumerge_plus]", "keeps=[0.33]",
                    "repeats=1", "ideal=false")
    table = out["tables"][0]
    assert "random llava" in table["header"] and "| 64 visual +" in table["header"]
    rows = {row["method"]: row for row in table["rows"]}
    assert rows["visionzip"]["retention_average"] == rows["prumerge_plus"]["retention_average"] == 21 / 64


@pytest.mark.slow
def test_gpu_preset_runs_on_cpu_at_reduced_width(tmp_path):
    out = run_bench(tmp_path, "+bench_preset=qwen2vl_7b", "model.scale=0.0625", "visual_tokens=16",
                    "methods=[clse,visionzip,prumerge_plus]", "keeps=[0.33]", "batch_sizes=[1,2]", "repeats=1",
                    "warmup=0", "decode_tokens=2", "device=cpu")
    assert out["config"]["attn_implementations"] == ["sdpa", "flash_attention_2"]
    assert [t["batch_size"] for t in out["tables"]] == [1, 2]
    assert any("flash_attention_2: not measured" in note for note in out["notes"])
    for table in out["tables"]:
        assert "hidden 224, 28 layers, 28/4 heads" in table["header"] and "bfloat16" in table["header"]
        rows = {r["method"]: r for r in table["rows"]}
        assert "'qwen2_vl' is not supported" in rows["prumerge_plus"]["skipped"]  # reads the CLIP encoder
        for method in ("clse", "visionzip"):
            assert 0 < rows[method]["flops_ratio"] < 1 and rows[method]["ideal_s"] > 0
        assert rows["none"]["max_batch"] > 0


def test_video_prompts_count_the_video_baselines(tmp_path):
    """`frames`: one clip per prompt; the video baselines get rows, and the header says what the LLM saw."""
    out = run_bench(tmp_path, "+bench_preset=llava_onevision_7b", "model.scale=0.0625", "visual_tokens=16",
                    "frames=4", "model.dtype=float32", "methods=[vidcom2,dycoke]", "keeps=[0.25]",
                    "batch_sizes=[1,2]", "repeats=0", "warmup=0", "decode_tokens=2", "device=cpu",
                    "attn_implementations=[sdpa]")
    for table in out["tables"]:
        assert "64 visual (4 frames)" in table["header"]
        rows = {r["method"]: r for r in table["rows"]}
        assert set(rows) == {"none", "vidcom2", "dycoke"}
        assert rows["vidcom2"]["prefill_kernels"] > rows["none"]["prefill_kernels"]
    syncs = [{r["method"]: r["prefill_syncs"] for r in t["rows"]} for t in out["tables"]]
    assert syncs[0] == syncs[1]


def test_gpu_preset_at_full_scale_is_qwen2_vl_7b_sized():
    """Built on the meta device (no memory): the text model has Qwen2-VL-7B's 7.6B parameters."""
    loaded = build_model(preset("qwen2vl_7b"), torch.device("meta"))
    text = sum(p.numel() for name, p in loaded.model.named_parameters() if not name.startswith("model.visual"))
    config = loaded.model.config.get_text_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert text == pytest.approx(7.6156e9, rel=1e-3)
    assert loaded.model.dtype == torch.bfloat16


def test_scale_keeps_heads_and_depth_and_refuses_too_narrow_heads():
    spec = model_spec(preset("qwen2vl_7b").model, 224)
    assert (spec["hidden_size"], spec["num_heads"], spec["num_layers"]) == (3584, 28, 28)
    small = model_spec(preset("qwen2vl_7b", "model.scale=0.0625").model, 224)
    assert (small["hidden_size"], small["intermediate_size"], small["num_heads"]) == (224, 1184, 28)
    with pytest.raises(ConfigError, match=r"model.scale=0.03"):
        model_spec(preset("qwen2vl_7b", "model.scale=0.03").model, 224)


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava"])
def test_ideal_forward_gives_the_engine_logits_and_the_stock_logits_unpruned(name, one_thread):
    """The ideal forward is an independent plain loop over the stock layers: on the tokens a uniform-protocol
    run kept, it must produce that run's logits; with no cut, the stock model's."""
    loaded = load_model(name, "cpu")
    inputs = loaded.prepare([Sample("s", "Describe it.", "", [noise_image(3, 224)])] * 2)
    text_model = loaded.adapter.text_model(loaded.model)
    grids = {k: inputs[k] for k in ("image_grid_thw",) if k in inputs}
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], **grids)
    with torch.no_grad():
        stock = loaded.model(**inputs).logits[:, -1]
        with ideal_text_model(text_model, Segments(), loaded.adapter.mrope):
            torch.testing.assert_close(loaded.model(**inputs).logits[:, -1], stock, rtol=0, atol=1e-6)
        for method in ("random", "clse", "pdrop"):
            pruner = make_pruner(method, keep=0.33, protocol="uniform")
            with pruner.attach(loaded.model):
                pruned = loaded.model(**inputs).logits[:, -1]
            segments = segments_from_trace(pruner.trace, layout, inputs["input_ids"].shape[1], pruner.records)
            assert len(segments.starts) == len(pruner.trace)
            assert segments.rows[-1].shape[1] < inputs["input_ids"].shape[1]
            with ideal_text_model(text_model, segments, loaded.adapter.mrope):
                ideal = loaded.model(**inputs).logits[:, -1]
            assert (pruned - stock).abs().max() > 1e-4
            torch.testing.assert_close(ideal, pruned, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(text_model)  # the stock forward is back


def test_ideal_forward_refuses_padded_batches(one_thread):
    loaded = load_model("tiny_qwen2vl", "cpu")
    inputs = loaded.prepare(samples(2))  # different prompt lengths: left padding
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"])
    pruner = make_pruner("random", keep=0.33, protocol="uniform")
    with torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**inputs)
    with pytest.raises(IdealUnavailable):
        segments_from_trace(pruner.trace, layout, inputs["input_ids"].shape[1], pruner.records)
    with pytest.raises(IdealUnavailable, match="unpadded"), torch.no_grad():
        with ideal_text_model(loaded.adapter.text_model(loaded.model), Segments(), True):
            loaded.model(**inputs)


class FakeEvent:
    """A CUDA event stand-in: records the host clock; elapsed_time in milliseconds, like torch.cuda.Event."""

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1000.0


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = {"synchronize": 0, "reset": 0}

    def count(name: str):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", count("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", count("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *_: 123 * 2**20)
    return calls


def test_cuda_timing_uses_events_and_synchronizes_only_to_read_them(fake_cuda):
    """GenerationTimer on a CUDA device marks phases with events (no sync while the model runs) and
    synchronizes once per span when reading them; time_calls with a CUDA clock syncs around each call."""
    cuda = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with timing.GenerationTimer(model, [model[0]], cuda) as timer:
        for _ in range(3):  # prefill and two decode steps
            model(torch.zeros(1, 4))
        time.sleep(0.01)
        assert fake_cuda["synchronize"] == 0
    assert fake_cuda["synchronize"] == 6  # 3 forward spans + 3 vision spans, each read after a sync
    assert timer.prefill_s > 0 and timer.decode_s_per_token > 0 and timer.vision_s > 0
    assert timer.prefill_end_host <= time.perf_counter()

    class Owner:
        def work(self, x: int) -> int:
            return x + 1

    owner, log = Owner(), []
    with timing.time_calls(owner, "work", log, timing.Clock(cuda)):
        assert owner.work(1) == 2 and owner.work(2) == 3
    assert len(log) == 2 and fake_cuda["synchronize"] == 6 + 4
    assert "work" not in vars(owner)
    memory.reset_peak(cuda)
    assert fake_cuda["reset"] == 1 and memory.peak_memory_bytes(cuda) == 123 * 2**20


def test_time_calls_times_the_callables_a_factory_returns():
    class Owner:
        def make(self, k: int):
            return lambda x: x * k

    owner, log = Owner(), []
    with timing.time_calls(owner, "make", log, of_result=True):
        double = owner.make(2)
        assert not log
        assert double(3) == 6 and double(4) == 8
    assert len(log) == 2 and all(seconds >= 0 for _, seconds in log)


@pytest.mark.parametrize(("override", "fragment"), [
    ("repeats=-1", "repeats=-1"), ("repeats=0 counts=false", "measures nothing"), ("warmup=-1", "warmup=-1"),
    ("batch_sizes=[0]", "batch_sizes=[0]"),
    ("batch_sizes=1", "must be a list"), ("images=0", "images=0"), ("methods=[foo]", "'foo'"),
    ("keeps=[1.5]", "keep=1.5"), ("protocol=paper", "'paper'"), ("model.scale=0", "model.scale=0"),
    ("memory_budget_gb=-1", "memory_budget_gb=-1"), ("attn_implementations=[flashy]", "'flashy'"),
    ("model.family=internvl", "'internvl'.*qwen2_vl, qwen2_5_vl, qwen3_vl, llava"),
    ("frames=-1", "frames=-1 must be >= 0"), ("frames=4 model.family=llava", "frames=4 with model.family=llava"),
    ("model.family=llava_onevision", "benched on videos only.*frames=8"),
    ("frames=4 images=2", "images=2 with frames=4"),
    ("methods=[holitom]", "holitom prunes videos only: bench videos with frames"),
])
def test_bad_bench_settings_are_one_line_before_a_model_is_built(override, fragment):
    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "bench.yaml"), OmegaConf.from_dotlist(override.split()))
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        validate(cfg)


def test_presets_validate():
    for name in ("overhead", "decode", "qwen2vl_7b", "llava15_7b", "llava_onevision_7b"):
        cfg = preset(name, "device=cpu")
        validate(cfg)
    assert preset("decode").images * preset("decode").visual_tokens >= 4096
