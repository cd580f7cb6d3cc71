"""Greedy generation with an optional pruner attached: the one loop the runner, bench, toy training,
the lmms-eval model and the tests share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, NamedTuple

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
             min_new_tokens: int | None = None, stop: bool = True, **kwargs: Any) -> Any:
    """Greedy decoding, pruned while `pruner` is attached; returns sequences and per-step scores.

    `timer` is any context manager entered around the call (e.g. efficiency.timing.GenerationTimer).
    `min_new_tokens` forces a fixed length (benchmarks); `stop=False` ignores the end-of-sequence token;
    `kwargs` go to `model.generate` (e.g. a logits processor and `output_logits`).
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
            **kwargs,
        )


class _Forced:
    """A logits processor that makes step t emit `tokens[:, t]` (teacher forcing through generate's own
    cached decode loop, so pruning, positions and the KV cache behave exactly as when answering)."""

    def __init__(self, tokens: torch.Tensor, prompt_length: int) -> None:
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, self.tokens[:, step : step + 1].to(scores.device), 0.0)


class Continuation(NamedTuple):
    """A scored continuation: summed log-probability of its tokens, whether greedy decoding gives exactly
    them, and how many tokens it has."""

    logprob: float
    greedy: bool
    tokens: int


def continuation_logprobs(loaded: LoadedModel, inputs: dict, continuations: list[str] | list[list[int]],
                          pruner: Any = None) -> list[Continuation]:
    """Per row: the summed log-probability of `continuations[row]`'s tokens (a text, tokenized without special
    tokens, or token ids) after its prompt, and whether
    greedy decoding would produce exactly those tokens (lmms-eval's loglikelihood). The prompt is prefilled
    and pruned once (the continuation never takes part in choosing tokens), then the continuation is
    teacher-forced step by step through the cache. Rows are padded on the right to the longest continuation;
    padded steps are not counted."""
    from transformers import LogitsProcessorList

    rows = inputs["input_ids"].shape[0]
    if len(continuations) != rows:
        raise ValueError(f"{len(continuations)} continuations for {rows} prompts: give one per row of the inputs")
    tokenizer = loaded.processor.tokenizer
    encoded = [list(c) if not isinstance(c, str) else tokenizer(c, add_special_tokens=False)["input_ids"]
               for c in continuations]
    if any(not ids for ids in encoded):
        empty = [text for text, ids in zip(continuations, encoded, strict=True) if not ids]
        raise ValueError(f"continuations {empty!r} have no tokens to score")
    length = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.tensor([ids + [pad] * (length - len(ids)) for ids in encoded])
    prompt_length = inputs["input_ids"].shape[1]
    out = generate(loaded, inputs, length, pruner, min_new_tokens=length, stop=False, output_logits=True,
                   logits_processor=LogitsProcessorList([_Forced(tokens, prompt_length)]))
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).cpu()  # [B, length, vocab], unprocessed
    results = []
    for row, ids in enumerate(encoded):
        steps = logprobs[row, : len(ids)]
        target = torch.tensor(ids)
        total = float(steps.gather(1, target[:, None]).sum())
        results.append(Continuation(total, bool((steps.argmax(-1) == target).all()), len(ids)))
    return results


def decode(loaded: LoadedModel, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """The generated continuation of each row, special tokens dropped, whitespace stripped."""
    texts = loaded.processor.tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def prefill_records(loaded: LoadedModel, inputs: dict, pruner: Any = None) -> list[SampleRecord]:
    """Per sample of the last call: the pruner's record, or the unpruned prefill's (every layer processes and
    caches the whole prompt), for FLOPs, KV bytes and retention."""
    if pruner is not None:
        return pruner.records
    layout = loaded.layout(inputs)
    prompt_tokens = inputs["attention_mask"].sum(1).tolist()
    return [unpruned_record(int(n), sum(s.length for s in segments), [list(s.grid) for s in segments],
                            loaded.num_layers) for n, segments in zip(prompt_tokens, layout, strict=True)]
