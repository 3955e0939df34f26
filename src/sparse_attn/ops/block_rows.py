"""Ranges of query blocks, the unit in which estimators stream: the geometry's tables restricted to them.

An estimator never builds a whole ``(n_q_blocks, n_kv_blocks)`` table per head: it scores and
selects a range of query blocks at a time (:mod:`.to_pattern`). These helpers give the rows of
:mod:`sparse_attn.geometry`'s block tables for such a range, computed by the geometry's own
functions, so the rule for "causally valid" and "diagonal" has one definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..geometry import causal_block_mask, diagonal_block_mask, num_blocks, query_block_positions

__all__ = [
    "causal_block_rows",
    "causal_block_rows_at",
    "diagonal_block_rows",
    "diagonal_block_rows_at",
    "query_block_range",
    "query_block_chunks",
    "query_block_index",
    "query_block_rows",
    "QueryBlocks",
]

# Query blocks an operator builds rows for: a contiguous range (a chunk of the stream), or a tuple
# of block numbers in any order (rows captured for ``auto``; operators that take them say so).
QueryBlocks = range | tuple[int, ...]


def query_block_range(n_q: int, q_blocks: range | None) -> range:
    """``q_blocks`` checked against ``n_q`` query blocks (``None``: all of them)."""
    if q_blocks is None:
        return range(n_q)
    if q_blocks.step != 1 or not 0 <= q_blocks.start < q_blocks.stop <= n_q:
        raise ValueError(f"q_blocks must be a non-empty contiguous range within [0, {n_q}), got {q_blocks}")
    return q_blocks


def query_block_index(q_blocks: QueryBlocks, device=None) -> torch.Tensor:
    """The block numbers of ``q_blocks`` as an int64 tensor on ``device``: a range is made there
    (no host-to-device copy on the streaming path), a tuple is copied once."""
    if isinstance(q_blocks, range):
        return torch.arange(q_blocks.start, q_blocks.stop, q_blocks.step, dtype=torch.int64, device=device)
    return torch.as_tensor(q_blocks, dtype=torch.int64, device=device)


def query_block_rows(
    table: torch.Tensor, q_blocks: QueryBlocks | None, n_q: int | None = None, dim: int = 0
) -> torch.Tensor:
    """``table``'s rows along ``dim`` (one per query block) for ``q_blocks`` (a range, a tuple of
    block numbers, or None: all), checked against ``n_q`` query blocks (default ``table.shape[dim]``)."""
    n_q = table.shape[dim] if n_q is None else n_q
    if isinstance(q_blocks, tuple):
        if not q_blocks or not all(isinstance(b, int) and 0 <= b < n_q for b in q_blocks):
            raise ValueError(f"q_blocks must be block numbers within [0, {n_q}), got {q_blocks}")
        return table.index_select(dim, query_block_index(q_blocks, table.device))
    rows = query_block_range(n_q, q_blocks)
    return table.narrow(dim, rows.start, len(rows))


def query_block_chunks(n_q: int, rows_per_chunk: int) -> list[range]:
    """``[0, n_q)`` cut into ranges of at most ``rows_per_chunk`` query blocks, the last range first.

    Last first: under a causal mask the last query blocks keep the most KV blocks, so a pattern
    assembled in this order learns its widest row early and rarely has to widen its index table.
    """
    size = max(1, rows_per_chunk)
    return [range(start, min(n_q, start + size)) for start in reversed(range(0, n_q, size))]


def _sub_call(seq_q: int, seq_k: int, block_q: int, rows: range) -> tuple[int, int]:
    """``(seq_q, seq_k)`` of the call whose queries are exactly those of query blocks ``rows``.

    Its queries are those rows' queries and its keys end at their last query, so its query block
    ``i`` is query block ``rows.start + i`` of the full call, at the same positions.
    """
    first_row = rows.start * block_q
    end_row = min(rows.stop * block_q, seq_q)
    return end_row - first_row, seq_k - (seq_q - end_row)


def _padded_to(table: torch.Tensor, n_kv: int) -> torch.Tensor:
    return F.pad(table, (0, n_kv - table.shape[-1]), value=False)


def causal_block_rows(
    seq_q: int, seq_k: int, block_q: int, block_k: int, rows: QueryBlocks, device=None
) -> torch.Tensor:
    """``causal_block_mask(...)[rows]``, bool ``(len(rows), n_kv_blocks)``, without the other rows.

    A range: KV blocks past the rows' last query are invalid for them, so the shorter call's
    table lacks them and they are padded back as False. A tuple: :func:`causal_block_rows_at`.
    """
    if isinstance(rows, tuple):
        return causal_block_rows_at(seq_q, seq_k, block_q, block_k, rows, device)
    sub_q, sub_k = _sub_call(seq_q, seq_k, block_q, rows)
    return _padded_to(causal_block_mask(sub_q, sub_k, block_q, block_k, device), num_blocks(seq_k, block_k))


def diagonal_block_rows(
    seq_q: int, seq_k: int, block_q: int, block_k: int, rows: QueryBlocks, device=None
) -> torch.Tensor:
    """``diagonal_block_mask(...)[rows]``, bool ``(len(rows), n_kv_blocks)``, without the other rows
    (a tuple: :func:`diagonal_block_rows_at`)."""
    if isinstance(rows, tuple):
        return diagonal_block_rows_at(seq_q, seq_k, block_q, block_k, rows, device)
    sub_q, sub_k = _sub_call(seq_q, seq_k, block_q, rows)
    return _padded_to(diagonal_block_mask(sub_q, sub_k, block_q, block_k, device), num_blocks(seq_k, block_k))


def _positions_at(
    seq_q: int, seq_k: int, block_q: int, blocks: Sequence[int], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last absolute position of query blocks ``blocks`` (any order), int64 ``(len(blocks),)``."""
    first, last = query_block_positions(seq_q, seq_k, block_q, device)
    index = query_block_index(tuple(blocks), first.device)
    return first[index], last[index]


def causal_block_rows_at(
    seq_q: int, seq_k: int, block_q: int, block_k: int, blocks: Sequence[int], device=None
) -> torch.Tensor:
    """``causal_block_mask(...)[blocks]`` for any query blocks (not only a range), bool
    ``(len(blocks), n_kv_blocks)``; the geometry's rule, computed for those rows only."""
    _, last = _positions_at(seq_q, seq_k, block_q, blocks, device)
    kv_start = torch.arange(num_blocks(seq_k, block_k), device=last.device, dtype=torch.int64) * block_k
    return kv_start[None, :] <= last[:, None]


def diagonal_block_rows_at(
    seq_q: int, seq_k: int, block_q: int, block_k: int, blocks: Sequence[int], device=None
) -> torch.Tensor:
    """``diagonal_block_mask(...)[blocks]`` for any query blocks, bool ``(len(blocks), n_kv_blocks)``."""
    first, last = _positions_at(seq_q, seq_k, block_q, blocks, device)
    kv_block = torch.arange(num_blocks(seq_k, block_k), device=first.device, dtype=torch.int64)
    return (kv_block[None, :] >= (first // block_k)[:, None]) & (kv_block[None, :] <= (last // block_k)[:, None])
