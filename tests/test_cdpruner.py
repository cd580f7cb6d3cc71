"""CDPruner: the official LLaVA-1.5 path against an independent oracle (tests/oracle_cdpruner.py), the engine's
contracts (keep-all identity, batch = single, cached decode = recomputation), the CLIP checkpoint rules and
the CLI on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import oracle_cdpruner as oracle
import pytest
import torch
from helpers import batch_matches_alone, cached_vs_recomputed, noise_image, samples
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clse_exp import load_model, make_pruner
from clse_exp.data.prompts import SHORT_ANSWER
from clse_exp.data.sample import Sample
from clse_exp.efficiency.accounting import run_costs, sample_costs
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.methods.base import ModelFacts
from clse_exp.pruning.methods.cdpruner import (
    LLAVA15_CLIP,
    _load_clip,
    fast_map,
    instruction,
    resolve_clip,
    text_embeds,
    tiny_clip,
)

# LLaVA-1.5's shape (conf/model/tiny_llava15.yaml: 32 layers, 576 visual tokens, kv heads = heads), 256 wide:
# the kernel's rank is at most the projector width, and T = 192 needs more than 192 (4096 in LLaVA-1.5-7B).
LLAVA_576_WIDE = {"name": "tiny_llava15_w256", "family": "llava", "path": None, "dtype": "float32",
                  "attn_implementation": "sdpa",
                  "tiny": {"num_layers": 32, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
                           "num_kv_heads": 4, "vision_depth": 2, "image_size": 336, "seed": 0}}
# longer than one 77-token segment of the byte-level tiny CLIP tokenizer; the answer line is stripped
QUESTION = ("What colour is the shape in the top left cell, and is it larger than the shape next to it on the "
            "right?" + SHORT_ANSWER)


def save_clip(loaded, path, tower: bool = True) -> str:
    """A tiny CLIP checkpoint on disk (model and tokenizer) whose vision tower is the model's own (`tower`)."""
    clip, tokenizer = tiny_clip(loaded.model.config.vision_config)
    if tower:
        clip.vision_model.load_state_dict(loaded.model.model.vision_tower.state_dict())
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    loaded = load_model(LLAVA_576_WIDE, "cpu")
    post = loaded.model.model.vision_tower.post_layernorm  # unused by LLaVA itself; CDPruner's relevance reads it
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        post.weight.copy_(1 + 0.5 * torch.randn(post.weight.shape, generator=generator))
        post.bias.copy_(0.5 * torch.randn(post.bias.shape, generator=generator))
    clip_dir = save_clip(loaded, tmp_path_factory.mktemp("clip"))
    sample = Sample("s", QUESTION, "", [noise_image(7, 336)])
    return loaded, clip_dir, sample


def run(loaded, sample_list, pruner) -> tuple[list[list[list[int]]], torch.Tensor]:
    inputs = prepare(loaded, sample_list, pruner)
    with torch.no_grad(), pruner.attach(loaded.model):
        logits = loaded.model(**inputs).logits[:, -1]
    return [stage["kept"] for stage in pruner.trace], logits


@pytest.mark.parametrize("count", [192, pytest.param(128, marks=pytest.mark.slow), 64])
def test_official_keeps_the_oracle_tokens_with_its_logits(wide, count):
    loaded, clip_dir, sample = wide
    expected = oracle.cdpruner(loaded, loaded.prepare([sample]), clip_dir, sample.question, count)
    pruner = make_pruner("cdpruner", keep=count / 576, budget="final", clip=clip_dir)
    kept, logits = run(loaded, [sample], pruner)
    assert [stage[0] for stage in kept] == expected.kept and len(expected.kept[0]) == count
    torch.testing.assert_close(logits[0], expected.logits, atol=1e-4, rtol=1e-4)
    assert pruner.rules.prefill == "compact" and pruner.layers.prune_layers == (0,)


def test_average_budget_is_the_final_count(wide):
    """The cut is at the LLM input, so every layer sees T tokens: keep=T/N means T under both budgets."""
    loaded, clip_dir, _ = wide
    for budget in ("average", "final"):
        assert make_pruner("cdpruner", keep=192 / 576, budget=budget, clip=clip_dir).bind(
            loaded.adapter.facts(loaded.model.config)).plan(576) == {0: 192}


@pytest.mark.slow
def test_uniform_keeps_the_same_tokens_at_their_original_positions(wide):
    loaded, clip_dir, sample = wide
    official = run(loaded, [sample], make_pruner("cdpruner", keep=64 / 576, budget="final", clip=clip_dir))
    uniform = run(loaded, [sample], make_pruner("cdpruner", keep=64 / 576, budget="final", clip=clip_dir,
                                                protocol="uniform"))
    assert official[0] == uniform[0]
    assert (official[1] - uniform[1]).abs().max() > 1e-3


@pytest.mark.parametrize("protocol", ["official", pytest.param("uniform", marks=pytest.mark.slow)])
def test_batch_equals_batch_of_one(protocol):
    loaded = load_model("tiny_llava", "cpu")
    batch = samples(3, images_per_sample=(1, 2, 1))  # different prompt lengths and image counts
    pruner = make_pruner("cdpruner", keep=0.3, protocol=protocol)
    together = batch_matches_alone(loaded, batch, pruner, steps=3)[0]
    assert [len(kept) for kept in together] == [19, 38, 19]


