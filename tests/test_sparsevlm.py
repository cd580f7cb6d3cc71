"""SparseVLM v1.5 against an independent oracle of its official code (tests/oracle_sparsevlm.py), plus its count
rules, the uniform protocol, batching and decoding.

Budgets: `keep * 576` is the official equivalent-token budget; 192/128/64 use the official per-stage tables
(Gumpest/SparseVLMs@734d900 llava/model/language_model/score.py:5-15) and recycle int(m2 / 10) + 1 clusters on
top, so the stages hold 309/204/113, 312/117/39 and 82/32/18 visual tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import official_oracles
import oracle_sparsevlm
import pytest
import torch
from helpers import cached_vs_recomputed, greedy, noise_image, samples

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.pruning.methods.base import Layers, ModelFacts
from clse_exp.pruning.methods.sparsevlm import SparseVLM, announce_rank_rule, dpc_knn_merge, split_exact

LLAVA_FACTS = ModelFacts("llava", 32)
SEED = 0


def generator_noise(stage: int, v_token_num: int, m: int) -> torch.Tensor:
    """The density noise drawn as the method draws it: a generator seeded by (seed, stage, current visual
    count) (StageContext.generator), in place of the official global RNG."""
    gen = torch.Generator().manual_seed(SEED * 1_000_003 + stage * 10_007 + v_token_num)
    return torch.rand(m, generator=gen) * 1e-6


def no_noise(_stage: int, _v: int, m: int) -> torch.Tensor:
    return torch.zeros(m)


def run_with_layer_inputs(loaded, inputs, pruner, layers: tuple[int, ...]):
    """(last logits, {layer: its input as the engine hands it}, position ids per layer) of one pruned forward."""
    decoder = loaded.adapter.decoder_layers(loaded.model)
    seen = {}

    def hook(index):
        def fn(_module, args, kwargs):
            seen[index] = (args[0], kwargs.get("position_ids"))
        return fn

    with torch.no_grad(), pruner.attach(loaded.model):
        handles = [decoder[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
        try:
            logits = loaded.model(**inputs).logits[:, -1]
        finally:
            for handle in handles:
                handle.remove()
    return logits, seen


@pytest.mark.parametrize(("budget", "sizes", "printed"), [
    (192, [309, 204, 113], 192.03125), (128, [312, 117, 39], 128.625), (64, [82, 32, 18], 64.8125),
])
def test_official_stages_match_the_oracle(llava576, budget, sizes, printed):
    loaded, inputs, x = llava576
    assert x.n_visual == 576
    pruner = make_pruner("sparsevlm", keep=budget / 576)
    logits, seen = run_with_layer_inputs(loaded, inputs, pruner, (3, 7, 16))
    expected = oracle_sparsevlm.sparsevlm(loaded, x, budget, generator_noise)
    assert pruner.layers.prune_layers == (3, 7, 16)
    assert [s["budget"][0] for s in pruner.trace] == oracle_sparsevlm.SPARSE_TOKEN_DICT[budget]
    kept = [s["kept"][0] for s in pruner.trace]
    assert [len(k) for k in kept] == sizes
    assert kept == expected.kept  # kept tokens in order, then each cluster's centre in centre order
    for layer, sequence in expected.sequences.items():  # the kept and merged rows, as the next layer sees them
        torch.testing.assert_close(seen[layer][0], sequence, atol=1e-4, rtol=1e-4)
        assert seen[layer][1][0].tolist() == list(range(sequence.shape[1]))  # renumbered contiguously
    torch.testing.assert_close(logits[0], expected.logits, atol=1e-4, rtol=1e-4)
    # the official "equal token num": each layer's visual count after its own cut, averaged over 32 layers
    per_layer = pruner.records[0].visual_per_layer
    assert sum([*per_layer[1:], per_layer[-1]]) / 32 == printed
    if budget == 192:  # the density noise breaks no tie here: the kept sets do not depend on its draw
        assert oracle_sparsevlm.sparsevlm(loaded, x, budget, no_noise).kept == expected.kept


@pytest.fixture(scope="module")
def video_llava():
    """Video-LLaVA at 32 layers, MHA (as the official LLaMA), 8 frames of 8 x 8 patches plus their CLS tokens."""
    loaded = load_model({"name": "tiny_video_llava_mha", "family": "video_llava", "path": None, "dtype": "float32",
                         "attn_implementation": "eager",
                         "tiny": {"num_layers": 32, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                                  "num_kv_heads": 4, "vision_depth": 2, "image_size": 112, "seed": 0}}, "cpu")
    loaded.model.set_attn_implementation("eager")
    frames = [noise_image(40 + i, 112) for i in range(8)]
    inputs = loaded.prepare([Sample("v", "What happens in the video? Describe the motion.", "", [], video=frames)])
    return loaded, inputs, official_oracles.stock_inputs(loaded, inputs, frame_tokens=65)


def test_video_rank_rule_matches_the_video_branch(video_llava):
    """SVvid@f05b898: one cut after layer 1, rank(rater x visual attention) kept, then recycling."""
    loaded, inputs, x = video_llava
    assert x.n_visual == 512
    pruner = make_pruner("sparsevlm", keep=0.5, count_rule="rank")
    logits, seen = run_with_layer_inputs(loaded, inputs, pruner, (2,))
    expected = oracle_sparsevlm.sparsevlm_video(loaded, x, generator_noise)
    assert pruner.layers.prune_layers == (2,)
    kept = pruner.trace[0]["kept"][0]
    rank, clusters = len(expected.kept[0]) - 16, 16  # int((int(0.3 * (512 - rank)) + 1) / 10) + 1 = 16
    assert 0 < rank < 20 and kept == expected.kept[0]
    assert pruner.records[0].visual_per_layer[2] == rank + clusters
    torch.testing.assert_close(seen[2][0], expected.sequences[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[0], expected.logits, atol=1e-4, rtol=1e-4)


def test_count_rule_is_checked_and_announced_once(caplog):
    with pytest.raises(ConfigError, match=r"prune.count_rule='rnk'.*table, rank"):
        make_pruner("sparsevlm", keep=0.5, count_rule="rnk")
    announce_rank_rule.cache_clear()
    with caplog.at_level("WARNING"):
        make_pruner("sparsevlm", keep=0.5, count_rule="rank")
        make_pruner("sparsevlm", keep=0.3, count_rule="rank")
    assert caplog.text.count("keep sets no count") == 1


@pytest.mark.parametrize("seed", range(6))
def test_dpc_knn_matches_the_official_clustering(seed):
    gen = torch.Generator().manual_seed(seed)
    m = [1, 7, 31, 83, 154, 60][seed]
    clusters = int(m / 10) + 1
    x = torch.randn(m, 16, generator=gen) * (1 + seed)
    if seed == 5:
        x[10:20] = x[0]  # duplicates: equal densities, decided by the noise
    noise = torch.rand(m, generator=gen) * 1e-6
    means, centres = dpc_knn_merge(x, clusters, noise)
    want_means, want_centres = oracle_sparsevlm.cluster_and_merge(x[None], clusters, noise)
    assert centres.tolist() == want_centres.tolist()
    torch.testing.assert_close(means, want_means[0], atol=1e-6, rtol=1e-5)


def test_official_counts():
    method = SparseVLM()
    layers = method.default_layers(LLAVA_FACTS)
    assert layers == Layers(0, (3, 7, 16))
    for budget, row in oracle_sparsevlm.SPARSE_TOKEN_DICT.items():
        assert method.official_counts(576, budget / 576, "average", layers, LLAVA_FACTS) == row
    # other budgets: the table fractions, linear in keep between the budgets (0.22 lies between 64 and 128)
    low, high = (method.official_counts(576, b / 576, "average", layers, LLAVA_FACTS) for b in (64, 128))
    between = method.official_counts(576, 0.22, "average", layers, LLAVA_FACTS)
    assert all(a <= c <= b for a, b, c in zip(low, high, between, strict=True)) and between != high
    # a small image: the fractions of 576, capped at v - 1 of the current (kept + merged) count
    assert method.official_counts(64, 192 / 576, "average", layers, LLAVA_FACTS) == [33, 22, 12]
    assert method.official_counts(4, 0.9, "average", layers, LLAVA_FACTS) == [3, 3, 3]
    # Qwen2-VL's 28 layers: the cuts at the same fractions of the depth
    assert method.default_layers(ModelFacts("qwen2_vl", 28, True)) == Layers(0, (3, 6, 14))
    # elsewhere the planner's counts apply
    assert method.official_counts(576, 0.3, "average", Layers(0, (2, 8)), LLAVA_FACTS) is None


def test_budgets_it_cannot_express_fail_at_bind():
    with pytest.raises(ConfigError, match="budget=final needs protocol=uniform"):
        make_pruner("sparsevlm", keep=0.2, budget="final", model="tiny_llava")
    with pytest.raises(ConfigError, match="must start at 1"):
        make_pruner("sparsevlm", keep=0.5, prune_layers=[0, 8], protocol="uniform", model="tiny_llava")
    make_pruner("sparsevlm", keep=0.2, budget="final", protocol="uniform", model="tiny_llava")


def test_uniform_split_is_exact():
    for visual in (2, 9, 64, 576):
        for total in range(1, visual):
            kept, clusters = split_exact(total, visual)
            assert kept + clusters == total
            official = int((int((visual - kept) * 0.3) + 1) / 10) + 1
            assert clusters == official or (kept == 0 and clusters < official)


def test_keep_all_is_identity(tiny_llava):
    inputs = tiny_llava.prepare(samples(3))
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        stock = tiny_llava.model(**inputs).logits
        for protocol in ("official", "uniform"):
            with make_pruner("sparsevlm", keep=1.0, protocol=protocol).attach(tiny_llava.model):
                pruned = tiny_llava.model(**inputs).logits
            torch.testing.assert_close(pruned[valid], stock[valid], atol=1e-5, rtol=1e-5)


def test_uniform_counts_are_exact_and_positions_original(tiny_llava):
    """uniform: each stage holds exactly the planner's count (kept + merged), every token keeps its original
    position, and a cluster mean sits at its centre's."""
    loaded = tiny_llava
    inputs = loaded.prepare(samples(1))
    for budget in ("average", "final"):
        pruner = make_pruner("sparsevlm", keep=0.22, budget=budget, protocol="uniform")
        _, seen = run_with_layer_inputs(loaded, inputs, pruner, (16,))
        n = pruner.records[0].n_visual
        assert [len(s["kept"][0]) for s in pruner.trace] == list(pruner.plan(n).values())
        positions = seen[16][1][0]
        segment = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"])[0][0]
        visual = torch.tensor(segment.positions)
        assert bool((positions.diff() > 0).all()) and positions.max() == inputs["input_ids"].shape[1] - 1
        assert torch.isin(visual[sorted(pruner.trace[-1]["kept"][0])], positions).all()


