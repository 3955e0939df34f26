"""Mean-pooled blocks and their scores in PyTorch (the implementation; there is no fused kernel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...geometry import num_blocks
from .._chunking import CHUNK_ELEMENTS
from ..block_rows import QueryBlocks, causal_block_rows, query_block_range, query_block_rows
from ..gqa import grouped_matmul, kv_heads_of

__all__ = ["PooledBlocks", "block_softmax", "mean_pool_blocks"]


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


@dataclass(frozen=True)
class PooledBlocks:
    """Mean-pooled query and key blocks of one estimate: pooled once, scored a chunk of query blocks at a time.

    ``q`` float32 ``(B, Hq, n_q, D)`` and ``k`` float32 ``(B, Hkv, n_kv, D)`` (GQA: K is not
    expanded) are ``O(S * D)``; the block scores they give are ``O(n_q * n_kv)`` per head and
    are only ever built for a chunk (:meth:`logits`).
    """

    q: torch.Tensor
    k: torch.Tensor
    seq_q: int
    seq_k: int
    block_q: int
    block_k: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int) -> PooledBlocks:
        """Pool q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)`` over their blocks."""
        return cls(
            q=mean_pool_blocks(q, block_q),
            k=mean_pool_blocks(k, block_k),
            seq_q=q.shape[2],
            seq_k=k.shape[2],
            block_q=block_q,
            block_k=block_k,
        )

    def logits(
        self, *, scale: float, causal: bool, q_blocks: QueryBlocks | None = None, heads: range | None = None
    ) -> torch.Tensor:
        """Scaled ``pool(q) · pool(k)`` of query blocks ``q_blocks`` (a range or a tuple of block numbers)
        and query heads ``heads`` (default: all).

        Float32 ``(B, len(heads), len(q_blocks), n_kv)``; causally invalid block pairs are
        ``-inf``, and every row keeps at least its diagonal. ``heads`` must lie within one KV
        head or be whole GQA groups (:func:`sparse_attn.ops.gqa.head_chunks`).
        """
        rows = q_blocks if isinstance(q_blocks, tuple) else query_block_range(self.q.shape[2], q_blocks)
        heads = range(self.q.shape[1]) if heads is None else heads
        group = self.q.shape[1] // self.k.shape[1]
        pooled_q = query_block_rows(self.q[:, heads.start : heads.stop], rows, dim=2)
        logits = grouped_matmul(pooled_q, self.k[:, kv_heads_of(heads, group)]) * scale
        if causal:
            valid = causal_block_rows(self.seq_q, self.seq_k, self.block_q, self.block_k, rows, self.q.device)
            logits = logits.masked_fill(~valid, float("-inf"))
        return logits


def block_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in float32 (rows always hold a finite entry here)."""
    return torch.softmax(logits.float(), dim=-1)
