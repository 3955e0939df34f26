"""Vertical and slash lines -> the blocks they cross, in PyTorch (the reference of :mod:`.triton`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...geometry import num_blocks, query_block_positions
from .._chunking import CHUNK_ELEMENTS
from ..block_rows import query_block_range

__all__ = ["exclusive_prefix", "vertical_slash_block_mask"]


def _inclusive_counts(prefix: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Number of set entries in ``[low, high]`` from an exclusive prefix count ``(…, L + 1)``.

    ``low``/``high`` broadcast to ``(n_q, n_kv)``; empty ranges (high < low) count 0.
    """
    length = prefix.shape[-1] - 1
    low_c = low.clamp(0, length)
    high_c = (high + 1).clamp(0, length)
    lead = prefix.shape[:-1]
    shape = (*lead, *torch.broadcast_shapes(low.shape, high.shape))
    flat_low = low_c.expand(shape[len(lead) :]).reshape(-1)
    flat_high = high_c.expand(shape[len(lead) :]).reshape(-1)
    upper = prefix.index_select(-1, flat_high).view(shape)
    lower = prefix.index_select(-1, flat_low).view(shape)
    return (upper - lower).clamp(min=0)


def exclusive_prefix(selected: torch.Tensor) -> torch.Tensor:
    """Int32 ``(…, L + 1)``: entry ``t`` counts the set entries of bool ``selected`` ``(…, L)`` before ``t``."""
    return F.pad(torch.cumsum(selected, dim=-1, dtype=torch.int32), (1, 0))


def vertical_slash_block_mask(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    *,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool = True,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """The blocks that selected key columns and diagonals cross, bool ``(B, H, len(q_blocks), n_kv)``.

    ``vertical`` bool ``(B, H, Sk)``: selected key positions. ``slash`` bool ``(B, H, Sk)``:
    selected distances ``o = query position - key position``. Block ``(i, j)`` is covered
    when a selected column in block ``j`` is at or before the block's last query, or when a
    selected distance joins a query of block ``i`` to a key of block ``j``. Counted with
    prefix sums, so the cost is ``O(n_q * n_kv)`` per head whatever the number of lines.
    Only query blocks ``q_blocks`` (default: all) are built, a few heads and rows at a time.
    """
    rows = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    n_kv = num_blocks(seq_k, block_k)
    batch, heads = vertical.shape[:2]
    # The prefix-count lookups hold a few int32 (rows, n_kv) tensors per head and two int64
    # (rows, n_kv) index tables: a few heads and rows at a time.
    heads_per_piece = max(1, min(heads, CHUNK_ELEMENTS // (8 * batch * len(rows) * n_kv)))
    rows_per_piece = max(1, CHUNK_ELEMENTS // (8 * batch * heads_per_piece * n_kv))
    vertical_prefix, slash_prefix = exclusive_prefix(vertical), exclusive_prefix(slash)
    if heads_per_piece == heads and rows_per_piece >= len(rows):
        return _crossed_blocks(vertical_prefix, slash_prefix, rows, seq_q, seq_k, block_q, block_k, causal)
    out = torch.empty((batch, heads, len(rows), n_kv), dtype=torch.bool, device=vertical.device)
    for first_head in range(0, heads, heads_per_piece):
        part = slice(first_head, first_head + heads_per_piece)
        for first_row in range(rows.start, rows.stop, rows_per_piece):
            piece = range(first_row, min(rows.stop, first_row + rows_per_piece))
            out[:, part, piece.start - rows.start : piece.stop - rows.start] = _crossed_blocks(
                vertical_prefix[:, part], slash_prefix[:, part], piece, seq_q, seq_k, block_q, block_k, causal
            )
    return out


def _crossed_blocks(
    vertical_prefix: torch.Tensor,
    slash_prefix: torch.Tensor,
    rows: range,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool,
) -> torch.Tensor:
    """:func:`vertical_slash_block_mask` of query blocks ``rows`` from the lines' exclusive prefix counts."""
    device = vertical_prefix.device
    n_kv = num_blocks(seq_k, block_k)
    q_first, q_last = (
        position[rows.start : rows.stop] for position in query_block_positions(seq_q, seq_k, block_q, device)
    )
    k_first = torch.arange(n_kv, device=device) * block_k
    k_last = torch.clamp(k_first + block_k, max=seq_k) - 1

    columns_low = k_first[None, :].expand(len(rows), n_kv)
    columns_high = (
        torch.minimum(k_last[None, :], q_last[:, None]) if causal else k_last[None, :].expand(len(rows), n_kv)
    )
    crossed_columns = _inclusive_counts(vertical_prefix, columns_low, columns_high) > 0
    if not causal:  # distances are only defined looking back
        return crossed_columns

    distance_low = (q_first[:, None] - k_last[None, :]).clamp(min=0)
    distance_high = q_last[:, None] - k_first[None, :]
    crossed_diagonals = _inclusive_counts(slash_prefix, distance_low, distance_high) > 0
    return crossed_columns | crossed_diagonals
