"""Continuation log-probabilities (lmms-eval's loglikelihood): teacher-forced through the cached decode loop.

Oracles: one no-cache forward of the stock model over prompt + continuation (unpruned), and the same forward
with the cached run's kept tokens replayed at every stage (pruned; ragged KV policy, where a cached decode
equals a recomputation).
"""

from __future__ import annotations

import pytest
import torch
from helpers import Replay, samples

from clse_exp import load_model, make_pruner
from clse_exp.generation import continuation_logprobs, generate, prepare
from clse_exp.pruning.engine import Pruner

CONTINUATIONS = ["red circle", "a blue square in the corner"]  # different lengths: right-padded steps


def full_sequence(inputs: dict, tokens: list[list[int]]) -> tuple[dict, int]:
    """`inputs` with each row's continuation appended (rows padded to the longest on the right)."""
    length = max(len(t) for t in tokens)
    ids = torch.tensor([t + [0] * (length - len(t)) for t in tokens])
    out = dict(inputs)
    batch, prompt = inputs["input_ids"].shape
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (batch, prompt):
            tail = ids if key == "input_ids" else torch.ones_like(ids) if key == "attention_mask" else \
                torch.zeros_like(ids)
            out[key] = torch.cat([value, tail.to(value.dtype)], 1)
    return out, prompt


def by_forward(loaded, inputs: dict, tokens: list[list[int]], pruner=None) -> list[float]:
    """Summed log-probabilities of each row's continuation from one no-cache forward."""
    full, prompt = full_sequence(inputs, tokens)
    with torch.no_grad():
        if pruner is None:
            logits = loaded.model(**full, use_cache=False).logits
        else:
            with pruner.attach(loaded.model):
                logits = loaded.model(**full, use_cache=False).logits
    # a pruned forward returns the surviving rows only; every row ends with its `length` continuation steps
    length = max(len(row) for row in tokens)
    logprobs = logits.float().log_softmax(-1)
    end = logits.shape[1]
    assert pruner is not None or end == prompt + length
    return [float(sum(logprobs[b, end - length - 1 + t, token] for t, token in enumerate(row)))
            for b, row in enumerate(tokens)]


@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_llava"])
def test_unpruned_equals_one_stock_forward_over_prompt_and_continuation(name):
    loaded = load_model(name, "cpu")
    inputs = prepare(loaded, samples(2))
    tokenizer = loaded.processor.tokenizer
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in CONTINUATIONS]
    ours = continuation_logprobs(loaded, inputs, CONTINUATIONS)
    expected = by_forward(loaded, inputs, tokens)
    assert [c.logprob for c in ours] == pytest.approx(expected, abs=1e-4)
    assert all(c.logprob < 0 for c in ours)
    assert [c.tokens for c in ours] == [len(t) for t in tokens]


@pytest.mark.parametrize(("method", "keep"), [("fastv", 0.25), ("random", 0.3)])
def test_pruned_equals_a_recomputation_that_keeps_the_same_tokens(method, keep):
    loaded = load_model("tiny_qwen2vl", "cpu")
    batch = samples(2)
    pruner = make_pruner(method, keep=keep, budget="final")
    inputs = prepare(loaded, batch, pruner)
    tokenizer = loaded.processor.tokenizer
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in CONTINUATIONS]
    ours = continuation_logprobs(loaded, inputs, CONTINUATIONS, pruner)
    kept = [stage["kept"] for stage in pruner.trace]
    assert all(len(k) < 64 for k in kept[0])  # it pruned
    replay = Pruner(Replay(pruner.method, kept), keep=pruner.keep, budget=pruner.budget, protocol=pruner.protocol)
    expected = by_forward(loaded, inputs, tokens, replay)
    assert [c.logprob for c in ours] == pytest.approx(expected, abs=1e-4)
    unpruned = continuation_logprobs(loaded, loaded.prepare(batch), CONTINUATIONS)
    assert [c.logprob for c in ours] != pytest.approx([c.logprob for c in unpruned], abs=1e-3)


def test_greedy_flag_is_true_exactly_for_the_greedy_answer():
    """generate's own greedy tokens score as greedy, with its log-probabilities; change the last one and they
    do not."""
    loaded = load_model("tiny_qwen2vl", "cpu")
    pruner = make_pruner("clse", keep=0.25)
    inputs = prepare(loaded, samples(1), pruner)
    out = generate(loaded, inputs, 3, pruner, min_new_tokens=3, stop=False)
    greedy_ids = out.sequences[0, -3:].tolist()
    (score, is_greedy, _), = continuation_logprobs(loaded, inputs, [greedy_ids], pruner)
    logprobs = torch.stack(out.scores, 1)[0].float().log_softmax(-1)
    assert is_greedy and score == pytest.approx(float(logprobs[torch.arange(3), greedy_ids].sum()), abs=1e-4)
    other = greedy_ids[:-1] + [(greedy_ids[-1] + 1) % logprobs.shape[-1]]
    (other_score, is_greedy, _), = continuation_logprobs(loaded, inputs, [other], pruner)
    assert not is_greedy and other_score < score


def test_an_empty_continuation_or_one_per_row_missing_is_a_clear_error():
    loaded = load_model("tiny_qwen2vl", "cpu")
    with pytest.raises(ValueError, match="no tokens to score"):
        continuation_logprobs(loaded, prepare(loaded, samples(1)), [""])
    with pytest.raises(ValueError, match="1 continuations for 2 prompts"):
        continuation_logprobs(loaded, prepare(loaded, samples(2)), ["red"])
