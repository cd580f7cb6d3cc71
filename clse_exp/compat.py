"""transformers renamed `past_key_values` to `cache` (kwargs and outputs) in 5.24; accept both spellings."""

from __future__ import annotations

from typing import Any

CACHE_NAMES = ("cache", "past_key_values")


def cache_in(kwargs: dict) -> Any:
    """The KV cache passed to a forward call, under either name (None when absent)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def cache_of(output: Any) -> Any:
    """The KV cache a forward or generate call returned, under either attribute name."""
    return next((getattr(output, name) for name in CACHE_NAMES if getattr(output, name, None) is not None), None)
