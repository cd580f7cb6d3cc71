"""DyCoke's `uniform` port to Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the frame merging against a per-frame selection
written out here from the stock model's input embeddings, the decode-step key pruning against a hand-run decoder
with Qwen's M-RoPE positions, batching, the official protocol's refusal and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import batch_matches_alone, greedy, noise_image
from official_oracles import finish, rotary, stock_inputs
from oracle_dycoke import layer_forward

from clse_exp import load_model, make_pruner
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare

FAMILIES = {"tiny_qwen2vl": "qwen2_vl", "tiny_qwen2_5vl": "qwen2_5_vl", "tiny_qwen3vl": "qwen3_vl"}
FRAMES, PER_FRAME = 4, 16  # 8 input frames of 112 px: 4 temporal steps of 4 x 4 merged tokens on every family


def video(seed: int = 50, question: str = "What moves?") -> Sample:
    return Sample("v", question, "", [], video=[noise_image(seed + i, 112) for i in range(2 * FRAMES)])


# keep: (tokens each frame keeps, the frame it is compared with); frame 0 stays whole above 16 tokens (frame 1 is
# compared with 0, frame 2 with 0, frame 3 with 2, the spare 16 shared 6/5/5); below, only frame 0 keeps tokens,
# compared with frame 1
REFERENCE = {
    0.5: ([16, 6, 5, 5], [None, 0, 0, 2]),
    0.125: ([8, 0, 0, 0], [1, None, None, None]),
}


def least_similar(x: torch.Tensor, counts: list[int], references: list[int | None]) -> list[int]:
    """Per frame of x [FRAMES * PER_FRAME, C], its `count` tokens of lowest cosine to the same position in the
    reference frame (all of them when it has none), as sorted indices into x."""
    frames = x.float().view(FRAMES, PER_FRAME, -1)
    kept = []
    for t, (count, ref) in enumerate(zip(counts, references, strict=True)):
        if ref is None:
            picks = range(count)
        else:
            similarity = F.cosine_similarity(frames[t], frames[ref], dim=-1)
            picks = sorted(range(PER_FRAME), key=lambda i: similarity[i].item())[:count]
        kept += [t * PER_FRAME + i for i in picks]
    return sorted(kept)


@pytest.mark.parametrize("keep", sorted(REFERENCE))
@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_frames_merge_as_a_direct_per_frame_selection(model, keep):
    loaded = load_model(model, "cpu")
    batch = [video()]
    x = stock_inputs(loaded, prepare(loaded, batch, None))
    assert len(x.visual) == FRAMES * PER_FRAME
    expected = least_similar(x.embeds[0, x.visual], *REFERENCE[keep])
    pruner = make_pruner("dycoke", model=model, keep=keep, protocol="uniform", decode_pruning=False)
    greedy(loaded, prepare(loaded, batch, pruner), pruner, steps=1)
    assert pruner.trace[0]["kept"][0] == expected
    assert len(expected) == round(keep * FRAMES * PER_FRAME)


def reference_decode(loaded, inputs, kept: list[int], steps: int, layer: int, ratio: float, threshold: float
                     ) -> list[torch.Tensor]:
    """Logits of `steps` greedy steps: the prompt without the dropped visual tokens at their ORIGINAL M-RoPE
    positions, decode positions from the stock rope delta; before layer `layer`, the new token's attention in
    layer - 1 (head mean over every cached key) on the kept visual keys, compared (cosine) with the previous step's:
    on the first step or below `threshold`, layers >= `layer` see only the round((1 - ratio) * M) most attended
    visual keys and every other key."""
    x = stock_inputs(loaded, inputs)
    delta = int(loaded.model.model.rope_deltas)
    visual = set(x.visual.tolist())
    rows = [i for i in range(x.embeds.shape[1]) if i not in visual or x.visual.tolist().index(i) in kept]
    span = [j for j, i in enumerate(rows) if i in visual]  # the kept visual tokens' cache indices
    h, cos, sin = x.embeds[:, rows], x.cos[:, rows], x.sin[:, rows]
    layers = loaded.adapter.decoder_layers(loaded.model)
    embed = loaded.adapter.text_model(loaded.model).embed_tokens
    caches = [[None, None] for _ in layers]
    length, previous, logits = len(rows), None, []
    with torch.no_grad():
        for step in range(steps):
            out, weights, selection = h, None, None
            for index, decoder_layer in enumerate(layers):
                if step and index == layer:
                    attention = weights.mean(1)[0, -1, span]
                    similar = previous is not None and F.cosine_similarity(attention, previous, dim=0) >= threshold
                    previous = attention
                    if not similar:
                        top = {span[j] for j in attention.topk(round(len(span) * (1 - ratio))).indices.tolist()}
                        selection = [j for j in range(length) if j not in span or j in top]
                out, weights = layer_forward(decoder_layer, out, cos, sin, caches[index],
                                             selection if index >= layer else None)
            logits.append(finish(loaded, out))
            h = embed(logits[-1].argmax().view(1, 1))
            cos, sin = rotary(loaded, h, torch.tensor([[x.embeds.shape[1] + step + delta]]))
            length += 1
    return logits


@pytest.mark.parametrize("threshold", [0.9, 2.0])
def test_decode_steps_match_a_hand_run_decoder_on_qwen2_5_vl(threshold):
    loaded = load_model("tiny_qwen2_5vl", "cpu")
    loaded.model.set_attn_implementation("eager")
    batch = [video()]
    knobs = dict(keep=0.5, protocol="uniform", similarity_threshold=threshold, decode_layer=5, decode_ratio=0.7)
    pruner = make_pruner("dycoke", model="tiny_qwen2_5vl", **knobs)
    _, scores = greedy(loaded, prepare(loaded, batch, pruner), pruner, steps=5)
    kept = pruner.trace[0]["kept"][0]
    expected = reference_decode(loaded, prepare(loaded, batch, None), kept, 5, 5, 0.7, threshold)
    torch.testing.assert_close(scores[:, 0], torch.stack(expected), atol=1e-4, rtol=1e-4)
    off = make_pruner("dycoke", model="tiny_qwen2_5vl", keep=0.5, protocol="uniform", decode_pruning=False)
    _, unpruned = greedy(loaded, prepare(loaded, batch, off), off, steps=5)
    assert not torch.allclose(scores[1:], unpruned[1:], atol=1e-5)  # the decode stage does change the steps


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_batch_matches_batch_of_one(model):
    loaded = load_model(model, "cpu")
    batch = [video(), video(80, "Which object moves the most in this clip?")]
    pruner = make_pruner("dycoke", model=model, keep=0.4, protocol="uniform", similarity_threshold=2.0)
    together = batch_matches_alone(loaded, batch, pruner, steps=3)[0]
    assert [len(kept) for kept in together] == [round(0.4 * FRAMES * PER_FRAME)] * 2


@pytest.mark.parametrize(("model", "family"), sorted(FAMILIES.items()))
def test_official_is_refused_on_the_ported_families_in_one_line(model, family):
    with pytest.raises(ConfigError, match=rf"protocol=official merges video frames; model family '{family}' is not "
                       r"supported \(supported: llava_onevision\); protocol=uniform runs the port on qwen2_vl, "
                       "qwen2_5_vl, qwen3_vl") as error:
        make_pruner("dycoke", model=model, keep=0.5)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"protocol=uniform merges video frames; model family 'llava' is not "
                       r"supported \(supported: llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl\)$"):
        make_pruner("dycoke", model="tiny_llava", keep=0.5, protocol="uniform")


def test_an_image_prompt_is_refused_on_qwen3_vl():
    loaded = load_model("tiny_qwen3vl", "cpu")
    batch = [Sample("i", "What is it?", "", [noise_image(3, 112)])]
    pruner = make_pruner("dycoke", model="tiny_qwen3vl", keep=0.5, protocol="uniform")
    with pytest.raises(ConfigError, match="holds an image"), torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**prepare(loaded, batch, pruner))


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_the_cli_runs_the_port(tmp_path, model):
    command = [sys.executable, "-m", "clse_exp", f"model={model}", "prune=dycoke", "keep=0.25", "protocol=uniform",
               "dataset=synthetic", "dataset.variant=video", "dataset.limit=2", "logger=none", "eval.reference=false",
               f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    retention = json.loads((tmp_path / "summary.json").read_text())["retention"]
    n = retention["visual_tokens_in"]
    assert abs(retention["average"] - 0.25) <= 0.5 / n + 1e-9 and retention["budget_unreachable_samples"] == 0
