"""The lmms-eval model `clse_exp`: our loader and pruner behind lmms-eval's `lmms` interface.

lmms-eval hands `generate_until` every request of a run at once; each request's args are
(context, generation kwargs, doc_to_visual, doc_id, task, split). The context becomes the question of a
`Sample` whose images come from `doc_to_visual(doc)`, so the prompt is built by the model family's own
chat template exactly as in `python -m clse_exp`, batched `--batch_size` at a time (left padding, one
pruning decision per sample). Decoding is greedy, as the pruning papers evaluate. With `stats_dir`, one
line per answered or scored request (retention, kept indices, prefill FLOPs, KV bytes) goes to
`<stats_dir>/<task>/predictions.jsonl` as it is answered. `loglikelihood` requests (multiple-choice tasks)
carry the choice in place of the generation kwargs; the prompt is pruned as when answering and the choice is
teacher-forced after it (one line per choice, with its log-likelihood).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from clse_exp.data.sample import Sample
from clse_exp.data.video import sample_frames
from clse_exp.efficiency.accounting import sample_costs
from clse_exp.generation import batched, continuation_logprobs, decode, generate, prefill_records, prepare
from clse_exp.lmms.args import parse
from clse_exp.models import check_inputs, load
from clse_exp.pruning.build import build_pruner

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval 0.7.3 qwen2_vl's default when a task sets none (models/simple/qwen2_vl.py)
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "num_beams")


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The text before the first stop string, as lmms-eval's `until` asks."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _stops(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def _sampling_requested(gen_kwargs: dict) -> bool:
    return bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0 or \
        int(gen_kwargs.get("num_beams") or 1) > 1


class PrunedLMM(lmms):
    """`--model clse_exp --model_args model=...,prune=...,keep=...,<any config key>=...[,stats_dir=DIR]`."""

    is_simple = True

    def __init__(self, batch_size: Any = 1, max_batch_size: Any = None, device: str | None = None,
                 **model_args: Any) -> None:
        """lmms-eval passes `--batch_size`, `--max_batch_size` (unused: no automatic batch size) and `--device`."""
        super().__init__()
        self.cfg, options = parse(model_args, batch_size, device)
        self.stats_dir, self.num_frames = options.stats_dir, options.num_frames
        torch.manual_seed(self.cfg.seed)
        self.loaded = load(self.cfg.model, self.cfg.device)
        self.pruner = build_pruner(self.cfg, self.loaded)
        self.batch_size = self.cfg.batch_size
        self._warned_sampling = False

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    # ---------------------------------------------------------------------------------- requests
    def _visuals(self, request: Instance) -> tuple[list[Image.Image], list[Image.Image] | None]:
        """Images, or one video's frames (a video path is sampled to `num_frames` frames)."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = visuals if isinstance(visuals, list | tuple) else [visuals]
        videos = [v for v in visuals if isinstance(v, str)]
        images = [v.convert("RGB") for v in visuals if isinstance(v, Image.Image)]
        if len(videos) + len(images) != len(visuals) or len(videos) > 1 or (videos and images):
            kinds = sorted({type(v).__name__ for v in visuals})
            raise ValueError(f"{task} doc {doc_id}: visuals of types {kinds} are not supported (images, or one "
                             "video path)")
        return images, (sample_frames(videos[0], self.num_frames) if videos else None)

    def _sample(self, request: Instance) -> Sample:
        context, _, _, doc_id, task, split = request.args
        images, video = self._visuals(request)
        # lmms-eval contexts may carry LLaVA's <image> placeholder; the chat template places the visuals.
        sample = Sample(f"{task}/{split}/{doc_id}", context.replace("<image>", ""), "", images, video)
        check_inputs(self.cfg.model, [sample])  # a video the family cannot take is refused, never dropped
        return sample

    def _stats(self, samples: list[Sample], inputs: dict) -> list[dict]:
        """Per-sample pruning statistics of the batch the model last prefilled from `inputs`."""
        stats = []
        for record in prefill_records(self.loaded, inputs, self.pruner):
            stats.append({"prompt_tokens": record.n_prompt, "batch_size": len(samples),
                          **(record.as_dict() if self.pruner is not None else {}),
                          **sample_costs(self.loaded.model.config, record, self.loaded.model.dtype)})
        return stats

    def _answer(self, samples: list[Sample], max_new_tokens: int) -> tuple[list[str], list[dict]]:
        """Greedy answers and per-sample pruning statistics of one batch."""
        inputs = prepare(self.loaded, samples, self.pruner)
        out = generate(self.loaded, inputs, max_new_tokens, self.pruner)
        answers = decode(self.loaded, out.sequences, inputs["input_ids"].shape[1])
        return answers, self._stats(samples, inputs)

    def _log(self, task: str, records: list[dict]) -> None:
        if self.stats_dir is None:
            return
        folder = self.stats_dir / task
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "predictions.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests are batched per (task, split, generation kwargs)."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups.setdefault((task, split, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(index)
        answers: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0)
        for (task, split, _), indices in groups.items():
            gen_kwargs = dict(requests[indices[0]].args[1])
            if _sampling_requested(gen_kwargs) and not self._warned_sampling:
                logger.warning(f"{task}: sampling kwargs {({k: gen_kwargs.get(k) for k in SAMPLING_KEYS})} are "
                               "ignored: clse_exp decodes greedily")
                self._warned_sampling = True
            max_new_tokens = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            for chunk in batched(indices, self.batch_size):
                texts, stats = self._answer([self._sample(requests[i]) for i in chunk], max_new_tokens)
                records = []
                for i, text, stat in zip(chunk, texts, stats, strict=True):
                    answers[i] = cut_at_stops(text, _stops(gen_kwargs))
                    records.append({"id": f"{split}/{requests[i].args[3]}", "task": task, "split": split,
                                    "doc_id": requests[i].args[3], "prediction": answers[i], **stat})
                self._log(task, records)
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request, in order: (the continuation's mean negative log-likelihood per token, whether greedy
        decoding gives exactly it), lmms-eval's convention (its llava_hf / llava_onevision models return the
        model's loss; multiple_choice takes the argmin). The prompt is pruned as when answering, then the
        continuation is teacher-forced."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        groups: dict[tuple[str, str], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.args[4], request.args[5]), []).append(index)
        progress = tqdm(total=len(requests), desc="Model Scoring", disable=self.rank != 0)
        for (task, split), indices in groups.items():
            for chunk in batched(indices, self.batch_size):
                continuations = []
                for i in chunk:
                    _, target, _, doc_id, _, _ = requests[i].args
                    continuations.append(target if isinstance(target, str)
                                         else target(self.task_dict[task][split][doc_id]))
                samples = [self._sample(requests[i]) for i in chunk]
                inputs = prepare(self.loaded, samples, self.pruner)
                scored = continuation_logprobs(self.loaded, inputs, continuations, self.pruner)
                records = []
                for i, continuation, c, stat in zip(chunk, continuations, scored, self._stats(samples, inputs),
                                                    strict=True):
                    results[i] = (-c.logprob / c.tokens, c.greedy)
                    # one line per request: a multiple-choice doc has one per choice (summaries count docs)
                    records.append({"id": f"{split}/{requests[i].args[3]}", "task": task, "split": split,
                                    "doc_id": requests[i].args[3], "continuation": continuation,
                                    "loglikelihood": c.logprob, "is_greedy": c.greedy, **stat})
                self._log(task, records)
                progress.update(len(chunk))
        progress.close()
        # lmms-eval 0.7.3's evaluator turns every response that is not a string or a GenerationResult into
        # str(response) (api/instance.py unwrap_generation_output), which its multiple_choice scoring cannot
        # unpack; a GenerationResult carries the (log-probability, is_greedy) pair through unchanged
        return [GenerationResult(pair) for pair in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("clse_exp answers single-round generate_until tasks only")
