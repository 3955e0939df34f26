"""Per-head fp8 quantisation in Triton: :func:`.naive.quantize_per_head` for ``fmt="fp8"`` in two passes.

The reference makes float32 copies of the input and walks them five times (copy, centre,
absolute value, maximum, divide, cast). Here one pass reads the input once for each (batch,
head)'s largest magnitude of ``x - center`` (a program per run of rows, combined with an
atomic maximum) and a second reads it again and writes the e4m3 codes: about 5 bytes of
traffic per element for a 16-bit input instead of about 30. Same arithmetic as the reference
(``step = absmax / 448``, or 1 for an all-zero head; codes ``(x - center) / step`` in IEEE
division, rounded to nearest-even on the e4m3 grid in float32 before the cast, see
:func:`_round_to_e4m3`), so codes and scales are bit for bit the reference's: tested under the
CPU interpreter (where the host casts the rounded values); on the H200 a first version that let
the conversion round differed in 27 of 16.8M codes; the fix compiles for sm_90 but has not run
on a GPU yet.
XAttention's fp8 scoring quantises every query row and the keys once per estimate through it
(:mod:`sparse_attn.ops.antidiagonal`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import num_blocks
from ...utils import interpreting
from .._dispatch import device_unsupported_reason

__all__ = ["quantize_per_head_triton", "unsupported_reason"]

_FP8_LEVELS = 448.0
_BLOCK_S = 64  # rows per loop step
_ROWS_PER_PROGRAM = 2048  # rows per program: enough programs for a GPU at long context, few atomics


def unsupported_reason(x: torch.Tensor, fmt: str = "fp8", center: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot quantise ``x`` (``(B, H, S, D)``) this way, or ``None``."""
    reason = device_unsupported_reason(x)
    if reason is not None:
        return reason
    if fmt != "fp8":
        return f"quantises to fp8 only, not {fmt}"
    if x.dim() != 4:
        return f"takes (B, H, S, D) tensors, got {x.dim()} dimensions"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32, not {x.dtype}"
    dim = x.shape[-1]
    if dim < 16 or dim > 256 or dim & (dim - 1):
        return f"takes a power-of-two head_dim from 16 to 256, not {dim}"
    if center is not None and tuple(center.shape) != (x.shape[0], x.shape[1], 1, dim):
        return f"takes a (B, H, 1, D) center, got {tuple(center.shape)}"
    return None


@triton.jit
def _rows(X, Center, bh, chunk, heads, stride_xb, stride_xh, stride_xs, seq, offs_s, offs_d, step,
          HEAD_DIM: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, HAS_CENTER: tl.constexpr):  # fmt: skip
    """Rows ``step`` .. ``step + BLOCK_S`` of this program's run, ``x - center`` in float32 (0 past the end)."""
    rows = chunk * ROWS_PER_PROGRAM + step + offs_s
    base = X + (bh // heads).to(tl.int64) * stride_xb + (bh % heads).to(tl.int64) * stride_xh
    x = tl.load(base + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :], mask=(rows < seq)[:, None], other=0.0)
    x = x.to(tl.float32)
    if HAS_CENTER:
        centre = tl.load(Center + bh.to(tl.int64) * HEAD_DIM + offs_d)
        x = tl.where((rows < seq)[:, None], x - centre[None, :], 0.0)
    return x, rows


