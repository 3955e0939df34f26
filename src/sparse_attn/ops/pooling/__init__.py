"""Pooling: mean-pooled blocks, pooled block logits ``pool(Q) pool(K)^T``, block softmax.

The cheapest block score (MInference's block-sparse head, FlexPrefill's query-aware heads,
ProxyAttn's budgets). :class:`PooledBlocks` pools q and k once per estimate and scores one
chunk of query blocks (or query heads) at a time, so the ``O(n_q * n_kv)`` logits of a head
are never built whole by a streaming estimator. No fused kernel: a matmul over pooled blocks
is already small, so the PyTorch code in :mod:`.naive` is the implementation and the entry point.
"""

from .naive import PooledBlocks, block_softmax, mean_pool_blocks

__all__ = ["PooledBlocks", "block_softmax", "mean_pool_blocks"]
