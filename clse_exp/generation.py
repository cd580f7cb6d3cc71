"""Greedy generation with an optional pruner attached: the one loop the runner, bench, toy training,
the lmms-eval model and the tests share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch

from clse_exp.data.sample import Sample
from clse_exp.models import LoadedModel
from clse_exp.pruning.record import SampleRecord, unpruned_record


def batched(items: list, size: int) -> Iterator[list]:
    """Consecutive chunks of `size` items (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prepare(loaded: LoadedModel, samples: list[Sample], pruner: Any = None) -> dict:
    """Model inputs for `samples` as the pruner's method feeds them (e.g. downsampled images; unchanged for
    methods that cut inside the LLM), so its records count against the samples as given."""
    return loaded.prepare(samples if pruner is None else pruner.prepare_samples(loaded, samples))


def generate(loaded: LoadedModel, inputs: dict, max_new_tokens: int, pruner: Any = None, timer: Any = None,
             min_new_tokens: int | None = None, stop: bool = True) -> Any:
    """Greedy decoding, pruned while `pruner` is attached; returns sequences and per-step scores.

    `timer` is any context manager entered around the call (e.g. efficiency.timing.GenerationTimer).
    `min_new_tokens` forces a fixed length (benchmarks); `stop=False` ignores the end-of-sequence token.
    """
    tokenizer = loaded.processor.tokenizer
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if pruner is not None:
            stack.enter_context(pruner.attach(loaded.model))
        if timer is not None:
            stack.enter_context(timer)
        return loaded.model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False, num_beams=1,
            output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id if stop else None, temperature=None, top_p=None, top_k=None,
        )


def decode(loaded: LoadedModel, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """The generated continuation of each row, special tokens dropped, whitespace stripped."""
    texts = loaded.processor.tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def prefill_records(loaded: LoadedModel, inputs: dict, pruner: Any = None) -> list[SampleRecord]:
    """Per sample of the last call: the pruner's record, or the unpruned prefill's (every layer processes and
    caches the whole prompt), for FLOPs, KV bytes and retention."""
    if pruner is not None:
        return pruner.records
    grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    layout = loaded.adapter.visual_layout(loaded.model, inputs["input_ids"], **grids)
    prompt_tokens = inputs["attention_mask"].sum(1).tolist()
    return [unpruned_record(int(n), sum(s.length for s in segments), [list(s.grid) for s in segments],
                            loaded.num_layers) for n, segments in zip(prompt_tokens, layout, strict=True)]
