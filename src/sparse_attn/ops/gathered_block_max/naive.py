"""Gathered block maxima in PyTorch: the reference of :mod:`.triton` and the path for every other case."""

from __future__ import annotations

import torch

from ...geometry import num_blocks
from .._chunking import CHUNK_ELEMENTS
from ..block_rows import query_block_index

__all__ = ["gathered_block_max"]


def gathered_block_max(
    q: torch.Tensor,
    k: torch.Tensor,
    units: torch.Tensor,
    present: torch.Tensor,
    *,
    q_blocks: range | tuple[int, ...],
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """Float32 ``(B, Hq, R, C)``: per query block ``q_blocks[r]`` and listed KV block, the largest ``q · k``.

    q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)`` in their own dtype (query head ``h`` reads KV
    head ``h // (Hq // Hkv)``); ``units`` int64 ``(B, Hq, R, C)`` KV block indices, ``present``
    bool ``(B, Hq, R, C)``, ``R = len(q_blocks)``. Entry ``[b, h, r, c]`` is the maximum of the
    unscaled products over the block's real queries (rows ``< Sq``) and the real keys (``< Sk``)
    of KV block ``units[b, h, r, c]``, or ``-inf`` where ``present`` is False (where ``units``
    may lie outside ``[0, n_kv)``). Only the listed KV blocks are gathered, in k's dtype, and
    converted to float32 for the product; a few query blocks at a time, so that the gathered
    keys and their products stay under ``CHUNK_ELEMENTS`` floats.
    """
    batch, q_heads, rows, chunks = units.shape
    out = torch.empty((batch, q_heads, rows, chunks), dtype=torch.float32, device=q.device)
    # Per query block: the gathered keys (in k's dtype, then float32), their products with the
    # block's rows, and the int64 key positions.
    per_block = batch * q_heads * chunks * block_k * (2 * q.shape[-1] + block_q + 2)
    rows_per_piece = max(1, CHUNK_ELEMENTS // per_block)
    for first in range(0, rows, rows_per_piece):
        stop = min(rows, first + rows_per_piece)
        out[:, :, first:stop] = _piece_max(q, k, units[:, :, first:stop], q_blocks[first:stop], block_q, block_k)
    return out.masked_fill_(~present, float("-inf"))


def _piece_max(
    q: torch.Tensor, k: torch.Tensor, units: torch.Tensor, blocks: range | tuple[int, ...], block_q: int, block_k: int
) -> torch.Tensor:
    """:func:`gathered_block_max` of query blocks ``blocks`` (their ``units``), before the ``present`` mask.

    Rows past ``Sq`` and keys past ``Sk`` are read as the last real query and key, which lie in
    the same (last) block: repeating a real row or key leaves the block's maximum unchanged, so
    no mask is needed.
    """
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    rows, chunks = units.shape[2:]
    first_rows = query_block_index(blocks, q.device) * block_q
    query_index = (first_rows[:, None] + torch.arange(block_q, device=q.device)).flatten().clamp(max=seq_q - 1)
    q_rows = q[:, :, query_index].float().view(batch, q_heads, rows, block_q, dim)
    key_index = units.clamp(0, num_blocks(seq_k, block_k) - 1)[..., None] * block_k
    key_index = (key_index + torch.arange(block_k, device=k.device)).clamp(max=seq_k - 1)
    # Whole key rows by advanced indexing (any strides; an index per key, not per element).
    # Query head h reads KV head h // group.
    batch_index = torch.arange(batch, device=k.device).view(batch, 1, 1, 1)
    head_index = (torch.arange(q_heads, device=k.device) // (q_heads // kv_heads)).view(1, q_heads, 1, 1)
    keys = k[batch_index, head_index, key_index.view(batch, q_heads, rows, chunks * block_k)].float()
    logits = q_rows @ keys.transpose(-1, -2)  # (B, Hq, R, block_q, C * block_k)
    return logits.view(batch, q_heads, rows, block_q, chunks, block_k).amax(dim=(3, 5))
