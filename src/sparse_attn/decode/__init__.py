"""Sparse decode: a paged KV cache with page summaries, decode methods that select pages or tokens, the split-K kernel."""

from __future__ import annotations

from .cache import PagedKVCache

__all__ = ["PagedKVCache"]
