"""Triton kernel of :func:`sparse_attn.ops.row_gather.gather_rows`: one program per (batch x head, rows).

Each program loads ``BLOCK_S`` indices and copies those whole rows (``D`` elements, padded to a
power of two and masked) into consecutive output rows. Takes 4D ``(B, H, S, D)`` inputs of 2- or
4-byte elements whose rows are contiguous (any batch/head/sequence strides) with ``D <= 1024``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import device_unsupported_reason

BLOCK_S = 32


def unsupported_reason(x: torch.Tensor, *, index: torch.Tensor) -> str | None:
    reason = device_unsupported_reason(x)
    if reason is not None:
        return reason
    if x.dim() != 4:
        return "the row-gather kernel takes (B, H, S, D) tensors"
    if x.element_size() not in (2, 4) or x.is_complex():
        return f"the row-gather kernel takes 2- or 4-byte real dtypes, not {x.dtype}"
    if x.stride(-1) != 1 or x.shape[-1] > 1024:
        return "the row-gather kernel needs contiguous rows of at most 1024 elements"
    if index.device != x.device:
        return "index must be on x's device"
    return None


@triton.jit
def _gather_rows(
    X, Index, Out, num_heads, seq_out, stride_xb, stride_xh, stride_xs, dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_out
    source = tl.load(Index + rows, mask=row_ok, other=0)
    x_base = X + batch.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh
    mask = row_ok[:, None] & (cols < dim)[None, :]
    values = tl.load(x_base + source[:, None] * stride_xs + cols[None, :], mask=mask)
    out_base = Out + batch_head.to(tl.int64) * seq_out * dim
    tl.store(out_base + rows[:, None].to(tl.int64) * dim + cols[None, :], values, mask=mask)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    batch, heads, _, dim = x.shape
    seq_out = index.numel()
    out = torch.empty((batch, heads, seq_out, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(seq_out, BLOCK_S), batch * heads)
    _gather_rows[grid](
        x, index, out, heads, seq_out, x.stride(0), x.stride(1), x.stride(2), dim,
        BLOCK_S=BLOCK_S, BLOCK_D=triton.next_power_of_2(dim),
    )  # fmt: skip
    return out
