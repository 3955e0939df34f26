"""Sampled-row block scoring on the scoring kernel of :mod:`sparse_attn.ops.antidiagonal.triton`.

Rows sampled every ``query_step`` queries are cells of one row (stride 1) whose last query
sits at position ``(c + 1) * query_step - 1``; reducing a query block's cells by the maximum
instead of the mean gives :func:`.naive.max_row_block_probs` for those rows. The kernel has
one home; this module holds only the case it can take and the entry point.
"""

from __future__ import annotations

import torch

from ..antidiagonal.triton import cell_block_probs
from ..antidiagonal.triton import unsupported_reason as scoring_unsupported_reason

__all__ = ["sampled_rows_block_max_probs_triton", "unsupported_reason"]


def unsupported_reason(q_rows: torch.Tensor, *, seq_q: int, query_step: int, block_q: int, block_k: int) -> str | None:
    """Why :func:`sampled_rows_block_max_probs_triton` cannot run this case, or ``None``."""
    reason = scoring_unsupported_reason(q_rows, stride=1, block_q=block_q // query_step, block_k=block_k)
    if reason is not None:
        return reason
    if block_q % query_step or seq_q % query_step or q_rows.shape[2] != seq_q // query_step:
        return (
            f"needs the sampled rows to be every {query_step}-th query (block_q {block_q} and seq_q {seq_q} "
            f"multiples of it, {seq_q // query_step} rows), got {q_rows.shape[2]} rows"
        )
    return None


def sampled_rows_block_max_probs_triton(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    *,
    seq_q: int,
    query_step: int,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """:func:`.naive.max_row_block_probs` for rows sampled every ``query_step`` queries, in the kernel.

    ``q_rows`` ``(B, Hq, seq_q / query_step, D)`` holds query rows ``query_step - 1,
    2 * query_step - 1, ...`` of ``seq_q`` queries (the last ``seq_q`` of ``k``'s positions).
    Returns float32 ``(B, Hq, len(q_blocks), n_kv)``: per query block of ``q_blocks`` (default:
    all), the largest share of its attention that any of its sampled rows puts on each KV block.
    """
    reason = unsupported_reason(q_rows, seq_q=seq_q, query_step=query_step, block_q=block_q, block_k=block_k)
    if reason is not None:
        raise ValueError(f"the Triton sampled-row kernel cannot run this case: {reason}")
    return cell_block_probs(
        q_rows,
        k,
        stride=1,
        query_step=query_step,
        reduce_max=True,
        seq_q=seq_q,
        block_q=block_q,
        block_k=block_k,
        scale=scale,
        causal=causal,
        q_blocks=q_blocks,
    )
