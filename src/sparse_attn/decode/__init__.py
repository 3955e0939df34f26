"""Sparse decode: a paged KV cache with page summaries, decode methods that select pages or tokens, the split-K kernel.

``PagedKVCache`` (one layer's cache) -> a decode method's ``DecodeSelection`` (per sequence and
KV head, the pages or tokens to read) -> :func:`sparse_attn.ops.paged_decode.paged_decode`.
:func:`sparse_decode` runs one layer's step. Decode methods have their own registry
(:func:`register_decode_method`, :func:`list_decode_methods`), beside the prefill methods.
"""

from __future__ import annotations

from . import methods  # noqa: F401  (registers the decode methods)
from .attention import sparse_decode
from .cache import PagedKVCache
from .methods.double_sparsity import calibrate_label_channels
from .registry import DecodeMethod, get_decode_method, list_decode_methods, register_decode_method
from .selection import DecodeSelection

__all__ = [
    "DecodeMethod",
    "DecodeSelection",
    "PagedKVCache",
    "calibrate_label_channels",
    "get_decode_method",
    "list_decode_methods",
    "register_decode_method",
    "sparse_decode",
]