def test_clip_work_is_counted_apart_as_torch_counts_it(wide):
    """The record's aux_flops: CLIP's text tower over every 77-token segment plus the visual projection of the
    patches, equal to torch's FlopCounterMode over the same calls (eager attention, so both products count)."""
    loaded, clip_dir, sample = wide
    pruner = make_pruner("cdpruner", keep=64 / 576, budget="final", clip=clip_dir)
    run(loaded, [sample], pruner)
    parts = _load_clip(clip_dir, "", "cpu")
    parts.text_model.config._attn_implementation = "eager"
    patches = torch.randn(576, parts.visual_projection.in_features)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        text = text_embeds(parts, instruction(sample.question), torch.device("cpu"))
        parts.visual_projection(parts.post_layernorm(patches))
    assert text.shape[0] == 2  # the question spans two segments
    assert pruner.records[0].aux_flops == counter.get_total_flops() > 0
    costs = run_costs([{**sample_costs(loaded.model.config, pruner.records[0], torch.float32),
                        "aux_flops": pruner.records[0].aux_flops}])
    assert costs["flops_ratio_with_aux"] > costs["flops_ratio"]
    assert "aux_tflops_per_sample" not in run_costs([sample_costs(loaded.model.config, pruner.records[0],
                                                                  torch.float32)])


@pytest.mark.parametrize("protocol", ["official", pytest.param("uniform", marks=pytest.mark.slow)])
def test_cached_decode_equals_recomputation(protocol):
    loaded = load_model("tiny_llava", "cpu")
    pruner = make_pruner("cdpruner", keep=0.3, protocol=protocol)
    cached, recomputed = cached_vs_recomputed(loaded, prepare(loaded, samples(3), pruner), pruner)
    torch.testing.assert_close(cached, recomputed, atol=2e-4, rtol=1e-4)


def test_greedy_without_rank_to_spare():
    """Tokens 2 and 3 repeat tokens 0 and 1 (relevance 1, 1, 1/2, 1/4): after two picks no gain is left.
    The official loop divides by sqrt(0), its NaN row makes the next argmax re-pick token 0, and the mask keeps 3
    tokens for T = 4; uniform fills the rest by relevance."""
    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([1.0, 1.0, 0.5, 0.25])
    kernel = r[:, None] * (unit @ unit.T) * r[None, :]
    assert fast_map(kernel, 4)[:3].tolist() == [0, 1, 2] and fast_map(kernel, 4)[3] == 0
    assert fast_map(kernel, 4, fill=r).tolist() == [0, 1, 2, 3]
    assert fast_map(kernel, 2, fill=r).tolist() == fast_map(kernel, 2).tolist() == [0, 1]


@pytest.mark.slow
def test_uniform_keeps_exactly_k_when_the_kernel_rank_runs_out():
    loaded = load_model("tiny_llava", "cpu")  # projector width 64 < 96 tokens kept of 2 x 64
    batch = samples(2, images_per_sample=(2,))
    kept = {protocol: run(loaded, batch, make_pruner("cdpruner", keep=0.75, budget="final", protocol=protocol))[0][0]
            for protocol in ("official", "uniform")}
    assert [len(set(k)) for k in kept["uniform"]] == [96, 96]
    assert all(len(k) < 96 for k in kept["official"])  # the official mask collapses its repeated picks


def test_clip_checkpoints(wide, tmp_path):
    """`auto` names LLaVA-1.5's CLIP for its tower and the stand-in for tiny towers, and refuses other towers;
    a checkpoint whose vision tower is not the model's is refused."""

    def tower(width: int) -> nn.ModuleList:
        layer = nn.Module()
        layer.layer_norm1 = nn.LayerNorm(width)
        return nn.ModuleList([layer])

    assert resolve_clip("auto", tower(1024), 24) == LLAVA15_CLIP
    assert resolve_clip("auto", tower(32), 24) == "tiny"
    assert resolve_clip("some/clip", tower(1152), 27) == "some/clip"
    with pytest.raises(ConfigError, match="prune.clip=auto knows LLaVA-1.5's CLIP only"):
        resolve_clip("auto", tower(1152), 27)
    loaded, _, sample = wide
    other = save_clip(loaded, tmp_path / "other", tower=False)
    with pytest.raises(ConfigError, match="is not the CLIP checkpoint this model's vision tower came from"):
        run(loaded, [sample], make_pruner("cdpruner", keep=0.25, clip=other))
    with pytest.raises(ConfigError, match="is not a loadable CLIP checkpoint"):
        run(loaded, [sample], make_pruner("cdpruner", keep=0.25, clip=str(tmp_path / "missing")))


def test_needs_the_questions_and_a_llava_model():
    loaded = load_model("tiny_llava", "cpu")
    pruner = make_pruner("cdpruner", keep=0.3)
    with pytest.raises(RuntimeError, match="generation.prepare"), torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**loaded.prepare(samples(1)))
    with pytest.raises(ConfigError, match="supports model families: llava"):
        make_pruner("cdpruner", keep=0.3).bind(ModelFacts("qwen2_vl", 28, True))
    with pytest.raises(ConfigError, match="prune.clip"):
        make_pruner("cdpruner", keep=0.3, clip=" ")


@pytest.mark.slow
def test_cli_runs_on_the_tiny_llava(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clse_exp", "model=tiny_llava", "prune=cdpruner", "keep=0.22",
                             "dataset.limit=2", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "CDPruner CLIP: tiny" in result.stderr + (tmp_path / "clse_exp.log").read_text()
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["n_visual"], len(r["kept"])) for r in records] == [(64, 14), (64, 14)]
    efficiency = json.loads((tmp_path / "summary.json").read_text())["efficiency"]
    assert all(r["aux_flops"] > 0 for r in records)
    assert efficiency["flops_ratio_with_aux"] > efficiency["flops_ratio"] and efficiency["aux_tflops_per_sample"] > 0
