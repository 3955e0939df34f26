"""Mean-pooled blocks and their scores in PyTorch (the implementation; there is no fused kernel)."""

from __future__ import annotations

import torch

from ...geometry import causal_block_mask, num_blocks
from .._chunking import CHUNK_ELEMENTS
from ..gqa import grouped_matmul

__all__ = ["block_softmax", "mean_pool_blocks", "pooled_block_logits"]


def mean_pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` positions of ``x`` ``(B, H, S, D)``, float32 ``(B, H, n_blocks, D)``.

    A last partial block is averaged over its real positions only.
    """
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    whole = length // block
    # No padded or float32 copy of the whole sequence (at 128K tokens and 32 heads one would
    # take 2 GiB): full blocks are summed from a view, the partial block separately, a few
    # heads at a time so any float32 temporary stays under CHUNK_ELEMENTS.
    heads_per_chunk = max(1, CHUNK_ELEMENTS // max(1, batch * length * dim))
    sums = torch.empty((batch, heads, n, dim), dtype=torch.float32, device=x.device)
    for first in range(0, heads, heads_per_chunk):
        part = x[:, first : first + heads_per_chunk]
        chunk = part.shape[1]
        if whole:
            blocks = part[:, :, : whole * block].reshape(batch, chunk, whole, block, dim)
            sums[:, first : first + chunk, :whole] = blocks.sum(3, dtype=torch.float32)
        if whole < n:
            tail = part[:, :, whole * block :]
            sums[:, first : first + chunk, whole:] = tail.sum(2, keepdim=True, dtype=torch.float32)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = length - (n - 1) * block
    return sums / counts[:, None]


def pooled_block_logits(
    q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int, scale: float, causal: bool
) -> torch.Tensor:
    """Scaled ``mean_pool(q) · mean_pool(k)`` per block pair, float32 ``(B, Hq, n_q, n_kv)``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` (GQA: K is not expanded). Causally invalid
    block pairs are ``-inf``; every row keeps at least its diagonal.
    """
    pooled_q = mean_pool_blocks(q, block_q)
    pooled_k = mean_pool_blocks(k, block_k)
    logits = grouped_matmul(pooled_q, pooled_k) * scale
    if causal:
        valid = causal_block_mask(q.shape[2], k.shape[2], block_q, block_k, q.device)
        logits = logits.masked_fill(~valid, float("-inf"))
    return logits


def block_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in float32 (rows always hold a finite entry here)."""
    return torch.softmax(logits.float(), dim=-1)
