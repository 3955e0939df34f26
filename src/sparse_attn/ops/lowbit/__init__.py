"""Low-bit quantisation of queries and keys, emulated in PyTorch: what a 4-bit or fp8 scoring kernel sees.

SALE scores every query-key pair from 4-bit quantised queries and keys. :func:`quantize` gives
per token the codes (4-bit: symmetric integers in ``[-7, 7]`` stored as int8, with
``scale = absmax / 7``; fp8: ``float8_e4m3fn`` values with ``scale = absmax / 448``) and the
scale, so the stored size is that of the low-bit format plus one float per token. A product
of codes times both scales is the kernel's arithmetic: the integer products of 4-bit codes are
exact in float32 (at most ``49 * D``), fp8 products are formed in float32 as a tensor core with
float32 accumulation forms them. The ``center`` (a per-head mean over the sequence,
:func:`sequence_mean`) is subtracted first: SageAttention's smoothing, which SALE uses, shrinks
the range to quantise without changing any softmax over keys.
:func:`quantize_per_head` gives one scale per (batch, head) instead, for kernels that fold the
scales into their softmax scale (XAttention's fp8 antidiagonal scoring, :mod:`sparse_attn.ops.antidiagonal`).
:func:`quantize_per_head` to fp8 runs a two-pass Triton kernel on CUDA (:mod:`.triton`, the
reference's codes and scales; see there for how far that is tested); everything else is the
PyTorch code of :mod:`.naive`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from . import naive
from .naive import FORMATS, dequantize, quantize, sequence_mean


def quantize_per_head(
    x: torch.Tensor, fmt: str = "fp8", *, center: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head) symmetric quantisation of ``x - center``: ``(codes, scale)``
    (:func:`.naive.quantize_per_head`; fp8 on CUDA through the kernel of :mod:`.triton`)."""
    kernel = kernel_for(x, __package__, fmt=fmt, center=center)
    if kernel is not None:
        return kernel.quantize_per_head_triton(x, fmt, center=center)
    return naive.quantize_per_head(x, fmt, center=center)


__all__ = ["FORMATS", "dequantize", "quantize", "quantize_per_head", "sequence_mean"]
