"""Shared test material: seeded random images and prompts of different lengths (so batches pad)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clse_exp.data.sample import Sample
from clse_exp.pruning.engine import Pruner
from clse_exp.pruning.methods.base import PruningMethod, Selection

HOOKS = ("default_layers", "default_shape", "official_counts", "rules", "capture_layers")
QUESTIONS = (
    "Is there a red circle?",
    "What colour is the shape in the top left cell? Answer with one word.",
    "How many blue shapes are there in the image? Answer with one word.",
)


def noise_image(seed: int, size: int = 224) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


VIDEO_METHODS = ("dycoke", "fastvid", "holitom", "vidcom2")  # videos only; all run on LLaVA-OneVision


def video_samples(n: int = 3, frames: int = 4) -> list[Sample]:
    """n samples, each a clip of `frames` different noise frames and a question of its own length."""
    return [Sample(f"v{i}", QUESTIONS[i % len(QUESTIONS)], "yes", [],
                   video=[noise_image(200 + 10 * i + f, 112) for f in range(frames)]) for i in range(n)]


def samples(
    n: int = 3, images_per_sample: tuple[int, ...] = (1, 2, 1), sizes: tuple[int, ...] = (224,)
) -> list[Sample]:
    """n samples with different prompt lengths, image counts and (optionally) image sizes."""
    out = []
    for i in range(n):
        count = images_per_sample[i % len(images_per_sample)]
        size = sizes[i % len(sizes)]
        images = [noise_image(100 * i + j, size) for j in range(count)]
        out.append(Sample(f"s{i}", QUESTIONS[i % len(QUESTIONS)], "yes", images))
    return out


def greedy(loaded, inputs, pruner=None, use_cache=True, steps=6):
    tok = loaded.processor.tokenizer
    kwargs = dict(max_new_tokens=steps, do_sample=False, use_cache=use_cache, pad_token_id=tok.pad_token_id,
                  eos_token_id=None, min_new_tokens=steps, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        if pruner is None:
            out = loaded.model.generate(**inputs, **kwargs)
        else:
            with pruner.attach(loaded.model):
                out = loaded.model.generate(**inputs, **kwargs)
    return out.sequences[:, -steps:], torch.stack(out.scores)


def batch_matches_alone(loaded, batch, pruner, steps=2) -> list[list[list[int]]]:
    """Greedy-decode `batch` together and each sample alone (inputs as the method prepares them); assert
    each sample keeps the same tokens at every stage and answers alike. Returns the batch's kept tokens,
    per stage, per sample."""
    from clse_exp.generation import prepare

    tokens, scores = greedy(loaded, prepare(loaded, batch, pruner), pruner, steps=steps)
    together = [stage["kept"] for stage in pruner.trace]
    for i, sample in enumerate(batch):
        alone_tokens, alone_scores = greedy(loaded, prepare(loaded, [sample], pruner), pruner, steps=steps)
        assert [stage["kept"][0] for stage in pruner.trace] == [kept[i] for kept in together], f"sample {i}"
        assert torch.equal(tokens[i], alone_tokens[0]), f"sample {i} answers differently in a batch"
        torch.testing.assert_close(scores[:, i], alone_scores[:, 0], atol=2e-4, rtol=1e-4)
    return together


class Recording(PruningMethod):
    """Runs `original` and keeps every row a merging selection handed the engine, by (stage, sample, original
    visual index), so Replay can hand the same merged rows to a recomputation."""

    name = "recording"

    def __init__(self, original: PruningMethod) -> None:
        super().__init__(original.options)
        self.original, self.rows = original, {}
        for hook in (*HOOKS, "vision_layers"):
            setattr(self, hook, getattr(original, hook))

    def select(self, ctx, b, k):
        selection = self.original.select(ctx, b, k)
        if isinstance(selection, Selection) and selection.hidden is not None:
            originals = ctx.original_index(b)[selection.order.to(ctx.hidden.device)].tolist()
            self.rows.update({(ctx.stage_index, b, i): row for i, row in zip(originals, selection.hidden, strict=True)})
        return selection


class Replay(PruningMethod):
    """Keeps, at every stage of every call, the tokens `recorded` lists for that stage and sample (the
    cached run's choice), so a no-cache recomputation of each decode step re-prunes the same tokens; a
    token `rows` holds (a merge's result, see Recording) gets that row again."""

    name = "replay"

    def __init__(self, original: PruningMethod, recorded: list[list[list[int]]], rows: dict | None = None) -> None:
        super().__init__(original.options)
        self.original, self.recorded, self.rows = original, recorded, rows or {}
        for hook in HOOKS:
            setattr(self, hook, getattr(original, hook))

    def select(self, ctx, b, k):
        original = ctx.original_index(b).tolist()
        wanted = self.recorded[ctx.stage_index][b]
        order = torch.tensor([original.index(i) for i in wanted])
        keys = [(ctx.stage_index, b, i) for i in wanted]
        if not any(key in self.rows for key in keys):
            return Selection(order)
        hidden = ctx.hidden_states(b)[order.to(ctx.hidden.device)].clone()
        for j, key in enumerate(keys):
            if key in self.rows:
                hidden[j] = self.rows[key]
        return Selection(order, hidden)


def cached_vs_recomputed(loaded, inputs, pruner):
    """(cached decode logits, logits of recomputing every step without a cache, re-pruning the same tokens
    and re-using the same merged rows)."""
    original = pruner.method
    recording = pruner.method = Recording(original)
    try:
        tokens, cached = greedy(loaded, inputs, pruner)
    finally:
        pruner.method = original
    kept = [stage["kept"] for stage in pruner.trace]
    replay = Pruner(Replay(original, kept, recording.rows), keep=pruner.keep, budget=pruner.budget,
                    schedule=pruner.schedule, protocol=pruner.protocol, kv_policy=pruner.kv_policy)
    replay_tokens, recomputed = greedy(loaded, inputs, replay, use_cache=False)
    assert torch.equal(tokens, replay_tokens)
    return cached, recomputed


def slow_except(cases: list, fast: list | set) -> list:
    """Parametrize cases; those not in `fast` run only with `pytest -m slow` (a representative few stay in
    the default run, which must finish in minutes on 2 cores)."""
    import pytest

    return [case if case in fast else pytest.param(*(case if isinstance(case, tuple) else (case,)),
                                                   marks=pytest.mark.slow) for case in cases]


LLAVA_576 = "tiny_llava15"  # conf/model/tiny_llava15.yaml: LLaVA-1.5's shape (32 layers, 576 tokens, kv heads = heads)
QUESTION = "What colour is the shape in the top left cell? Answer with one word."


def llava576_case():
    """The LLaVA-1.5-shaped tiny model in eager attention, one noise-image question's inputs, and the same
    inputs as the official oracles read them (official_oracles.stock_inputs)."""
    from official_oracles import stock_inputs

    from clse_exp import load_model
    from clse_exp.data.sample import Sample

    loaded = load_model(LLAVA_576, "cpu")
    loaded.model.set_attn_implementation("eager")
    inputs = loaded.prepare([Sample("s", QUESTION, "", [noise_image(7, 336)])])
    return loaded, inputs, stock_inputs(loaded, inputs)


def first_layer_run(loaded, inputs, pruner):
    """(kept original indices of sample 0 at the first stage, the first decoder layer's input, its last logits)."""
    import torch

    seen = {}
    layer0 = loaded.adapter.decoder_layers(loaded.model)[0]
    with torch.no_grad(), pruner.attach(loaded.model):
        handle = layer0.register_forward_pre_hook(lambda _m, args, _kw: seen.update(h=args[0]), with_kwargs=True)
        try:
            logits = loaded.model(**inputs).logits[0, -1]
        finally:
            handle.remove()
    return pruner.trace[0]["kept"][0], seen["h"], logits
