"""One typed record per prefill: what every layer processed and cached, and what each stage kept.

FLOPs, KV-cache bytes, retention, positional statistics and kept-token overlays are all computed from
it, so no policy strings travel between the engine, the runner and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# A sample's achieved retention may differ from `keep` by this much plus half a token per grid (counts are
# whole tokens per grid or frame) before its record is flagged as departing from the asked budget.
RETENTION_ATOL = 0.02


@dataclass
class StageRecord:
    """One cut before decoder `layer`, for every sample of the batch."""

    layer: int
    budget: list[int]  # per sample: visual tokens the stage was asked to keep
    kept: list[list[int]]  # per sample: kept ORIGINAL visual indices, in the order they sit in the sequence
    merged: list[int]  # per sample: kept tokens whose hidden states a merge replaced
    seconds: float = 0.0
    aux_flops: list[int] = field(default_factory=list)  # per sample: FLOPs of the method's work outside the model


@dataclass
class SampleRecord:
    """One sample's prefill. Token counts include the real text tokens (padding excluded)."""

    n_visual: int
    n_prompt: int  # real prompt tokens (text + visual) before any cut
    grids: list[list[int]]
    processed: list[int]  # per decoder layer: tokens it ran on at prefill
    cached: list[int]  # per decoder layer: tokens its KV cache holds after prefill
    kept_per_stage: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # ORIGINAL visual indices after the last cut
    # the kept counts do not stand for the asked budget: the image is too small, or a count rule (an official
    # table or formula, a pooled grid) departs from keep beyond its rounding; retention says what was kept
    budget_unreachable: bool = False
    # the grids of the unreduced input when the method reduced it before the model (downsampled images):
    # n_visual and n_prompt then count that input, while grids and kept describe the tokens really fed
    original_grids: list[list[int]] | None = None
    aux_flops: int = 0  # FLOPs the method spent outside the model (Selection.aux_flops, summed over stages)

    @property
    def visual_per_layer(self) -> list[int]:
        n_text = self.n_prompt - self.n_visual
        return [tokens - n_text for tokens in self.processed]

    @property
    def retention(self) -> dict[str, float]:
        """Exact layer-averaged and final fraction of the visual tokens each layer processed."""
        if not self.n_visual:
            return {"average": 1.0, "final": 1.0}
        per_layer = self.visual_per_layer
        return {"average": sum(per_layer) / (self.n_visual * len(per_layer)), "final": per_layer[-1] / self.n_visual}

    def rounding_allowance(self) -> float:
        """Half a token per grid (video frame) over the visual tokens: how far whole-token counts per grid
        may legitimately sit from an exact share."""
        grids = self.original_grids or self.grids or [[1, 0, 0]]
        return 0.5 * sum(int(grid[0]) for grid in grids) / self.n_visual if self.n_visual else 0.0

    def departure(self, keep: float, budget: str) -> float | None:
        """The achieved `budget` retention ("average" or "final") when it departs from `keep` by more than
        RETENTION_ATOL plus the rounding allowance, else None."""
        achieved = self.retention[budget]
        return achieved if abs(achieved - keep) > RETENTION_ATOL + self.rounding_allowance() + 1e-9 else None

    def as_dict(self) -> dict:
        """The JSON form written to predictions.jsonl."""
        return {
            "n_visual": self.n_visual, "n_prompt": self.n_prompt, "grids": self.grids,
            "kept_per_stage": self.kept_per_stage, "kept": self.kept, "visual_per_layer": self.visual_per_layer,
            "tokens_processed": self.processed, "tokens_cached": self.cached, "retention": self.retention,
            "budget_unreachable": self.budget_unreachable, "original_grids": self.original_grids,
            "aux_flops": self.aux_flops,
        }

    def unreduced(self, original_grids: list[list[int]]) -> SampleRecord:
        """This record counted against the unreduced input (its text tokens are the same): retention and the
        unpruned FLOPs and KV bytes become those of the input the unpruned model would have processed."""
        n = sum(t * h * w for t, h, w in original_grids)
        return replace(self, n_visual=n, n_prompt=self.n_prompt + n - self.n_visual,
                       original_grids=[list(grid) for grid in original_grids])


def unpruned_record(n_prompt: int, n_visual: int, grids: list[list[int]], num_layers: int) -> SampleRecord:
    """The record of a stock prefill: every layer processes and caches the whole prompt."""
    return SampleRecord(n_visual, n_prompt, grids, [n_prompt] * num_layers, [n_prompt] * num_layers,
                        kept=list(range(n_visual)))
