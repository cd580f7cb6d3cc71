"""Deterministic cost counts of a forward: aten ops, kernels and host syncs, per phase of a generate call.

Wall time on a loaded CPU or a shared GPU drifts; these counts do not. On a GPU every kernel is a launch and
every host sync stalls the launch queue until the device drains, so an engine that adds syncs or kernels per
sample, per layer or per decode step is slower there even when its FLOPs are lower. Counting on the CPU
through a TorchDispatchMode finds them without a GPU:

- ops: every aten op dispatched (views included).
- kernels: ops that would launch device work (views, metadata ops and scalar reads excluded).
- syncs: ops whose result the host must wait for: scalar reads (`.item()`, `int()`, `bool()`), ops with a
  data-dependent output shape (nonzero, masked_select, unique, boolean-mask indexing, bincount,
  repeat_interleave without output_size), host data made a tensor (`torch.tensor(list)`, a list used as an
  index: a blocking upload on a GPU) and `.tolist()` / `.numpy()`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim",
             "bincount", "lift_fresh", "equal", "allclose", "is_nonzero", "nonzero_static"}
_NO_KERNEL_OPS = {"detach", "lift_fresh", "_local_scalar_dense", "empty", "empty_strided", "empty_like", "new_empty",
                  "new_empty_strided", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
                  "_to_copy_noop", "set_", "resize_", "copy_noop"}
_BOOL_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}


@dataclass
class Counts:
    """Counts for one phase; `sync_ops` says which ops synced (to find them)."""

    ops: int = 0
    kernels: int = 0
    syncs: int = 0
    sync_ops: Counter = field(default_factory=Counter)

    def add(self, name: str, sync: bool, kernel: bool) -> None:
        self.ops += 1
        self.kernels += kernel
        if sync:
            self.syncs += 1
            self.sync_ops[name] += 1

    def as_dict(self) -> dict[str, int]:
        return {"ops": self.ops, "kernels": self.kernels, "syncs": self.syncs}


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the host waits for this op: a scalar read, a data-dependent output shape, or host data uploaded
    (an empty `torch.tensor([])` uploads nothing)."""
    if name == "lift_fresh":
        return args[0].numel() > 0 and args[0].dim() > 0
    if name in _SYNC_OPS:
        return True
    if name in _BOOL_INDEXED:
        return _bool_index(args)
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, list | tuple) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Counter(TorchDispatchMode):
    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        sync = _syncs(name, args, kwargs)
        kernel = not func.is_view and name not in _NO_KERNEL_OPS
        self.tally.add(name, sync, kernel)
        return func(*args, **kwargs)


class Tally:
    """Counts per phase; `phase` is a stack whose top names the phase ops are counted under."""

    def __init__(self, phase: str) -> None:
        self.counts: dict[str, Counts] = {}
        self.phase = [phase]

    def add(self, name: str, sync: bool, kernel: bool) -> None:
        self.counts.setdefault(self.phase[-1], Counts()).add(name, sync, kernel)

    def get(self, phase: str) -> Counts:
        return self.counts.get(phase, Counts())


_ACTIVE: list[Tally] = []


@contextmanager
def count_ops(phase: str = "all") -> Iterator[Tally]:
    """Count every aten op (and `.tolist()` / `.numpy()` reads) dispatched in the block."""
    tally = Tally(phase)
    _ACTIVE.append(tally)
    try:
        with _host_reads(tally), _Counter(tally):
            yield tally
    finally:
        _ACTIVE.remove(tally)


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (made on the host) on `device`, without waiting for the device queue (non-blocking); counted
    as one sync, `upload`, in every running count: on a CPU the copy dispatches nothing to see."""
    for tally in _ACTIVE:
        tally.add("upload", sync=True, kernel=False)
    return tensor.to(device, non_blocking=True)


@contextmanager
def host_side() -> Iterator[None]:
    """Work on host copies (tensors the code itself moved to the CPU, e.g. the prompt ids read once per
    prefill): on a CPU every op looks alike, so such ops are counted under phase `host`, apart from the
    device work, and shown as such. Costs nothing when no count is running."""
    for tally in _ACTIVE:
        tally.phase.append("host")
    try:
        yield
    finally:
        for tally in _ACTIVE:
            tally.phase.pop()


@contextmanager
def _host_reads(tally: Tally) -> Iterator[None]:
    """`.tolist()` and `.numpy()` read tensor data without dispatching an op on the CPU; count them as syncs."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name: str) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            tally.add(name, sync=True, kernel=False)
            return originals[name](self, *args, **kwargs)
        return read

    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextmanager
def generate_phases(model: nn.Module, towers: list[nn.Module]) -> Iterator[Tally]:
    """Count a generate() call of `model` by phase: `vision` (the vision towers), `prefill` (the first forward
    call, towers excluded), `decode` (every later forward call, summed: divide by the steps) and `other` (the
    generate loop between calls, the same with or without pruning)."""
    with count_ops("other") as tally:
        calls = [0]

        def on_call(*_: Any) -> None:
            tally.phase.append("prefill" if calls[0] == 0 else "decode")
            calls[0] += 1

        def on_tower(*_: Any) -> None:
            tally.phase.append("vision")

        def leave(*_: Any) -> None:
            tally.phase.pop()

        handles = [model.register_forward_pre_hook(on_call), model.register_forward_hook(leave)]
        for tower in towers:
            handles += [tower.register_forward_pre_hook(on_tower), tower.register_forward_hook(leave)]
        try:
            yield tally
        finally:
            for handle in handles:
                handle.remove()
