"""NSA's residue regrouping as one row-gather kernel each way (whole ``D``-element rows, one index per row).

The compressed branch regroups the queries so that each residue ``(p + 1) % d`` of the query
positions is a batch entry (:mod:`sparse_attn.nn.nsa`), and its output back. In PyTorch each
direction is one strided five-dimensional copy (:mod:`.naive`), which the H200 ran at about a
third of its copy bandwidth (about 3 ms per 64K-token NSA forward for q and the output, 8 ms per
forward + backward; ``benchmarks/results/h200/nsa_fwdbwd_profile_64k_s40.log``). Here one
program copies ``BLOCK_R`` whole rows of one (batch entry, head), each row's source found by
integer arithmetic:

* to residues (``TO_RESIDUE``): output ``(B * d, H, R, D)``, cell ``(b d + j, h, r)`` from token
  ``t = (r + skip) d + j - front`` of ``x[b, h]``, 0 where ``t`` is outside ``[0, S)``;
* from residues: output ``(B, H, S, D)``, token ``t`` (padded index ``p = front + t``) from cell
  ``(b d + p % d, h, p // d - skip)``, ``fill`` where that row is outside ``[0, R)``.
"""

from __future__ import annotations

import torch

from ...backends import launch
from .._dispatch import device_unsupported_reason, head_dim_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["regroup_triton", "unsupported_reason"]


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why :func:`regroup_triton` cannot run on ``x`` ``(B, H, S, D)``, or ``None``."""
    if triton is None:
        return "triton is not installed"
    reason = device_unsupported_reason(x)
    if reason is not None:
        return reason
    if x.dim() != 4:
        return f"takes (B, H, S, D) tensors, got shape {tuple(x.shape)}"
    reason = head_dim_reason(x.shape[3])
    if reason is not None:
        return reason
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"takes floating-point tensors, not {x.dtype}"
    return None


if triton is not None:

    @triton.jit(do_not_specialize=["out_rows", "x_rows", "seq", "front", "skip"])
    def _regroup(
        X, Out, heads, out_rows, x_rows, seq, front, stride, skip, fill,
        stride_xb, stride_xh, stride_xs, stride_ob, stride_oh, stride_os,
        HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, TO_RESIDUE: tl.constexpr, ACCUMULATE: tl.constexpr = False,
    ):  # fmt: skip
        """``ACCUMULATE``: add the regrouped rows to the values ``Out`` holds (float32 sum, stored in
        its dtype) instead of storing them."""
        entry = tl.program_id(1) // heads
        h = tl.program_id(1) % heads
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        inside = rows < out_rows
        if TO_RESIDUE:
            source_entry = entry // stride + tl.zeros([BLOCK_R], dtype=tl.int32)
            source_row = (rows + skip) * stride + entry % stride - front
            ok = inside & (source_row >= 0) & (source_row < seq)
        else:
            padded = rows + front
            source_entry = entry * stride + padded % stride
            source_row = padded // stride - skip
            ok = inside & (source_row >= 0) & (source_row < x_rows)
        offs_d = tl.arange(0, HEAD_DIM)
        source = (
            source_entry.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + source_row.to(tl.int64) * stride_xs
        )
        values = tl.load(X + source[:, None] + offs_d[None, :], mask=ok[:, None], other=fill)
        target = entry.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows.to(tl.int64) * stride_os
        if ACCUMULATE:
            held = tl.load(Out + target[:, None] + offs_d[None, :], mask=inside[:, None], other=0.0)
            values = (held.to(tl.float32) + values.to(tl.float32)).to(Out.dtype.element_ty)
        tl.store(Out + target[:, None] + offs_d[None, :], values, mask=inside[:, None])


def regroup_triton(x: torch.Tensor, *, to_residue: bool, front: int, stride: int, skip: int, rows: int,
                   fill: float = 0.0, add_to: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``to_residue``: :func:`.naive.to_residues_reference` (``rows`` counted from 0, as there);
    else :func:`.naive.from_residues_reference` (``rows`` is then the sequence length). A new
    contiguous tensor in x's dtype (no gradient); with ``add_to`` (a contiguous tensor of the
    result's shape and x's dtype) the result is added into it in the same pass, and it is returned
    (NSA's fused backward adds the compressed branch's dQ into q's gradient so)."""
    reason = unsupported_reason(x)
    if reason is not None:
        raise ValueError(f"the regrouping kernel cannot run this case: {reason}")
    batch, heads, length, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if to_residue:
        shape, seq, x_rows = (batch * stride, heads, rows - skip, dim), length, 0
    else:
        shape, seq, x_rows = (batch // stride, heads, rows, dim), rows, length
    if add_to is not None:
        if tuple(add_to.shape) != shape or add_to.dtype != x.dtype or not add_to.is_contiguous():
            raise ValueError(f"add_to must be a contiguous {x.dtype} tensor of shape {shape}, got {add_to.dtype} "
                             f"{tuple(add_to.shape)}")  # fmt: skip
        out = add_to
    else:
        out = launch.allocate(shape, x.dtype, x.device)
    block_r = 32 if dim == 256 else 64
    _regroup[(triton.cdiv(shape[2], block_r), shape[0] * heads)](
        x, out, heads, shape[2], x_rows, seq, front, stride, skip, fill, *x.stride()[:3], *out.stride()[:3],
        HEAD_DIM=dim, BLOCK_R=block_r, TO_RESIDUE=to_residue, ACCUMULATE=add_to is not None, num_warps=4,
    )  # fmt: skip
    return out
