"""Causal top-n block lists in one kernel: ranking, top-n and the ascending list in registers.

``_top_blocks``: one program per (batch x head, tile of ``BLOCK_R`` rows) loads the rows' scores
whole (``NB``, the block count rounded up to a power of two, at most :data:`MAX_BLOCKS`).
``_top_blocks_gated``: one program per (batch x list head, up to ``ROWS_PER_GATED_PROGRAM`` rows)
loads its KV head's block keys once and computes each row tile's scores with ``tl.dot`` (the
list's query heads summed in float32), so no score tensor exists. Both then rank
(``_rank_and_write``): forced blocks ``+inf``, blocks that are not eligible absent; lists of up
to 16 entries by ``K_TILE`` rounds of (row maximum, its lowest column, masked out), longer ones by
one descending ``tl.topk`` of int64 keys packing the score with its index
(:func:`sparse_attn.ops.page_select.triton._sort_key`); both break ties to the lower index,
exactly the reference's stable sort. The kept indices are sorted ascending and written with
their count. Every output element is written (zeros past the count): nothing needs
initialising, and there is no host synchronisation.

Measured (H200, MoBA 512 / top-3 at 128K, 32/8 heads): with the bitonic top-k the gated kernel
(with its row loop) took 21.9 ms per estimate, float32 matmuls + ``_top_blocks`` 20.7 ms
(``benchmarks/results/h200/moba512_estimate_128k.json``); with the rounds the gated kernel takes
4.47 ms and the whole ``moba`` estimate 4.94 ms (``moba512_estimate_128k_rounds.json``).
"""

from __future__ import annotations

import torch

from ...utils import dot_in_float32, interpreting
from .._dispatch import device_unsupported_reason
from ..page_select.triton import _pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = [
    "MAX_BLOCKS",
    "causal_top_blocks_gated_triton",
    "causal_top_blocks_triton",
    "unsupported_reason",
]

# Blocks per row the kernel holds in registers (int64 keys): 8192 blocks of 64 keys = 512K tokens.
MAX_BLOCKS = 8192
# Keys per program: rows per program = KEYS_PER_PROGRAM // NB (at least one).
KEYS_PER_PROGRAM = 4096
# The gated kernel holds a (KV head's) whole pooled-key tile: NB x head_dim elements at most.
MAX_GATED_KEYS = 32768
# Rows a gated program ranks (in row tiles), so the block keys are read from L2 once per this many rows.
ROWS_PER_GATED_PROGRAM = 256


