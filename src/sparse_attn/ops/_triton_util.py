"""Triton device functions shared by several operator kernels (imported by ``<op>/triton.py`` only,
so importing :mod:`sparse_attn.ops` never imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_rows", "visible_key_blocks"]


@triton.jit
def dot_rows(a, b_rows, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b_rows^T`` (``b_rows`` row-major, one row per output column), in float32
    products when ``DOT_FP32``."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b_rows.to(tl.float32)), acc, input_precision=PRECISION)
    return tl.dot(a, tl.trans(b_rows), acc, input_precision=PRECISION)


@triton.jit
def visible_key_blocks(position, valid, first, last, seq_k, BLOCK_N: tl.constexpr):
    """The key blocks ``[first, last)`` of a tile of rows at ``position`` (int32, ``valid`` rows
    only; keys after a row's position are hidden from it): ``(visible_end, full_end)``. Blocks
    from ``visible_end`` on are hidden from every row; blocks before ``full_end`` are whole (inside
    ``seq_k``) and visible to every valid row, so they need no mask."""
    reach = tl.max(tl.where(valid, position, -1), axis=0)
    visible_end = tl.minimum(last, tl.maximum(reach // BLOCK_N + 1, first))
    lowest = tl.min(tl.where(valid, position, reach), axis=0)
    full_end = tl.minimum(seq_k // BLOCK_N, (lowest + 1) // BLOCK_N)
    return visible_end, full_end
