"""HoliTom's uniform port to Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the outer merge against a direct reference written
here (the temporal steps' own attention recomputed in plain torch from the tower's last block, or the embedding
stand-in on Qwen3-VL; windows, DPC-kNN and the cluster merge from the independent official transcription
tests/oracle_holitom.py; the uniform count rule written out), the inner merge and the M-RoPE positions it keeps
against a plain-torch replay of the pruned run's own layer input, batching, refusals and the CLI."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys

import numpy as np
import oracle_holitom as oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import batch_matches_alone, noise_image
from official_oracles import last_row_attention, stock_inputs
from PIL import Image
from transformers.vision_utils import get_vision_window_index

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare

QWEN = ("tiny_qwen2vl", "tiny_qwen2_5vl", "tiny_qwen3vl")
FAMILY = {"tiny_qwen2vl": "qwen2_vl", "tiny_qwen2_5vl": "qwen2_5_vl", "tiny_qwen3vl": "qwen3_vl"}
TAU = 0.9  # the tiny towers map an unchanged patch to the same embedding: static tokens reach cosine 1


def video(steps: tuple[int, ...] = (2, 2, 1), size: int = 168) -> list:
    """Groups of temporal steps (2 identical frames each, Qwen's temporal patch) sharing a noise image whose
    top-left corner changes every step: static tokens within a group, dynamic ones in the corner."""
    frames = []
    for g, count in enumerate(steps):
        base = np.array(noise_image(70 + g, size))
        for i in range(count):
            frame = base.copy()
            frame[:56, :56] = np.random.default_rng(10 * g + i).integers(0, 256, (56, 56, 3))
            frames += [Image.fromarray(frame)] * 2
    return frames


@pytest.fixture(scope="module", params=QWEN)
def qwen(request):
    loaded = load_model(request.param, "cpu")
    inputs = prepare(loaded, [Sample("v", "What moves?", "", [], video=video())], None)
    return loaded, inputs, stock_inputs(loaded, inputs)


def grid(loaded, inputs) -> tuple[int, int]:
    """(temporal steps, merged tokens per step) of the one video."""
    t, h, w = inputs["video_grid_thw"][0].tolist()
    merge = loaded.model.config.vision_config.spatial_merge_size
    return t, h * w // merge**2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def step_attention(loaded, inputs, steps: int, tokens: int) -> torch.Tensor:
    """[F, P] directly: the last vision block's input captured from a stock encoder call, its queries and keys
    rotated in float32, per temporal step the softmax over the step's rows, mean over heads and queries, then
    each merged token the mean of its rows (Qwen2.5-VL's rows follow its window index)."""
    visual = loaded.model.model.visual
    block = visual.blocks[-1]
    seen = {}

    def hook(_module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], rope=kwargs["position_embeddings"])

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        loaded.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        handle.remove()
        rows, heads = len(seen["hidden"]), block.attn.num_heads
        q, k, _ = block.attn.qkv(block.norm1(seen["hidden"])).view(rows, 3, heads, -1).unbind(1)
    cos, sin = (part.float()[:, None] for part in seen["rope"])
    q, k = q.float() * cos + rotate_half(q.float()) * sin, k.float() * cos + rotate_half(k.float()) * sin
    unit = rows // (steps * tokens)
    if loaded.adapter.family == "qwen2_5_vl":  # the tower's blocks see its merge units in window order
        window_index, _ = get_vision_window_index(inputs["video_grid_thw"], visual.spatial_merge_size,
                                                  visual.window_size, visual.patch_size)
        token_of_row = window_index.repeat_interleave(unit)
    else:
        token_of_row = torch.arange(rows) // unit
    weights = torch.zeros(steps * tokens)
    for f in range(steps):
        mine = token_of_row // tokens == f
        qf, kf = q[mine].transpose(0, 1), k[mine].transpose(0, 1)
        probs = torch.softmax(qf @ kf.transpose(1, 2) / qf.shape[-1] ** 0.5, dim=-1)
        weights.index_add_(0, token_of_row[mine], probs.mean(dim=0).mean(dim=0) / unit)
    return weights.view(steps, tokens)


def reference_attention(loaded, inputs, frames: torch.Tensor) -> torch.Tensor:
    steps, tokens = frames.shape[:2]
    if loaded.adapter.family == "qwen3_vl":  # the embedding stand-in
        return torch.stack([torch.softmax(f @ f.T / f.shape[-1] ** 0.5, dim=-1).mean(dim=0) for f in frames])
    return step_attention(loaded, inputs, steps, tokens)


def uniform_shares(total: int, sizes: list[int]) -> list[int]:
    """`total` over `sizes` in proportion, rounding the running sum half up."""
    marks = [math.floor(total * sum(sizes[: i + 1]) / sum(sizes) + 0.5) for i in range(len(sizes))]
    return [b - a for a, b in zip([0, *marks[:-1]], marks, strict=True)]


def reference_outer(frames: torch.Tensor, attn: torch.Tensor, k: int, rand, d: float = 0.0, tau: float = TAU,
                    beta: float = 0.6, neighbours: int = 7) -> tuple[list[int], torch.Tensor, list]:
    """The uniform rule on one clip [F, P, C]: (kept indices in sequence order, their rows, windows). Jitter is
    drawn in the official order: per window its frames' contextual pools, then its static tokens."""
    steps, tokens, _ = frames.shape
    unit = F.normalize(frames, dim=-1)
    similarity = F.cosine_similarity(unit[:-1], unit[1:], dim=-1)
    windows, saved = oracle.select_static_windows(similarity, steps, tau, 1024)
    if k > steps * tokens - saved:
        windows = [(f, f) for f in range(steps)]
    masks = [torch.all(similarity[s:e] > tau, dim=0) if e > s else torch.zeros(tokens, dtype=torch.bool)
             for s, e in windows]
    sizes = []
    for (s, e), mask in zip(windows, masks, strict=True):
        sizes += [int(mask.sum())] + [tokens - int(mask.sum())] * (e - s + 1)
    shares = iter(uniform_shares(k, sizes))

    def cluster(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        centres, dist = oracle.cluster_dpc_knn(x[None], count, min(neighbours, count), rand)
        centres = centres.sort(dim=-1).values
        return centres[0], oracle.merge_tokens_by_clustering(x[None], centres, dist, count, beta)[0]

    order, rows = [], []
    for (s, e), mask in zip(windows, masks, strict=True):
        clusters = next(shares)
        dynamic = (~mask).nonzero().flatten()
        for f in range(s, e + 1):
            share = next(shares)
            dominant = round(share * (1 - d))
            top = dynamic[attn[f, dynamic].topk(dominant).indices].sort().values
            order += (f * tokens + top).tolist()
            rows.append(frames[f, top])
            if share > dominant:
                rest = dynamic[~torch.isin(dynamic, top)]
                centres, merged = cluster(frames[f, rest], share - dominant)
                order += (f * tokens + rest[centres]).tolist()
                rows.append(merged)
        if clusters:
            centres, merged = cluster(frames[s : e + 1, mask].mean(dim=0), clusters)
            order += (s * tokens + mask.nonzero().flatten()[centres]).tolist()
            rows.append(merged)
    return order, torch.cat(rows), windows


def pruned_slots(x, kept: list[int]) -> torch.Tensor:
    """Where the kept visual tokens (original indices, ascending) sit once the others leave the sequence."""
    dropped = torch.ones(x.n_visual, dtype=torch.bool)
    dropped[kept] = False
    present = torch.ones(x.embeds.shape[1], dtype=torch.bool)
    present[x.visual[dropped]] = False
    return present.cumsum(0)[x.visual[kept]] - 1


def pruned_run(loaded, inputs, pruner, layers: tuple[int, ...] = (0,)):
    """Per decoder layer in `layers`: its input hidden and rotary as the layer gets them (after the engine's cut)
    and its output, of a pruned forward."""
    seen, handles = {}, []
    decoder = loaded.adapter.decoder_layers(loaded.model)

    def before(_module, args, kwargs, index):
        seen[index] = dict(hidden=args[0], rope=kwargs["position_embeddings"])

    def after(_module, _args, output, index):
        seen[index]["output"] = output[0] if isinstance(output, tuple) else output

    with torch.no_grad(), pruner.attach(loaded.model):  # hooks after the engine's: they see what the layer gets
        for index in layers:
            handles += [decoder[index].register_forward_pre_hook(functools.partial(before, index=index),
                                                                 with_kwargs=True),
                        decoder[index].register_forward_hook(functools.partial(after, index=index))]
        try:
            loaded.model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    return seen


@pytest.mark.parametrize(("keep", "d"), [(0.2, 0.0), (0.45, 0.5), (0.7, 0.3)])
def test_outer_merge_matches_a_direct_reference(qwen, keep, d):
    loaded, inputs, x = qwen
    steps, tokens = grid(loaded, inputs)
    n = steps * tokens
    assert x.n_visual == n and steps == 5
    frames = x.embeds[0, x.visual].float().view(steps, tokens, -1)
    attn = reference_attention(loaded, inputs, frames)
    generator = torch.Generator().manual_seed(n)  # the engine's per-sample generator (seed 0, stage 0)
    order, rows, windows = reference_outer(frames, attn, round(keep * n),
                                           lambda shape: torch.rand(shape, generator=generator), d)
    assert any(e > s for s, e in windows) == (keep < 0.5)  # above, the static merge would leave too few tokens
    pruner = make_pruner("holitom", keep=keep, protocol="uniform", budget="final", prune_layers=[0], tau=TAU, d=d)
    seen = pruned_run(loaded, inputs, pruner)
    ascending = sorted(range(len(order)), key=order.__getitem__)  # at original positions: in their order
    order, rows = [order[i] for i in ascending], rows[ascending]
    assert pruner.trace[0]["kept"][0] == order
    slots = pruned_slots(x, order)
    torch.testing.assert_close(seen[0]["hidden"][0, slots], rows.to(x.embeds.dtype), atol=1e-5, rtol=1e-5)
    # every kept or merged token sits at its own (a cluster: its centre's) original M-RoPE position
    kept_rope = torch.cat([part[0, slots] for part in seen[0]["rope"]], dim=-1)
    stock_rope = torch.cat([part[0, x.visual[order]] for part in (x.cos, x.sin)], dim=-1)
    torch.testing.assert_close(kept_rope, stock_rope)


def test_inner_merge_matches_a_replay_of_the_pruned_run():
    """tiny_qwen2_5vl, merge at layer 4: layer 3's last-row attention over the outer-merged tokens (recomputed in
    plain torch from the run's own layer-3 input), the top ones kept, every other one averaged in ascending
    order into its most similar kept token; the kept tokens keep their original M-RoPE positions."""
    loaded = load_model("tiny_qwen2_5vl", "cpu")
    inputs = prepare(loaded, [Sample("v", "What moves?", "", [], video=video())], None)
    x = stock_inputs(loaded, inputs)
    pruner = make_pruner("holitom", keep=0.3, protocol="uniform", prune_layers=[0, 4], tau=TAU)
    seen = pruned_run(loaded, inputs, pruner, (0, 3, 4))
    outer, inner = (stage["kept"][0] for stage in pruner.trace)
    start, count = int(x.visual[0]), len(inner)
    before = seen[3]
    attn = last_row_attention(loaded.adapter.decoder_layers(loaded.model)[3], before["hidden"], *before["rope"])
    top = attn[start : start + len(outer)].topk(count).indices
    rest = [i for i in range(len(outer)) if i not in set(top.tolist())]
    states = before["output"][0, start : start + len(outer)].float()
    merged = states.clone()
    for i in rest:
        similarity = F.cosine_similarity(states[i][None], states[top], dim=-1)
        target = top[similarity.argmax()]
        merged[target] = (merged[target] + states[i]) / 2
    kept = top.sort().values
    assert inner == [outer[i] for i in kept.tolist()]
    torch.testing.assert_close(seen[4]["hidden"][0, start : start + count], merged[kept], atol=1e-5, rtol=1e-5)
    outer_rope = torch.cat([part[0, start : start + len(outer)] for part in seen[0]["rope"]], dim=-1)
    inner_rope = torch.cat([part[0, start : start + count] for part in seen[4]["rope"]], dim=-1)
    torch.testing.assert_close(inner_rope, outer_rope[kept])


@pytest.mark.parametrize("keep", [0.1, 0.33, 0.8])
def test_uniform_keeps_exact_counts(qwen, keep):
    loaded, inputs, x = qwen
    pruner = make_pruner("holitom", keep=keep, protocol="uniform", d=0.5)
    with torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**inputs)
    kept = [stage["kept"][0] for stage in pruner.trace]
    assert [len(k) for k in kept] == list(pruner.plan(x.n_visual).values())
    assert len(set(kept[0])) == len(kept[0]) and set(kept[1]) <= set(kept[0])
    assert pruner.records[0].budget_unreachable is False


def test_batch_matches_batch_of_one():
    loaded = load_model("tiny_qwen2_5vl", "cpu")
    batch = [Sample("v", "What moves?", "", [], video=video()),
             Sample("w", "Which object moves the most in this clip?", "", [], video=video((1, 3), 112))]
    pruner = make_pruner("holitom", keep=0.3, protocol="uniform", prune_layers=[0, 4], tau=TAU, d=0.3)
    together = batch_matches_alone(loaded, batch, pruner)
    assert [len(kept) for kept in together[0]] == [pruner.plan(5 * 36)[0], pruner.plan(4 * 16)[0]]


@pytest.mark.parametrize("model", QWEN)
def test_official_is_refused_in_one_line_on_the_port(model):
    with pytest.raises(ConfigError, match=rf"protocol=official: model family '{FAMILY[model]}' is not supported "
                                          r"\(supported: llava_onevision\); protocol=uniform runs the port on "
                                          r"qwen2_vl, qwen2_5_vl, qwen3_vl") as error:
        make_pruner("holitom", keep=0.2, protocol="official", model=model)
    assert "\n" not in str(error.value)
    make_pruner("holitom", keep=0.2, protocol="uniform", model=model)


@pytest.mark.parametrize("model", QWEN)
def test_the_cli_runs_the_port_end_to_end(tmp_path, model):
    command = [sys.executable, "-m", "clse_exp", f"model={model}", "prune=holitom", "keep=0.25", "protocol=uniform",
               "dataset=synthetic", "dataset.variant=video", "dataset.limit=2", "logger=none",
               "eval.reference=false", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"prune=holitom on {FAMILY[model]} runs the uniform port" in result.stdout + result.stderr
    retention = json.loads((tmp_path / "summary.json").read_text())["retention"]
    assert retention["average"] == pytest.approx(0.25, abs=0.01) and retention["budget_unreachable_samples"] == 0
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0 < len(record["kept"]) < record["n_visual"] for record in records)
