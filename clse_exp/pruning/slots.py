"""Which original tokens occupy the sequence slots at a layer, and how to shrink that set per sample.

Every operation here is batched and reads nothing back to the host: the shapes come from counts the engine
already knows on the host (how many tokens each sample keeps), the contents stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Slots:
    """`idx` [B, L]: ORIGINAL sequence index of each slot; slots are in the order the layer sees them.
    `valid` [B, L]: False for padding (left padding of the batch, and re-padding after a cut).
    `length`: the original sequence length (the range of `idx`)."""

    idx: torch.Tensor
    valid: torch.Tensor
    length: int = 0

    @classmethod
    def initial(cls, batch: int, length: int, mask2d: torch.Tensor | None, device: torch.device) -> Slots:
        idx = torch.arange(length, device=device).expand(batch, length)
        valid = mask2d.bool() if mask2d is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        return cls(idx, valid, length)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """Pick the slots' entries from a per-original-token tensor `full` [B, S, ...]."""
        return gather_rows(full.expand(self.idx.shape[0], *full.shape[1:]), self.idx)

    @cached_property
    def table(self) -> torch.Tensor:
        """[B, S]: the slot holding each ORIGINAL index (a real slot), -1 where no real slot holds it."""
        batch, width = self.idx.shape
        length = self.length or width
        table = torch.full((batch, length + 1), -1, dtype=torch.long, device=self.idx.device)
        target = torch.where(self.valid, self.idx, length)  # padding slots write into the spare last column
        table.scatter_(1, target, torch.arange(width, device=self.idx.device).expand(batch, width))
        return table[:, :length]

    def lookup(self, original: torch.Tensor, b: int) -> torch.Tensor:
        """Slot positions of sample b's ORIGINAL indices `original` (each must be a real slot here)."""
        return self.table[b, original]

    def lookup_all(self, original: torch.Tensor) -> torch.Tensor:
        """[B, n] slot positions of each sample's ORIGINAL indices `original` [B, n] (real slots here)."""
        return self.table.gather(1, original)


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, S, ...] gathered along dim 1 at index [B, L] -> [B, L, ...]."""
    if values.dim() > 2:
        index = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


def positions_of(mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width]: per row, the positions where `mask` [B, L] is True, ascending, then filler positions where
    it is False (a row with fewer than `width` True entries; callers know each row's count on the host)."""
    order = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    return order[:, :width]


def shrink(slots: Slots, keep: torch.Tensor, length: int) -> tuple[Slots, torch.Tensor]:
    """Keep, per sample, the slots where `keep` [B, L] is True, in slot order, left-padded to `length` (the
    largest kept count, known on the host).

    Returns the new Slots and `rel` [B, length]: for each new slot, its position among the old slots (pad
    slots point at a dropped old slot and are marked invalid), to gather hidden states with.
    """
    width = keep.shape[1]
    # dropped slots sort first, kept slots last, each group ascending: the last `length` are the new slots
    key = torch.arange(width, device=keep.device) + keep.long() * width
    rel = key.argsort(dim=1)[:, width - length:]
    return Slots(slots.idx.gather(1, rel), keep.gather(1, rel), slots.length), rel
