"""Sampled-row scoring (ProxyAttn): exact softmax of a few query rows per query block against every key.

Per query block, the largest share of its attention that any sampled row puts on each KV
block. Rows come from :func:`sampled_query_rows`. Reference: :mod:`.naive` (any rows);
kernel: the scoring kernel of :mod:`sparse_attn.ops.antidiagonal` through :mod:`.triton`,
when the rows are every ``query_step``-th query (block and sequence lengths multiples of
it), chosen by the dispatch rule of :mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from ...geometry import num_blocks
from .._dispatch import kernel_for
from ..block_rows import query_block_range
from .naive import max_row_block_probs, sampled_query_rows

__all__ = ["sampled_query_rows", "sampled_rows_block_max_probs"]


def sampled_rows_block_max_probs(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    *,
    rows: torch.Tensor,
    seq_q: int,
    query_step: int,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """Per query block of ``q_blocks`` (default: all), the max over its sampled rows of each row's softmax mass per KV block.

    ``rows`` = ``sampled_query_rows(seq_q, block_q, query_step)``; q_rows ``(B, Hq, len(rows), D)``
    are the queries at those rows of ``seq_q`` queries (the last ``seq_q`` of k's ``Sk``
    positions), k ``(B, Hkv, Sk, D)``. Returns float32 ``(B, Hq, len(q_blocks), n_kv)``; only
    the rows of ``q_blocks`` are scored.
    """
    blocks = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    case = dict(seq_q=seq_q, query_step=query_step, block_q=block_q, block_k=block_k)
    kernel = kernel_for(q_rows, __package__, **case)
    if kernel is not None:
        return kernel.sampled_rows_block_max_probs_triton(
            q_rows, k, **case, scale=scale, causal=causal, q_blocks=q_blocks
        )
    # Rows are sorted: those of the query blocks in range are one slice.
    bounds = torch.tensor([blocks.start * block_q, blocks.stop * block_q], device=rows.device)
    first, stop = torch.searchsorted(rows, bounds).tolist()
    chosen = rows[first:stop]
    return max_row_block_probs(
        q_rows[:, :, first:stop],
        chosen + (k.shape[2] - seq_q),
        k,
        row_blocks=chosen // block_q - blocks.start,
        n_q=len(blocks),
        block_k=block_k,
        scale=scale,
        causal=causal,
    )