def unsupported_reason(x: torch.Tensor, *, keys: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot run, or ``None``: :func:`causal_top_blocks_triton` on scores ``x``, or with
    ``keys``, :func:`causal_top_blocks_gated_triton` on queries ``x`` and those block keys."""
    if triton is None:
        return "triton is not installed"
    reason = device_unsupported_reason(x)
    if reason is not None:
        return reason
    if keys is None:
        if x.shape[-1] > MAX_BLOCKS:
            return f"rows of more than {MAX_BLOCKS} blocks ({x.shape[-1]}) do not fit the kernel's registers"
        return None
    dim, n_blocks = x.shape[-1], keys.shape[2]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the gated kernel takes float16, bfloat16 or float32 queries, got {x.dtype}"
    if not 16 <= dim <= 256 or dim & (dim - 1):
        return f"the gated kernel takes a power-of-two head_dim in [16, 256], got {dim}"
    if max(_pow2(n_blocks), 16) * dim > MAX_GATED_KEYS:
        return f"{n_blocks} pooled keys of head_dim {dim} do not fit one program (at most {MAX_GATED_KEYS} elements)"
    return None


if triton is not None:
    from ..page_select.triton import MIN_KEY, _key_index, _sort_key

    # Lists of up to this many entries are ranked by rounds of row maxima, longer ones by a bitonic top-k.
    ROUNDS_MAX_K = tl.constexpr(16)

    @triton.jit
    def _rank_and_write(
        score, row, batch, head, Indices, Counts,
        stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
        rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from,
        BLOCK_R: tl.constexpr, NB: tl.constexpr, K_TILE: tl.constexpr, ROUNDS: tl.constexpr,
        GUARDED: tl.constexpr,
    ):  # fmt: skip
        """Rank float32 ``score`` ``[BLOCK_R, NB]`` of rows ``row`` (the module's rule) and write their lists.

        ``K_TILE <= ROUNDS_MAX_K``: the forced blocks (at most ``top_n``, lowest first) written from
        their positions, then ``top_n - initial - local`` rounds of (row maximum, its lowest column,
        masked out) over the other eligible blocks, reductions only (a row with blocks left to rank
        has exactly ``initial + local`` forced ones: where the initial and local runs meet, they
        cover every eligible block): ``ROUNDS`` that many, or with ``GUARDED`` ``ROUNDS = K_TILE``
        each under a runtime test (:func:`_rounds` says which kernel takes which). Larger
        ``K_TILE``: one bitonic ``tl.topk`` of packed (score, index) int64 keys, forced blocks at
        ``+inf``. Both rank by score with ties to the lower index (``-0.0``
        equal to ``+0.0``); ranked ``+inf`` scores count as the largest finite float, so forced
        blocks come first."""
        column = tl.arange(0, NB)
        rank = tl.arange(0, K_TILE)
        row_ok = row < rows
        position = row + first_pos
        own = position // block
        eligible = row_ok[:, None] & (column[None, :] < n_blocks) & (column[None, :] <= own[:, None])
        forced = eligible & ((column[None, :] < initial) | (column[None, :] > own[:, None] - local))
        ranked = eligible & (position >= ranked_from)[:, None] & (score > float("-inf")) & ~forced
        score = tl.minimum(score, 3.4028234663852886e38)  # ranked +inf below forced; NaN is not ranked
        if K_TILE <= ROUNDS_MAX_K:
            # Forced blocks, ascending: 0 .. initial - 1, then the local run not already among them.
            n_initial = tl.minimum(initial, own + 1)
            local_start = tl.maximum(own - local + 1, initial)
            n_forced = tl.where(row_ok, tl.minimum(n_initial + tl.maximum(own - local_start + 1, 0), top_n), 0)
            forced_index = tl.where(
                rank[None, :] < n_initial[:, None],
                rank[None, :],
                local_start[:, None] + rank[None, :] - n_initial[:, None],
            )
            chosen = tl.where(rank[None, :] < n_forced[:, None], forced_index, 0x7FFFFFFF)
            count = n_forced
            score = tl.where(ranked, score, float("-inf"))
            first = initial + local
            for r in tl.static_range(ROUNDS):
                # One round: each row's best score (its lowest column on ties) listed, then out.
                if not GUARDED or r < top_n - first:
                    best = tl.max(score, 1)
                    pick = tl.min(tl.where(score == best[:, None], column[None, :], NB), 1)
                    take = best > float("-inf")
                    chosen = tl.where((rank[None, :] == first + r) & take[:, None], pick[:, None], chosen)
                    count += take.to(tl.int32)
                    score = tl.where(column[None, :] == pick[:, None], float("-inf"), score)
            index = tl.sort(chosen)
        else:
            score = tl.where(forced, float("inf"), score)
            key = tl.where(forced | ranked, _sort_key(score, column[None, :]), MIN_KEY)
            top = tl.topk(key, K_TILE)
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

    @triton.jit
    def _top_blocks(
        Scores, Indices, Counts,
        stride_sb, stride_sh, stride_sr,
        stride_ib, stride_ih, stride_ir,
        stride_cb, stride_ch,
        heads, rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from,
        BLOCK_R: tl.constexpr, NB: tl.constexpr, K_TILE: tl.constexpr,
    ):  # fmt: skip
        """One (batch x head, tile of rows): the rows' scores, ranked and listed."""
        batch = tl.program_id(0) // heads
        head = tl.program_id(0) % heads
        row = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        column = tl.arange(0, NB)
        present = (row < rows)[:, None] & (column[None, :] < n_blocks)
        pointers = (
            Scores + batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh
            + row[:, None].to(tl.int64) * stride_sr + column[None, :]
        )  # fmt: skip
        score = tl.load(pointers, mask=present, other=float("-inf"))
        _rank_and_write(
            score, row, batch, head, Indices, Counts, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
            rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from, BLOCK_R, NB, K_TILE, K_TILE, True,
        )  # fmt: skip

    @triton.jit
    def _top_blocks_gated(
        Q, Keys, Indices, Counts,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_kn,
        stride_ib, stride_ih, stride_ir,
        stride_cb, stride_ch,
        heads, heads_per_list, group, rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from,
        HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, SUB_TILES: tl.constexpr, NB: tl.constexpr,
        K_TILE: tl.constexpr, ROUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """One (batch x list head, ``SUB_TILES`` tiles of ``BLOCK_R`` rows): the block keys loaded once,
        then per row tile the scores ``sum over the list's query heads of q . keys`` (float32
        accumulation), ranked and listed."""
        batch = tl.program_id(0) // heads
        head = tl.program_id(0) % heads
        column = tl.arange(0, NB)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_head = (head * heads_per_list) // group
        key_pointers = (
            Keys + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
            + column[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        )  # fmt: skip
        keys = tl.load(key_pointers, mask=(column < n_blocks)[:, None], other=0.0)
        for sub in range(SUB_TILES):
            row = (tl.program_id(1) * SUB_TILES + sub) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = row < rows
            score = tl.zeros([BLOCK_R, NB], dtype=tl.float32)
            for offset in range(heads_per_list):
                q_head = head * heads_per_list + offset
                q_pointers = (
                    Q + batch.to(tl.int64) * stride_qb + q_head.to(tl.int64) * stride_qh
                    + row[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
                )  # fmt: skip
                q = tl.load(q_pointers, mask=row_ok[:, None], other=0.0)
                if DOT_FP32:
                    score = tl.dot(q.to(tl.float32), tl.trans(keys), score, input_precision="ieee")
                else:
                    score = tl.dot(q, tl.trans(keys), score)
            score = tl.where((column < n_blocks)[None, :], score, float("-inf"))
            _rank_and_write(
                score, row, batch, head, Indices, Counts, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from, BLOCK_R, NB, K_TILE, ROUNDS,
                False,
            )  # fmt: skip


def _rounds(top_n: int, initial: int, local: int, k_tile: int) -> int:
    """The gated kernel's ranking rounds after the forced blocks (``_rank_and_write``): a row with
    blocks left to rank has ``initial + local`` forced ones. A compile-time count there; the
    plain kernel runs ``K_TILE`` rounds, each under a runtime test. Each kernel takes the form
    measured faster for it (one H100, 45th session, ``topk_rounds_ab2_s65.json``, against the old
    ``K_TILE`` rounds with forced blocks at ``+inf``): NSA's lists at 64K 2.35 ms before, 1.72
    with runtime tests, 1.92 with the count (ptxas: 149 registers against 167 and 8 bytes of
    spills); MoBA's gate at 128K, blocks of 512 / top 3, 4.43 before, 7.30 with runtime tests
    (255 registers), 3.26 with the count; blocks of 4096 / top 12, 1.33, 3.61, 1.16."""
    return max(0, min(k_tile, top_n - initial - local))


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
    if rows == 0 or batch * heads == 0:
        return
    k_tile = _pow2(top_n)
    nb = max(_pow2(n_blocks), k_tile, 16)
    block_r = max(1, min(64, KEYS_PER_PROGRAM // nb))
    grid = (batch * heads, triton.cdiv(rows, block_r))
    _top_blocks[grid](
        scores, indices, counts, *scores.stride()[:3], *indices.stride()[:3], *counts.stride()[:2],
        heads, rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from,
        BLOCK_R=block_r, NB=nb, K_TILE=k_tile, num_warps=8 if nb >= 2048 else 4,
    )  # fmt: skip


def causal_top_blocks_gated_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    heads_per_list: int,
    first_pos: int,
    block: int,
    top_n: int,
    initial: int,
    local: int,
    ranked_from: int,
) -> None:
    """Scores ``sum over the list's heads of q_h . keys[kv(h)]`` computed in the kernel, then
    :func:`causal_top_blocks_triton`'s lists. q ``(B, Hq, c, D)``; keys ``(B, Hkv, n_blocks, D)``
    (float32, e.g. mean-pooled keys; taken in q's dtype by 16-bit queries); the lists' heads are
    ``Hq / heads_per_list`` (1: per query head; the group size: per KV head, the group's scores summed)."""
    batch, q_heads, rows, dim = q.shape
    kv_heads, n_blocks = keys.shape[1], keys.shape[2]
    heads = q_heads // heads_per_list
    if rows == 0 or batch * heads == 0:
        return
    q = q if q.stride(-1) == 1 else q.contiguous()
    dot_fp32 = dot_in_float32(q.dtype)
    # 16-bit queries take the block keys rounded to their dtype (a copy of n_blocks keys per KV head).
    keys = (keys if dot_fp32 else keys.to(q.dtype)).contiguous()
    k_tile = _pow2(top_n)
    nb = max(_pow2(n_blocks), k_tile, 16)
    block_r = 16 if interpreting() else max(16, min(64, KEYS_PER_PROGRAM // nb))
    # Row tiles per program: the keys are read once per ROWS_PER_GATED_PROGRAM rows, not per tile.
    most = 2 if interpreting() else ROWS_PER_GATED_PROGRAM // block_r  # 2: the tests reach the loop
    sub_tiles = max(1, min(most, triton.cdiv(rows, block_r)))
    grid = (batch * heads, triton.cdiv(rows, block_r * sub_tiles))
    _top_blocks_gated[grid](
        q, keys, indices, counts, *q.stride()[:3], *keys.stride()[:3], *indices.stride()[:3], *counts.stride()[:2],
        heads, heads_per_list, q_heads // kv_heads, rows, n_blocks, first_pos, block, top_n, initial, local,
        ranked_from, HEAD_DIM=dim, BLOCK_R=block_r, SUB_TILES=sub_tiles, NB=nb, K_TILE=k_tile,
        ROUNDS=_rounds(top_n, initial, local, k_tile), DOT_FP32=dot_fp32,
        num_warps=8 if nb * dim >= 16384 else 4,
    )  # fmt: skip
