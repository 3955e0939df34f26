"""Triton device functions shared by several operator kernels (imported by ``<op>/triton.py`` only,
so importing :mod:`sparse_attn.ops` never imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_rows"]


@triton.jit
def dot_rows(a, b_rows, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b_rows^T`` (``b_rows`` row-major, one row per output column), in float32
    products when ``DOT_FP32``."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b_rows.to(tl.float32)), acc, input_precision=PRECISION)
    return tl.dot(a, tl.trans(b_rows), acc, input_precision=PRECISION)
