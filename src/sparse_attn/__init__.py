"""sparse-attn: block-sparse attention for long-context prefill.

estimator (which blocks matter) -> BlockSparsePattern -> backend (computes exactly those).
"""

from . import metrics, models
from .api import SparseAttentionInfo, block_sparse_attention, estimate, sparse_attention
from .integrations import patch, record, unpatch
from .pattern import BlockSparsePattern, dense_pattern, random_pattern
from .registry import Method, get_method, list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "BlockSparsePattern",
    "Method",
    "SparseAttentionInfo",
    "block_sparse_attention",
    "dense_pattern",
    "estimate",
    "get_method",
    "list_methods",
    "metrics",
    "models",
    "patch",
    "random_pattern",
    "record",
    "register_method",
    "sparse_attention",
    "unpatch",
]
