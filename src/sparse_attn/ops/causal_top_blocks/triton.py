"""Causal top-n block lists in one kernel: ranking, top-n and the ascending list in registers.

One program per (batch x head, tile of ``BLOCK_R`` rows) loads the rows' scores whole (``NB``, the
block count rounded up to a power of two, at most :data:`MAX_BLOCKS`), marks forced blocks
``+inf`` and blocks that are not eligible as absent, packs each score with its block index into
one int64 sort key (:func:`sparse_attn.ops.page_select.triton._sort_key`: order-preserving bits
of the float32 score above ``2^31 - 1 - index``, so one descending ``tl.topk`` ranks by score
and breaks ties to the lower index, exactly the reference's stable sort), keeps the top
``K_TILE`` (``top_n`` rounded up to a power of two), sorts the kept indices ascending and writes
the list and its count. Every output element is written (zeros past the count), so nothing
needs initialising and the launch reads the scores once: no host synchronisation.
"""

from __future__ import annotations

import torch

from .._dispatch import device_unsupported_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["MAX_BLOCKS", "causal_top_blocks_triton", "unsupported_reason"]

# Blocks per row the kernel holds in registers (int64 keys): 8192 blocks of 64 keys = 512K tokens.
MAX_BLOCKS = 8192
# Keys per program: rows per program = KEYS_PER_PROGRAM // NB (at least one).
KEYS_PER_PROGRAM = 4096


def unsupported_reason(scores: torch.Tensor, **_case) -> str | None:
    """Why :func:`causal_top_blocks_triton` cannot run on ``scores``, or ``None``."""
    if triton is None:
        return "triton is not installed"
    reason = device_unsupported_reason(scores)
    if reason is not None:
        return reason
    if scores.shape[-1] > MAX_BLOCKS:
        return f"rows of more than {MAX_BLOCKS} blocks ({scores.shape[-1]}) do not fit the kernel's registers"
    return None


if triton is not None:
    from ..page_select.triton import MIN_KEY, _key_index, _sort_key

    @triton.jit
    def _top_blocks(
        Scores, Indices, Counts,
        stride_sb, stride_sh, stride_sr,
        stride_ib, stride_ih, stride_ir,
        stride_cb, stride_ch,
        heads, rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from,
        BLOCK_R: tl.constexpr, NB: tl.constexpr, K_TILE: tl.constexpr,
    ):  # fmt: skip
        batch = tl.program_id(0) // heads
        head = tl.program_id(0) % heads
        row = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        column = tl.arange(0, NB)
        row_ok = row < rows
        position = row + first_pos
        own = position // block
        present = row_ok[:, None] & (column[None, :] < n_blocks)
        pointers = (
            Scores + batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh
            + row[:, None].to(tl.int64) * stride_sr + column[None, :]
        )  # fmt: skip
        score = tl.load(pointers, mask=present, other=float("-inf"))
        eligible = present & (column[None, :] <= own[:, None])
        forced = eligible & ((column[None, :] < initial) | (column[None, :] > own[:, None] - local))
        ranked = eligible & (position >= ranked_from)[:, None] & (score > float("-inf"))
        score = tl.where(forced, float("inf"), score)
        key = tl.where(forced | ranked, _sort_key(score, column[None, :]), MIN_KEY)
        top = tl.topk(key, K_TILE)
        rank = tl.arange(0, K_TILE)
        listed = (top != MIN_KEY) & (rank[None, :] < top_n)
        count = tl.sum(listed.to(tl.int32), 1)
        index = tl.sort(tl.where(listed, _key_index(top), 0x7FFFFFFF))
        index = tl.where(rank[None, :] < count[:, None], index, 0)
        out = (
            Indices + batch.to(tl.int64) * stride_ib + head.to(tl.int64) * stride_ih
            + row[:, None].to(tl.int64) * stride_ir + rank[None, :]
        )  # fmt: skip
        tl.store(out, index, mask=row_ok[:, None] & (rank[None, :] < top_n))
        tl.store(Counts + batch.to(tl.int64) * stride_cb + head * stride_ch + row, count, mask=row_ok)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def causal_top_blocks_triton(
    scores: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    first_pos: int,
    block: int,
    top_n: int,
    initial: int,
    local: int,
    ranked_from: int,
) -> None:
    """:func:`.naive.causal_top_blocks_reference` in one launch, written into ``indices`` ``(B, H, c, top_n)``
    and ``counts`` ``(B, H, c)`` (int32, last dimension contiguous; views of larger tensors allowed)."""
    batch, heads, rows, n_blocks = scores.shape
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    k_tile = _pow2(top_n)
    nb = max(_pow2(n_blocks), k_tile, 16)
    block_r = max(1, min(64, KEYS_PER_PROGRAM // nb))
    grid = (batch * heads, triton.cdiv(rows, block_r))
    if rows == 0 or batch * heads == 0:
        return
    _top_blocks[grid](
        scores, indices, counts, *scores.stride()[:3], *indices.stride()[:3], *counts.stride()[:2],
        heads, rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from,
        BLOCK_R=block_r, NB=nb, K_TILE=k_tile, num_warps=8 if nb >= 2048 else 4,
    )  # fmt: skip
