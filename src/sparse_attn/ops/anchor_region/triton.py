"""Anchor-region statistics in Triton: each query row's maximum and log-sum-exp over its region, in one pass.

Reference: :func:`.naive.anchor_region_stats`, which gathers every query block's region keys
(sinks and window) into a float32 copy, writes the rows' float32 logits against them, masks
them and reduces them twice (maximum, log-sum-exp): at 1M tokens and 32 query heads that is
about 86 GB of logits written and read several times, most of AnchorAttention's estimate. Here
one program takes ``BLOCK_M`` rows of one query block and one query head, walks the sink keys
and then the window keys ``BLOCK_N`` at a time straight from ``k`` (its own dtype; tensor-core
products with float32 sums for 16-bit inputs, IEEE float32 products for float32 inputs and for
bfloat16 under the interpreter), and keeps an online maximum and sum of exponentials in
registers; only the two float32 results per row are written.

The region (as in the reference): KV blocks ``[0, sink_blocks)`` (keys below ``Sk``), then the
query block's own KV blocks with the ``local_blocks - 1`` before them (and after them when not
causal), starting no lower than the sinks' end so that no key counts twice; causally, keys after
a row's position are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import num_blocks
from ...utils import dot_in_float32
from .._dispatch import qk_unsupported_reason
from .._triton_util import dot_rows
from ..block_rows import query_block_range

__all__ = ["anchor_region_stats_triton", "unsupported_reason"]

_BLOCK_N = 64  # keys per step
_empty = torch.empty  # the outputs' allocator: the tests poison it


def unsupported_reason(q: torch.Tensor, *, k: torch.Tensor) -> str | None:
    """Why the kernel cannot take this case, or ``None``."""
    return qk_unsupported_reason(q, k)


@triton.jit
def _region_step(q, k_base, stride_ks, start, end, positions, m_i, l_i, scale, d, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """Keys ``start .. start + BLOCK_N`` (those below ``end``) folded into the rows' running max and sum."""
    keys = start + tl.arange(0, BLOCK_N)
    real = keys < end
    key_rows = tl.load(k_base + keys[:, None].to(tl.int64) * stride_ks + d[None, :], mask=real[:, None], other=0.0)
    logits = dot_rows(q, key_rows, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION) * scale
    visible = real[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= positions[:, None])
    logits = tl.where(visible, logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _region_stats(
    Q, K, RowMax, RowLse,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    q_heads, group, seq_q, seq_k, block_q, block_k, sink_blocks, local_blocks, first_block, first_row, out_rows, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    block = first_block + tl.program_id(0)
    tile = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    batch, head = bh // q_heads, bh % q_heads
    offset = seq_k - seq_q
    in_block = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = block * block_q + in_block
    real_rows = (in_block < block_q) & (rows < seq_q)
    positions = rows + offset
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + rows[:, None].to(tl.int64) * stride_qs + d[None, :],
        mask=real_rows[:, None],
        other=0.0,
    )
    k_base = K + batch * stride_kb + (head // group) * stride_kh
    # The query block's own KV blocks, from its first and last positions.
    first_own = (block * block_q + offset) // block_k
    last_own = (tl.minimum(block * block_q + block_q, seq_q) - 1 + offset) // block_k
    after = 0 if CAUSAL else local_blocks - 1
    sink_end = tl.minimum(sink_blocks * block_k, seq_k)
    window_start = tl.maximum((first_own - (local_blocks - 1)) * block_k, sink_end)
    window_end = tl.minimum((last_own + after + 1) * block_k, seq_k)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, sink_end, BLOCK_N):
        m_i, l_i = _region_step(q, k_base, stride_ks, start, sink_end, positions, m_i, l_i, scale, d,
                                BLOCK_M, BLOCK_N, CAUSAL, DOT_FP32, PRECISION)  # fmt: skip
    for start in range(window_start, window_end, BLOCK_N):
        m_i, l_i = _region_step(q, k_base, stride_ks, start, window_end, positions, m_i, l_i, scale, d,
                                BLOCK_M, BLOCK_N, CAUSAL, DOT_FP32, PRECISION)  # fmt: skip
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    out = bh * out_rows + (rows - first_row)
    tl.store(RowMax + out, m_i, mask=real_rows)
    tl.store(RowLse + out, lse, mask=real_rows)


def anchor_region_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    sink_blocks: int,
    local_blocks: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_max, row_lse)``, float32 ``(B, Hq, R)``: :func:`.naive.anchor_region_stats`'s values, in one launch."""
    reason = unsupported_reason(q, k=k)
    if reason is not None:
        raise ValueError(f"the Triton anchor-region kernel cannot run this case: {reason}")
    if local_blocks < 1 or sink_blocks < 0:
        raise ValueError(f"needs local_blocks >= 1 and sink_blocks >= 0, got {local_blocks} and {sink_blocks}")
    batch, q_heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    blocks = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    first_row, end_row = blocks.start * block_q, min(blocks.stop * block_q, seq_q)
    out_rows = max(0, end_row - first_row)
    row_max = _empty((batch, q_heads, out_rows), dtype=torch.float32, device=q.device)
    row_lse = _empty((batch, q_heads, out_rows), dtype=torch.float32, device=q.device)
    if out_rows == 0 or seq_k == 0:
        return row_max.fill_(float("-inf")), row_lse.fill_(float("-inf"))
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    block_m = min(64, max(16, triton.next_power_of_2(block_q)))
    use_float32_dot = dot_in_float32(q.dtype)
    grid = (len(blocks), triton.cdiv(block_q, block_m), batch * q_heads)
    _region_stats[grid](
        q, k, row_max, row_lse, *q.stride()[:3], *k.stride()[:3],
        q_heads, q_heads // k.shape[1], seq_q, seq_k, block_q, block_k, sink_blocks, local_blocks, blocks.start,
        first_row, out_rows, float(scale),
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, CAUSAL=bool(causal), DOT_FP32=use_float32_dot,
        PRECISION="ieee" if use_float32_dot else "tf32", num_warps=8 if dim > 128 else 4, num_stages=2,
    )  # fmt: skip
    return row_max, row_lse