@pytest.mark.slow
def test_batch_matches_single_on_qwen2vl():
    """Per-sample raters, counts and noise: a sample prunes and answers alike alone and in a padded batch
    (tests/test_engine.py checks the same on tiny_llava for every method, both protocols)."""
    loaded = load_model("tiny_qwen2vl", "cpu")
    batch = samples(3, images_per_sample=(1, 2, 1), sizes=(224, 168, 224))
    pruner = make_pruner("sparsevlm", keep=0.3)
    with torch.no_grad(), pruner.attach(loaded.model):
        together = loaded.model(**loaded.prepare(batch)).logits[:, -1]
        kept = [s["kept"] for s in pruner.trace]
        assert all(len(k) > s["budget"][b] for s in pruner.trace for b, k in enumerate(s["kept"]))  # recycled
        for i, sample in enumerate(batch):
            alone = loaded.model(**loaded.prepare([sample])).logits[0, -1]
            assert [s["kept"][0] for s in pruner.trace] == [k[i] for k in kept]
            torch.testing.assert_close(together[i], alone, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava"])
def test_cached_decode_matches_recompute(name):
    loaded = load_model(name, "cpu")
    inputs = loaded.prepare(samples(3))
    cached, recomputed = cached_vs_recomputed(loaded, inputs, make_pruner("sparsevlm", keep=0.3))
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)
    assert greedy(loaded, inputs, make_pruner("sparsevlm", keep=0.3), steps=2)[0].shape == (3, 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llava", "tiny_qwen2vl"])
def test_runs_from_the_cli(tmp_path, model):
    result = subprocess.run([sys.executable, "-m", "clse_exp", f"model={model}", "prune=sparsevlm", "keep=0.22",
                             "dataset.limit=3", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_samples"] == 3 and 0.15 < summary["retention"]["average"] < 0.3
