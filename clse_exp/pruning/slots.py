"""Which original tokens occupy the sequence slots at a layer, and how to shrink that set per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slots:
    """`idx` [B, L]: ORIGINAL sequence index of each slot; slots are in the order the layer sees them.
    `valid` [B, L]: False for padding (left padding of the batch, and re-padding after a cut)."""

    idx: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def initial(cls, batch: int, length: int, mask2d: torch.Tensor | None, device: torch.device) -> Slots:
        idx = torch.arange(length, device=device).expand(batch, length)
        valid = mask2d.bool() if mask2d is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        return cls(idx, valid)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """Pick the slots' entries from a per-original-token tensor `full` [B, S, ...]."""
        return gather_rows(full.expand(self.idx.shape[0], *full.shape[1:]), self.idx)

    def lookup(self, original: torch.Tensor, b: int) -> torch.Tensor:
        """Slot positions of sample b's ORIGINAL indices `original` (each must be a real slot here)."""
        table = torch.full((int(self.idx.max()) + 1,), -1, dtype=torch.long, device=self.idx.device)
        table[self.idx[b][self.valid[b]]] = self.valid[b].nonzero().flatten()
        found = table[original]
        if bool((found < 0).any()):
            raise RuntimeError("a token was looked up at a layer where it was already pruned")
        return found


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, S, ...] gathered along dim 1 at index [B, L] -> [B, L, ...]."""
    if values.dim() > 2:
        index = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


def shrink(slots: Slots, keep_rows: list[torch.Tensor]) -> tuple[Slots, torch.Tensor]:
    """Keep, for each sample b, the slot positions `keep_rows[b]` in that order, left-padding to equal length.

    Returns the new Slots and `rel` [B, L']: for each new slot, its position among the old slots
    (pad slots point at old slot 0 and are marked invalid), to gather hidden states with.
    """
    length = max(len(row) for row in keep_rows)
    device = slots.idx.device
    rel = torch.zeros(len(keep_rows), length, dtype=torch.long, device=device)
    valid = torch.zeros(len(keep_rows), length, dtype=torch.bool, device=device)
    for b, row in enumerate(keep_rows):
        rel[b, length - len(row):] = row
        valid[b, length - len(row):] = True
    return Slots(slots.idx.gather(1, rel), valid), rel
