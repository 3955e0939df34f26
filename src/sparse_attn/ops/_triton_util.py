"""Triton device functions shared by several operator kernels (imported by ``<op>/triton.py`` only,
so importing :mod:`sparse_attn.ops` never imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_rows", "split_key_blocks"]


@triton.jit
def dot_rows(a, b_rows, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b_rows^T`` (``b_rows`` row-major, one row per output column), in float32
    products when ``DOT_FP32``."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b_rows.to(tl.float32)), acc, input_precision=PRECISION)
    return tl.dot(a, tl.trans(b_rows), acc, input_precision=PRECISION)


@triton.jit
def split_key_blocks(Positions, row, valid, n_kv, blocks_per_split, seq_k, BLOCK_N: tl.constexpr,
                     HAS_POSITIONS: tl.constexpr):  # fmt: skip
    """This program's key blocks ``[first, last)`` (split ``tl.program_id(2)`` of ``n_kv`` blocks,
    ``blocks_per_split`` each) for a tile of rows ``row`` (``valid`` ones only), and what its rows
    see of them: ``(first, last, visible_end, full_end, position)``. With ``HAS_POSITIONS`` each
    row sees the keys up to its position (int64 ``Positions[row]``, read as int32): blocks from
    ``visible_end`` on are hidden from every row, and blocks before ``full_end`` are whole (inside
    ``seq_k``) and visible to every valid row, so they need no mask. Without positions every
    block is visible, ``full_end`` is the last whole block, and ``position`` is unused."""
    first = tl.program_id(2) * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_kv)
    full_end = seq_k // BLOCK_N
    if HAS_POSITIONS:
        position = tl.load(Positions + row, mask=valid, other=-1).to(tl.int32)
        reach = tl.max(tl.where(valid, position, -1), axis=0)
        visible_end = tl.minimum(last, tl.maximum(reach // BLOCK_N + 1, first))
        lowest = tl.min(tl.where(valid, position, reach), axis=0)
        full_end = tl.minimum(full_end, (lowest + 1) // BLOCK_N)
    else:
        position = tl.zeros_like(row).to(tl.int32)
        visible_end = last
    return first, last, visible_end, full_end, position
