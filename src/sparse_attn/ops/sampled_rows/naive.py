"""Sampled-row block scoring in PyTorch: the reference of :mod:`.triton` and the path for irregular rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...geometry import num_blocks, query_block_positions
from .._chunking import CHUNK_ELEMENTS
from ..gqa import grouped_matmul

__all__ = ["max_row_block_probs", "sampled_query_rows"]


def sampled_query_rows(seq_q: int, block_q: int, every: int, device) -> torch.Tensor:
    """Query rows ``every-1, 2*every-1, ...`` within each query block, plus each block's last row.

    int64, sorted, unique. Sampling restarts at every block, so every query block (even a
    short last one) has at least one row, its last, which sees the most keys; with ``every >
    block_q`` that row is the block's only one.
    """
    block_starts, last_rows = query_block_positions(seq_q, seq_q, block_q, device)
    in_block = torch.arange(every - 1, max(block_q, every - 1), every, device=device)
    rows = (block_starts[:, None] + in_block[None, :]).reshape(-1)
    rows = torch.cat([rows[rows < seq_q], last_rows])
    return torch.unique(rows)


def max_row_block_probs(
    q_rows: torch.Tensor,
    row_positions: torch.Tensor,
    k: torch.Tensor,
    *,
    row_blocks: torch.Tensor,
    n_q: int,
    block_k: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Exact per-row softmax mass on each KV block, maximized over the rows of each query block.

    q_rows ``(B, Hq, R, D)`` at absolute ``row_positions`` ``(R,)``, k ``(B, Hkv, Sk, D)``;
    ``row_blocks`` ``(R,)`` is each row's query block. Returns float32 ``(B, Hq, n_q, n_kv)``:
    the largest share of its attention that any sampled row of the query block puts on the
    KV block. Chunked over rows (the full-resolution logits of a chunk stay under
    ``CHUNK_ELEMENTS``).
    """
    batch, heads, rows, _ = q_rows.shape
    seq_k = k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    key_positions = torch.arange(n_kv * block_k, device=k.device)
    out = torch.zeros((batch, heads, n_q, n_kv), device=k.device)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (4 * batch * heads * n_kv * block_k))
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        logits = grouped_matmul(q_rows[:, :, start:stop], k).float() * scale
        logits = F.pad(logits, (0, n_kv * block_k - seq_k), value=float("-inf"))
        if causal:
            future = key_positions[None, :] > row_positions[start:stop, None]
            logits.masked_fill_(future, float("-inf"))
        block_lse = torch.logsumexp(logits.view(batch, heads, stop - start, n_kv, block_k), dim=-1)
        probs = torch.exp(block_lse - torch.logsumexp(block_lse, dim=-1, keepdim=True))
        index = row_blocks[start:stop].view(1, 1, -1, 1).expand_as(probs)
        out.scatter_reduce_(2, index, probs, reduce="amax")
        del logits, block_lse, probs
    return out
