"""Vertical and slash lines -> crossed blocks in Triton: one program per (batch x head, query block).

Reference: :func:`.naive.vertical_slash_block_mask`, which looks the lines' prefix counts up
through int64 index tables of every (query block, KV block) pair, a few heads and rows at a
time (about forty PyTorch operations per piece, each a launch issued by the host). Here the
same exclusive prefix counts (int32 ``(B, H, Sk + 1)``, one ``cumsum`` per line set) are read
by one kernel: per KV block the selected columns in ``[first key, min(last key, last query)]``
and, causally, the selected distances in ``[max(first query - last key, 0), last query - first
key]``, counted as two prefix differences each; a block is crossed when either count is
positive. The output is written once, every entry of the requested rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import num_blocks
from .._dispatch import device_unsupported_reason
from ..block_rows import query_block_range
from .naive import exclusive_prefix

__all__ = ["unsupported_reason", "vertical_slash_block_mask_triton"]

_BLOCK_J = 256  # KV blocks per step
_empty = torch.empty  # the output's allocator: the tests poison it


def unsupported_reason(vertical: torch.Tensor) -> str | None:
    """Why the kernel cannot take these lines, or ``None``."""
    if vertical.dim() != 3 or vertical.shape[-1] == 0:
        return f"takes (B, H, Sk) lines with Sk >= 1, got shape {tuple(vertical.shape)}"
    if vertical.shape[-1] >= 2**31 - 1:
        return "takes fewer than 2^31 - 1 keys (int32 prefix counts)"
    return device_unsupported_reason(vertical)


@triton.jit
def _count(prefix, low, high, length, valid):
    """Set entries in ``[low, high]`` from an exclusive prefix count of ``length + 1`` entries (0 if empty)."""
    low_c = tl.minimum(tl.maximum(low, 0), length)
    high_c = tl.minimum(tl.maximum(high + 1, 0), length)
    upper = tl.load(prefix + high_c, mask=valid, other=0)
    lower = tl.load(prefix + low_c, mask=valid, other=0)
    return tl.maximum(upper - lower, 0)


@triton.jit
def _crossed_blocks(
    VerticalPrefix, SlashPrefix, Out, seq_q, seq_k, row_start, n_rows, n_kv, block_q, block_k,
    CAUSAL: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    block = row_start + row
    offset = seq_k - seq_q
    q_first = block * block_q + offset
    q_last = tl.minimum(block * block_q + block_q, seq_q) - 1 + offset
    vertical = VerticalPrefix + bh * (seq_k + 1)
    slash = SlashPrefix + bh * (seq_k + 1)
    out = Out + (bh * n_rows + row) * n_kv
    offs = tl.arange(0, BLOCK_J)
    for start in range(0, n_kv, BLOCK_J):
        kv_blocks = start + offs
        valid = kv_blocks < n_kv
        k_first = kv_blocks * block_k
        k_last = tl.minimum(k_first + block_k, seq_k) - 1
        if CAUSAL:
            column_high = tl.minimum(k_last, q_last)
        else:
            column_high = k_last
        crossed = _count(vertical, k_first, column_high, seq_k, valid) > 0
        if CAUSAL:
            distance_low = tl.maximum(q_first - k_last, 0)
            distance_high = q_last - k_first
            crossed = crossed | (_count(slash, distance_low, distance_high, seq_k, valid) > 0)
        tl.store(out + kv_blocks, crossed.to(tl.int8), mask=valid)


def vertical_slash_block_mask_triton(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    *,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool = True,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """Same result as :func:`.naive.vertical_slash_block_mask`, in one launch."""
    reason = unsupported_reason(vertical)
    if reason is not None:
        raise ValueError(f"the Triton vertical-slash block kernel cannot run this case: {reason}")
    rows = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    n_kv = num_blocks(seq_k, block_k)
    batch, heads = vertical.shape[:2]
    out = _empty((batch, heads, len(rows), n_kv), dtype=torch.int8, device=vertical.device)
    if out.numel():
        vertical_prefix = exclusive_prefix(vertical).contiguous()
        slash_prefix = exclusive_prefix(slash).contiguous() if causal else vertical_prefix
        _crossed_blocks[(len(rows), batch * heads)](
            vertical_prefix, slash_prefix, out, seq_q, seq_k, rows.start, len(rows), n_kv, block_q, block_k,
            CAUSAL=bool(causal), BLOCK_J=_BLOCK_J,
        )  # fmt: skip
    return out.view(torch.bool)
