"""Differences between transformers 5.x releases: 5.24 renamed `past_key_values` to `cache` (kwargs and
outputs); Qwen2.5-VL's window index is the tower's method in 5.0 and a shared function in 5.24."""

from __future__ import annotations

from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


def cache_in(kwargs: dict) -> Any:
    """The KV cache passed to a forward call, under either name (None when absent)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def cache_of(output: Any) -> Any:
    """The KV cache a forward or generate call returned, under either attribute name."""
    return next((getattr(output, name) for name in CACHE_NAMES if getattr(output, name, None) is not None), None)


def vision_window_index(visual: Any, grid_thw: Any) -> Any:
    """Qwen2.5-VL's window permutation of the merged vision tokens for these grids (the order the tower's
    blocks see them in): the tower's `get_window_index` (5.0) or transformers.vision_utils' function (5.24)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)[0]
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)[0]
