"""Gathered block maxima in Triton: one program per (query block, batch x query head).

Reference: :func:`.naive.gathered_block_max`, which gathers every listed KV block of a few query
blocks into a float32 copy and takes one batched product (the keys go through memory three
times: gathered, converted, multiplied). Here a program reads its query block once (or, when
the tile would be large, in head-dim slices beside each key slice) and walks its ``C`` listed
KV blocks, each in steps of ``BLOCK_N`` keys read straight from ``k`` in its own dtype and
multiplied with float32 accumulation (tensor cores for 16-bit inputs; IEEE float32 products
for float32 inputs, and for bfloat16 under the interpreter, whose bfloat16 ``dot`` is wrong).
Each step is masked to the real keys and reduced to a running per-row maximum; the block's
maximum over its real rows is written directly. A block that is not present is not read (its
loads are masked off) and gets ``-inf``. Every output element is written once; nothing else is
allocated. Slices, steps and warps: :func:`_launch_config`.

Tiles are the block sizes rounded up to a power of two of at least 16 (so any block of 1 to
128 tokens runs; the padding is masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import num_blocks
from ...utils import dot_in_float32, interpreting
from .._dispatch import qk_unsupported_reason
from .._triton_util import dot_rows
from ..gqa import gqa_group

__all__ = ["gathered_block_max_triton", "unsupported_reason"]

_MAX_BLOCK = 128
# 16-bit query tiles up to this size (head_dim up to 128) stay in the program for all its KV
# blocks; larger ones are read in head-dim slices of _SLICE_16BIT beside each key slice.
_RESIDENT_Q_BYTES = 32 * 1024
_SLICE_16BIT = 64
_empty = torch.empty  # the output's allocator: the tests poison it


def unsupported_reason(q: torch.Tensor, *, k: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """Why the kernel cannot take this case, or ``None``."""
    reason = qk_unsupported_reason(q, k)
    if reason is not None:
        return reason
    if not (1 <= block_q <= _MAX_BLOCK and 1 <= block_k <= _MAX_BLOCK):
        return f"takes blocks of 1 to {_MAX_BLOCK} tokens, got block_q {block_q} and block_k {block_k}"
    return None


@triton.jit
def _gathered_block_max(
    Q, K, Units, Present, Out,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    QBlocks, q_heads, group, seq_q, seq_k, block_q, block_k, n_kv, rows, chunks,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // q_heads
    head = bh % q_heads
    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + (head // group) * stride_kh
    lists = (bh * rows + row) * chunks
    in_block_q = tl.arange(0, BLOCK_Q)
    queries = tl.load(QBlocks + row).to(tl.int64) * block_q + in_block_q
    real_rows = (in_block_q < block_q) & (queries < seq_q)
    in_step = tl.arange(0, BLOCK_N)
    columns = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_base + queries[:, None] * stride_qs + columns[None, :], mask=real_rows[:, None], other=0.0)
    for c in range(0, chunks):
        present = tl.load(Present + lists + c) != 0
        unit = tl.minimum(tl.maximum(tl.load(Units + lists + c), 0), n_kv - 1)
        best = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        for n_start in range(0, BLOCK_K, BLOCK_N):
            in_block_k = n_start + in_step
            keys = unit * block_k + in_block_k
            real_keys = (in_block_k < block_k) & (keys < seq_k) & present
            acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
            if BLOCK_D == HEAD_DIM:
                key_rows = tl.load(
                    k_base + keys[:, None] * stride_ks + columns[None, :], mask=real_keys[:, None], other=0.0
                )
                acc = dot_rows(q, key_rows, acc, DOT_FP32, PRECISION)
            else:
                for d_start in range(0, HEAD_DIM, BLOCK_D):
                    q_slice = tl.load(
                        q_base + queries[:, None] * stride_qs + d_start + columns[None, :],
                        mask=real_rows[:, None],
                        other=0.0,
                    )
                    key_rows = tl.load(
                        k_base + keys[:, None] * stride_ks + d_start + columns[None, :],
                        mask=real_keys[:, None],
                        other=0.0,
                    )
                    acc = dot_rows(q_slice, key_rows, acc, DOT_FP32, PRECISION)
            best = tl.maximum(best, tl.max(tl.where(real_keys[None, :], acc, float("-inf")), axis=1))
        best = tl.where(real_rows, best, float("-inf"))
        tl.store(Out + lists + c, tl.max(best, axis=0))


def _launch_config(dtype: torch.dtype, dim: int, tile_q: int, tile_k: int) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_N, num_warps)``: head-dim slice, keys per step and warps.

    Chosen so that every supported tile compiles for sm_90a without spilling (checked with ptxas
    over head_dim 64/128/256 and tiles of 16, 64 and 128): 16-bit inputs multiply on tensor cores
    with the query tile resident up to head_dim 128 and steps of 64 keys; float32 inputs multiply
    with FMAs, whose operands live in registers, so in slices of 32 dimensions and 32 keys. Under
    the interpreter small slices and steps, so that the tests take every loop.
    """
    if interpreting():
        return min(dim, 32), min(tile_k, 16), 4
    warps = 8 if tile_q >= 128 else 4
    if dtype == torch.float32:
        return min(dim, 32), min(tile_k, 32), warps
    resident = dim <= 128 and tile_q * dim * 2 <= _RESIDENT_Q_BYTES
    return (dim if resident else _SLICE_16BIT), min(tile_k, 64), warps


def gathered_block_max_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    units: torch.Tensor,
    present: torch.Tensor,
    *,
    q_blocks: range | tuple[int, ...],
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """Same result as :func:`.naive.gathered_block_max`, in one launch (row ``r``'s query block read
    from an int32 list of ``q_blocks``)."""
    reason = unsupported_reason(q, k=k, block_q=block_q, block_k=block_k)
    if reason is not None:
        raise ValueError(f"the Triton gathered block-max kernel cannot run this case: {reason}")
    batch, q_heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    rows, chunks = units.shape[2:]
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    units = units.contiguous()
    present = present.to(torch.bool).contiguous().view(torch.uint8)
    out = _empty((batch, q_heads, rows, chunks), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    tile_q, tile_k = (max(16, triton.next_power_of_2(block)) for block in (block_q, block_k))
    block_d, block_n, warps = _launch_config(q.dtype, dim, tile_q, tile_k)
    use_float32_dot = dot_in_float32(q.dtype)
    if isinstance(q_blocks, range):
        block_list = torch.arange(q_blocks.start, q_blocks.stop, dtype=torch.int32, device=q.device)
    else:
        block_list = torch.tensor(q_blocks, dtype=torch.int32, device=q.device)
    _gathered_block_max[(rows, batch * q_heads)](
        q, k, units, present, out, *q.stride()[:3], *k.stride()[:3],
        block_list, q_heads, gqa_group(q, k), seq_q, seq_k, block_q, block_k, num_blocks(seq_k, block_k), rows,
        chunks, HEAD_DIM=dim, BLOCK_Q=tile_q, BLOCK_K=tile_k, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_FP32=use_float32_dot, PRECISION="ieee" if use_float32_dot else "tf32", num_warps=warps,
    )  # fmt: skip
    return out
