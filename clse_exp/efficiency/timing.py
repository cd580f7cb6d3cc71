"""Wall-clock of the phases of generate(): vision encoder, prefill (time to first token), decode steps.

On CUDA the phases are bracketed with CUDA events and read after a synchronize (no sync inside the
timed region); on CPU with perf_counter. Hooks on the vision tower and the top-level forward mark the
phases, so stock generate() runs unchanged.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Clock:
    """Marks on a device timeline: perf_counter on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for the device (a no-op on CPU): for host-side timers around device work."""
        if self.cuda:
            torch.cuda.synchronize()

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
    """Attach around generate(): afterwards `vision_s`, `prefill_s` and `decode_s_per_token` are set, and
    `prefill_end_host`: the host clock (perf_counter) when the prefill returned, to tell its host work apart."""

    def __init__(self, model: nn.Module, vision: Sequence[nn.Module], device: torch.device) -> None:
        self.model, self.vision, self.clock = model, list(vision), Clock(device)
        self.spans: dict[str, list[tuple[Any, Any]]] = {"vision": [], "forward": []}
        self.host_ends: dict[str, list[float]] = {"vision": [], "forward": []}  # perf_counter as each span ends

    def _bracket(self, name: str) -> tuple[Callable, Callable]:
        def before(*_: Any) -> None:
            self.spans[name].append((self.clock.mark(), None))

        def after(*_: Any) -> None:
            start, _ = self.spans[name][-1]
            self.spans[name][-1] = (start, self.clock.mark())
            self.host_ends[name].append(time.perf_counter())

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
        self.prefill_end_host = self.host_ends["forward"][0] if forwards else 0.0
        self.decode_s_per_token = statistics.fmean(forwards[1:]) if len(forwards) > 1 else 0.0


@contextmanager
def time_calls(owner: Any, name: str, log: list[tuple[float, float]], clock: Clock | None = None,
               of_result: bool = False) -> Iterator[list[tuple[float, float]]]:
    """Inside the block, every call of `owner.<name>` appends (host start, seconds) to `log`; with
    `of_result`, `owner.<name>` is a factory and the callables it returns are timed instead (hooks). With a
    CUDA `clock` each call is synchronized before and after (device work included); without, host time.
    The attribute is restored on exit."""
    original = getattr(owner, name)
    own = vars(owner).get(name)  # an attribute set on the instance itself comes back as it was

    def timed(fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if clock is not None:
                clock.sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if clock is not None:
                clock.sync()
            log.append((start, time.perf_counter() - start))
            return result

        return call

    setattr(owner, name, (lambda *a, **k: timed(original(*a, **k))) if of_result else timed(original))
    try:
        yield log
    finally:
        if own is None:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


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