@triton.jit
def _absmax_kernel(
    X, Center, Absmax, heads, stride_xb, stride_xh, stride_xs, seq,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, HAS_CENTER: tl.constexpr,
):  # fmt: skip
    """Pass 1: each (batch, head)'s largest ``|x - center|``, one atomic maximum per program."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    largest = tl.zeros([BLOCK_S, HEAD_DIM], dtype=tl.float32)
    for step in range(0, ROWS_PER_PROGRAM, BLOCK_S):
        x, _ = _rows(X, Center, bh, chunk, heads, stride_xb, stride_xh, stride_xs, seq, offs_s, offs_d, step,
                     HEAD_DIM, ROWS_PER_PROGRAM, HAS_CENTER)  # fmt: skip
        largest = tl.maximum(largest, tl.abs(x))
    tl.atomic_max(Absmax + bh, tl.max(tl.max(largest, 1), 0))


@triton.jit
def _round_to_e4m3(v):
    """``v`` (float32, ``|v| <= 448``) rounded to nearest-even on the e4m3 grid, in float32.

    The conversion Triton emits on sm_90 (``cvt.rn.satfinite.e4m3x2.f32``) gave 27 of 16.8M
    codes other than PyTorch's cast on the H200, each a quotient just under a midpoint of two
    codes rounded up, as rounding through float16 first would (the midpoint, then ties to
    even). Rounded here first, the value is a code already and the conversion is exact. A code's spacing is ``2^(e - 3)`` for exponent ``e``
    (``e >= -6``; subnormals share ``2^-9``); ``(t + 1.5 * 2^23) - 1.5 * 2^23`` rounds
    ``|t| < 2^22`` to the nearest integer, ties to even, in float32 arithmetic."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    spacing = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)  # 1 / spacing, exact
    magic = 12582912.0  # 1.5 * 2^23
    rounded = ((v * inverse + magic) - magic) * spacing
    return tl.where(rounded == 0.0, v * 0.0, rounded)  # keep the sign of a value rounding to zero


@triton.jit
def _encode_kernel(
    X, Center, Scale, Codes, heads, stride_xb, stride_xh, stride_xs, seq,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    HAS_CENTER: tl.constexpr, HOST_CAST: tl.constexpr,
):  # fmt: skip
    """Pass 2: codes ``(x - center) / step`` (IEEE division, rounded to the e4m3 grid), ``step`` the head's ``Scale``.

    ``HOST_CAST`` (the interpreter only): ``Codes`` is float32 and takes the quotients; the host
    casts them (the interpreter's e4m3 cast rounds wrongly when rounding carries into the exponent)."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    step_size = tl.load(Scale + bh)
    codes_base = Codes + bh.to(tl.int64) * seq * HEAD_DIM
    for step in range(0, ROWS_PER_PROGRAM, BLOCK_S):
        x, rows = _rows(X, Center, bh, chunk, heads, stride_xb, stride_xh, stride_xs, seq, offs_s, offs_d, step,
                        HEAD_DIM, ROWS_PER_PROGRAM, HAS_CENTER)  # fmt: skip
        codes = _round_to_e4m3(tl.math.div_rn(x, tl.zeros_like(x) + step_size))
        if not HOST_CAST:
            codes = codes.to(Codes.dtype.element_ty)
        tl.store(
            codes_base + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], codes, mask=(rows < seq)[:, None]
        )


def quantize_per_head_triton(
    x: torch.Tensor, fmt: str = "fp8", *, center: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`.naive.quantize_per_head` (``fmt="fp8"``), in two passes over ``x``."""
    reason = unsupported_reason(x, fmt, center)
    if reason is not None:
        raise ValueError(f"the Triton per-head quantisation cannot run this case: {reason}")
    batch, heads, seq, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    absmax = torch.zeros((batch, heads), dtype=torch.float32, device=x.device)
    if center is not None:
        center = center.to(torch.float32).contiguous()
    grid = (batch * heads, max(1, num_blocks(seq, _ROWS_PER_PROGRAM)))
    common = (heads, *x.stride()[:3], seq)
    constants = dict(HEAD_DIM=dim, BLOCK_S=_BLOCK_S, ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM, HAS_CENTER=center is not None)
    center_arg = x if center is None else center  # an unused pointer without a center
    host_cast = interpreting()
    quotients = torch.empty(x.shape, dtype=torch.float32, device=x.device) if host_cast else codes
    nonempty = batch * heads * seq > 0
    if nonempty:
        _absmax_kernel[grid](x, center_arg, absmax, *common, **constants)
    scale = torch.where(absmax > 0, absmax / _FP8_LEVELS, torch.ones_like(absmax))  # the reference's step
    if nonempty:
        _encode_kernel[grid](x, center_arg, scale, quotients, *common, HOST_CAST=host_cast, **constants)
    if host_cast:
        codes.copy_(quotients.to(torch.float8_e4m3fn))
    return codes, scale
