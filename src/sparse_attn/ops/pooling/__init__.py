"""Pooling: mean-pooled blocks, pooled block logits ``pool(Q) pool(K)^T``, block softmax.

The cheapest block score (MInference's block-sparse head, FlexPrefill's query-aware heads,
ProxyAttn's budgets). No fused kernel: a matmul over pooled blocks is already small, so the
PyTorch code in :mod:`.naive` is the implementation and the entry point.
"""

from .naive import block_softmax, mean_pool_blocks, pooled_block_logits

__all__ = ["block_softmax", "mean_pool_blocks", "pooled_block_logits"]
