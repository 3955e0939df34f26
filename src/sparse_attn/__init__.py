"""sparse-attn: block-sparse attention for long-context prefill.

estimator (which blocks matter) -> BlockSparsePattern -> backend (computes exactly those).

``import sparse_attn`` loads only the core (torch and numpy). ``models`` (the embedded
models), ``patch`` / ``unpatch`` / ``record`` (the transformers integration) and
``patch_diffusers`` / ``unpatch_diffusers`` (the diffusers integration) are loaded on first
access, so transformers and diffusers are imported only by code that uses them.
"""

from __future__ import annotations

import importlib

from . import decode, layouts, metrics
from .api import SparseAttentionInfo, block_sparse_attention, estimate, sparse_attention
from .pattern import BlockSparsePattern, dense_pattern, random_pattern
from .registry import Method, get_method, list_methods, register_method

__version__ = "0.1.0"

# Public attributes loaded on first access: name -> (module, attribute in it or None for the module).
_LAZY_ATTRIBUTES = {
    "models": ("sparse_attn.models", None),
    "patch": ("sparse_attn.integrations", "patch"),
    "patch_diffusers": ("sparse_attn.integrations.diffusers", "patch_diffusers"),
    "record": ("sparse_attn.integrations", "record"),
    "unpatch": ("sparse_attn.integrations", "unpatch"),
    "unpatch_diffusers": ("sparse_attn.integrations.diffusers", "unpatch_diffusers"),
}

__all__ = [
    "BlockSparsePattern",
    "Method",
    "SparseAttentionInfo",
    "block_sparse_attention",
    "decode",
    "dense_pattern",
    "estimate",
    "get_method",
    "layouts",
    "list_methods",
    "metrics",
    "models",
    "patch",
    "patch_diffusers",
    "random_pattern",
    "record",
    "register_method",
    "sparse_attention",
    "unpatch",
    "unpatch_diffusers",
]


def __getattr__(name: str):
    if name not in _LAZY_ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY_ATTRIBUTES[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
