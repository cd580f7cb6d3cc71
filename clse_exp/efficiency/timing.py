"""Wall-clock of the phases of generate(): vision encoder, prefill (time to first token), decode steps.

On CUDA the phases are bracketed with CUDA events and read after a synchronize (no sync inside the
timed region); on CPU with perf_counter. Hooks on the vision tower and the top-level forward mark the
phases, so stock generate() runs unchanged.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class Clock:
    """Marks on a device timeline: perf_counter on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


class GenerationTimer:
    """Attach around generate(): afterwards `vision_s`, `prefill_s` and `decode_s_per_token` are set."""

    def __init__(self, model: nn.Module, vision: Sequence[nn.Module], device: torch.device) -> None:
        self.model, self.vision, self.clock = model, list(vision), Clock(device)
        self.spans: dict[str, list[tuple[Any, Any]]] = {"vision": [], "forward": []}

    def _bracket(self, name: str) -> tuple[Callable, Callable]:
        def before(*_: Any) -> None:
            self.spans[name].append((self.clock.mark(), None))

        def after(*_: Any) -> None:
            start, _ = self.spans[name][-1]
            self.spans[name][-1] = (start, self.clock.mark())

        return before, after

    def __enter__(self) -> GenerationTimer:
        self.handles = []
        for name, module in [*(("vision", tower) for tower in self.vision), ("forward", self.model)]:
            before, after = self._bracket(name)
            self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        for handle in self.handles:
            handle.remove()
        if exc_type is not None:  # a failed call leaves open spans; let its error through
            return
        seconds = {name: [self.clock.seconds(s, e) for s, e in spans] for name, spans in self.spans.items()}
        self.vision_s = sum(seconds["vision"])
        forwards = seconds["forward"]
        # The first forward is the prefill; with a plain forward (no generate) the vision tower runs inside it.
        self.prefill_s = forwards[0] if forwards else 0.0
        self.decode_s_per_token = statistics.fmean(forwards[1:]) if len(forwards) > 1 else 0.0


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Run `fn` warmup + repeats times; return the timed repeats (take the median for reports)."""
    clock = Clock(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        times.append(clock.seconds(start, clock.mark()))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
