"""Quest's page bounds in one pass over the page summaries.

One program per (sequence, KV head, chunk of ``BLOCK_P`` logical pages): the group's query
heads packed into the rows of one tile (padded to ``BLOCK_G >= 16``), the chunk's pages' key
minima and maxima gathered through the page table (``D`` contiguous values each), the per-head
bounds as two ``tl.dot`` (``max(q, 0) · max^T + min(q, 0) · min^T``) summed over the tile's
rows. Pages past the sequence are written ``-inf`` without reading their summaries. The
summaries are read once per group, and nothing but the ``(B, Hkv, max_pages)`` float32 group
bounds is written (the reference gathers float32 copies of both summary tables first).
"""

from __future__ import annotations

import torch

from ...backends import launch
from ...utils import dot_in_float32
from .._dispatch import device_unsupported_reason

try:
    import triton
    import triton.language as tl

    from .._triton_util import group_rows
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["page_bounds_triton", "unsupported_reason"]

HEAD_DIMS = (16, 32, 64, 128, 256)


def unsupported_reason(q: torch.Tensor, *, head_dim: int) -> str | None:
    """Why :func:`page_bounds_triton` cannot run this case, or ``None``. Also the common part of
    the paged decode kernel's check (both pack a GQA group into one tile of ``head_dim`` columns)."""
    if triton is None:
        return "triton is not installed"
    reason = device_unsupported_reason(q)
    if reason is not None:
        return reason
    if head_dim not in HEAD_DIMS:
        return f"the decode kernels take head_dim in {HEAD_DIMS}, not {head_dim}"
    return None


if triton is not None:

    @triton.jit
    def _page_bounds(
        Q,
        KeyMin,
        KeyMax,
        PageTable,
        SeqLens,
        Out,
        stride_qb,
        stride_qh,
        stride_sp,
        stride_sh,
        stride_tb,
        stride_ob,
        num_kv_heads,
        group,
        max_pages,
        page_size,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_P: tl.constexpr,
        NEWEST_FIRST: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        batch = tl.program_id(0) // num_kv_heads
        kv_head = tl.program_id(0) % num_kv_heads
        q, _, _, _ = group_rows(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        pages = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        in_table = pages < max_pages
        used = tl.cdiv(tl.load(SeqLens + batch), page_size)
        in_sequence = pages < used
        physical = tl.load(PageTable + batch.to(tl.int64) * stride_tb + pages, mask=in_sequence, other=0).to(tl.int64)
        summary = physical[:, None] * stride_sp + kv_head * stride_sh + offs_d[None, :]
        upper = tl.load(KeyMax + summary, mask=in_sequence[:, None], other=0.0)
        lower = tl.load(KeyMin + summary, mask=in_sequence[:, None], other=0.0)
        positive = tl.maximum(q, 0.0)
        negative = tl.minimum(q, 0.0)
        if DOT_FP32:
            bounds = tl.dot(positive.to(tl.float32), tl.trans(upper.to(tl.float32)), input_precision=PRECISION)
            bounds = tl.dot(negative.to(tl.float32), tl.trans(lower.to(tl.float32)), bounds, input_precision=PRECISION)
        else:
            bounds = tl.dot(positive.to(upper.dtype), tl.trans(upper), input_precision=PRECISION)
            bounds = tl.dot(negative.to(lower.dtype), tl.trans(lower), bounds, input_precision=PRECISION)
        # Rows past the group hold q = 0, so they add nothing to the sum.
        group_bounds = tl.where(in_sequence, tl.sum(bounds, 0) * scale, float("-inf"))
        if NEWEST_FIRST:
            group_bounds = tl.where(pages == used - 1, float("inf"), group_bounds)
        out = Out + batch.to(tl.int64) * stride_ob + kv_head * max_pages + pages
        tl.store(out, group_bounds, mask=in_table)


def page_bounds_triton(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    page_size: int,
    scale: float,
    newest_first: bool = False,
) -> torch.Tensor:
    """:func:`.naive.page_bounds_reference` in one kernel; same arguments and result."""
    batch, q_heads, dim = q.shape
    reason = unsupported_reason(q, head_dim=dim)
    if reason is not None:
        raise ValueError(f"the page bounds kernel cannot run this case: {reason}")
    kv_heads = key_min.shape[1]
    group = q_heads // kv_heads
    max_pages = page_table.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    key_min, key_max, page_table, seq_lens = (x.contiguous() for x in (key_min, key_max, page_table, seq_lens))
    out = launch.allocate((batch, kv_heads, max_pages), torch.float32, q.device)
    block_p = 64 if dim <= 128 else 32
    use_float32_dot = dot_in_float32(q.dtype)
    grid = (batch * kv_heads, triton.cdiv(max_pages, block_p))
    _page_bounds[grid](
        q, key_min, key_max, page_table, seq_lens, out,
        *q.stride()[:2], *key_min.stride()[:2], page_table.stride(0), out.stride(0),
        kv_heads, group, max_pages, page_size, scale,
        HEAD_DIM=dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_P=block_p, NEWEST_FIRST=newest_first,
        DOT_FP32=use_float32_dot, PRECISION="ieee" if use_float32_dot else "tf32",
    )  # fmt: skip
    return out
