"""The last-query probe in Triton: the probe rows' softmax reduced on the fly, never stored.

Reference: :func:`.naive.probe_last_queries`, which materialises the float32 logits of the
probe rows (2 GiB at 128K tokens, 32 heads, 128 rows) and passes over them about six times.
Here the ``rows`` probe queries of one head are one tile of ``BLOCK`` rows (``rows`` padded
to a power of two), and the keys are cut into chunks of ``tiles_per_chunk`` tiles of ``BLOCK``
keys. Three launches, each over ``(batch x query head, chunk)`` with the query heads fastest,
so that the programs of one GQA group run side by side and share each K chunk in L2 (K is read
from memory about once per pass, twice in all):

1. :func:`_probe_row_stats`: per row, the running maximum and sum of ``exp2`` of the chunk's
   scaled logits (an online softmax over the chunk), written to float32 ``(B*Hq, chunks, BLOCK)``
   buffers;
2. :func:`_probe_sums`: combines the chunks' statistics into each row's log-sum-exp (in chunk
   order), then recomputes the logits of each ``BLOCK x BLOCK`` tile of its chunk, takes
   ``p = exp2(s - lse)`` and reduces it: the column sums are the tile's vertical sums, written
   directly (each program owns its keys). For the slash sums the tile is sheared in
   registers (:func:`_diagonal_sums`: ``tl.gather`` within blocks of ``SHEAR_GROUP``
   columns, then over the grid of blocks) and summed over its rows: ``lower[w]``, the
   diagonal ``w`` below the main one (distance ``base + w``, ``base`` the distance of the
   tile's main diagonal), and ``upper[w]``, the diagonal ``BLOCK - w`` above it (distance
   ``base - BLOCK + w``). The upper slot of a tile is the lower slot of the next one, so
   within a chunk each slot is ``lower + carry`` (``carry`` the previous tile's ``upper``),
   complete and owned by the program. Only the first lower slot and the last upper slot of
   a chunk are shared with its neighbours: they go to float32 ``(B*Hq, chunks, BLOCK)`` seam
   buffers;
3. :func:`_slash_seams`: each seam slot is the sum of the two chunks' halves.

Every output element is written by exactly one program and every sum is taken in a fixed
order, with no atomics: results are identical run to run. The scratch (statistics and seams)
is ``4 x B x Hq x chunks x BLOCK`` floats; the chunk count is set to fill the GPU
(:func:`_tiles_per_chunk`), so the scratch does not grow with the sequence (2 MiB at 32 heads
and 128 rows on an H200). Block sums are the vertical sums per KV block, summed in PyTorch.
Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 products are taken in float32 (the
interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...geometry import num_blocks
from ...utils import dot_in_float32, interpreting
from .._dispatch import device_unsupported_reason
from .._triton_util import dot_rows
from ..gqa import gqa_group
from .naive import ProbeSums, block_sum

__all__ = ["MAX_ROWS", "probe_last_queries_triton", "unsupported_reason"]

_LOG2_E = 1.4426950408889634
# Most probe rows one tile holds (a BLOCK x BLOCK float32 tile in registers).
MAX_ROWS = 128
_HEAD_DIMS = (16, 32, 64, 128, 256)
# Programs per pass wanted per multiprocessor: several waves keep the last one short.
_PROGRAMS_PER_SM = 8
# Q tile bytes up to which a program holds its probe rows for the whole chunk; larger Q tiles
# (head_dim 256, or float32 inputs) are read in head-dim slices of half that with each K slice.
_RESIDENT_Q_BYTES = 32 * 1024
_empty = torch.empty  # the allocator of the outputs and scratch: the tests poison it


def unsupported_reason(q: torch.Tensor, *, k: torch.Tensor, num_queries: int) -> str | None:
    """Why the kernel cannot probe ``q`` against ``k`` with ``num_queries`` rows, or ``None``."""
    reason = device_unsupported_reason(q)
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32, not {q.dtype}"
    if k.dtype != q.dtype:
        return f"needs q and k of one dtype, got {q.dtype} and {k.dtype}"
    if q.shape[-1] not in _HEAD_DIMS:
        return f"takes head_dim {', '.join(map(str, _HEAD_DIMS))}, not {q.shape[-1]}"
    if min(num_queries, q.shape[2]) > MAX_ROWS:
        return f"takes at most {MAX_ROWS} probe rows, got {min(num_queries, q.shape[2])}"
    if q.shape[2] == 0 or k.shape[2] < q.shape[2]:
        return f"needs 1 <= Sq <= Sk, got Sq {q.shape[2]} and Sk {k.shape[2]}"
    return None


@triton.jit
def _load_rows(base, first, count, stride, d_start, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``first`` to ``first + BLOCK_ROWS`` of ``base`` (zeros from row ``count`` on), head-dim
    columns ``d_start`` to ``d_start + BLOCK_D``."""
    rows = first + tl.arange(0, BLOCK_ROWS)
    columns = d_start + tl.arange(0, BLOCK_D)
    return tl.load(
        base + rows[:, None].to(tl.int64) * stride + columns[None, :], mask=(rows < count)[:, None], other=0.0
    )


@triton.jit
def _tile_logits(
    q, q_base, k_base, start_n, rows, seq_k, stride_qs, stride_ks,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Float32 ``(BLOCK, BLOCK_N)`` products of the probe rows with keys ``start_n`` on (zeros past
    the rows and keys). ``q`` is the whole probe tile when ``BLOCK_D == HEAD_DIM``; otherwise
    the rows are read slice by slice from ``q_base`` beside each K slice (``q`` unused)."""
    acc = tl.zeros([BLOCK, BLOCK_N], dtype=tl.float32)
    if BLOCK_D == HEAD_DIM:
        keys = _load_rows(k_base, start_n, seq_k, stride_ks, 0, BLOCK_N, HEAD_DIM)
        acc = dot_rows(q, keys, acc, DOT_FP32, PRECISION)
    else:
        for d_start in range(0, HEAD_DIM, BLOCK_D):
            q_slice = _load_rows(q_base, 0, rows, stride_qs, d_start, BLOCK, BLOCK_D)
            keys = _load_rows(k_base, start_n, seq_k, stride_ks, d_start, BLOCK_N, BLOCK_D)
            acc = dot_rows(q_slice, keys, acc, DOT_FP32, PRECISION)
    return acc


@triton.jit
def _visible_logits(
    acc, start_n, key_stop, rows, seq_k, qk_scale, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """Scaled (log2) logits, ``-inf`` where the row is padding, the key ``key_stop`` or later or,
    causal, later than the row's position ``seq_k - rows + row``."""
    offs_m = tl.arange(0, BLOCK)
    keys = start_n + tl.arange(0, BLOCK_N)
    visible = (offs_m < rows)[:, None] & (keys < key_stop)[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= (seq_k - rows + offs_m)[:, None])
    return tl.where(visible, acc * qk_scale, float("-inf"))


@triton.jit
def _diagonal_sums(p, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """Sums of the square tile ``p`` along its diagonals: ``lower[w]`` over ``i - c = w`` and
    ``upper[w]`` over ``i - c = w - BLOCK`` (row ``i``, column ``c``; ``w`` in ``[0, BLOCK)``).

    In two levels, so that the cross-lane shuffle moves short rows: each ``GROUP x GROUP``
    block is sheared cyclically (row ``b``, column ``v`` takes the block's ``(b - v) mod GROUP``)
    and summed over its rows, which leaves per (row block, column block) the block's diagonals
    below (``v <= b``) and above its main one; then the ``BLOCK / GROUP`` square grid of those
    is sheared and summed the same way."""
    N: tl.constexpr = BLOCK // GROUP
    offs = tl.arange(0, GROUP)
    fine = tl.reshape((offs[:, None] - offs[None, :] + GROUP) % GROUP, (1, GROUP, 1, GROUP))
    sheared = tl.gather(tl.reshape(p, (N, GROUP, N, GROUP)), tl.broadcast_to(fine, (N, GROUP, N, GROUP)), 3)
    below = tl.reshape(offs[None, :] <= offs[:, None], (1, GROUP, 1, GROUP))
    # [row block a, column block c, v]: the diagonal GROUP * (a - c) + v (lo) or
    # GROUP * (a - c - 1) + v (up) of the tile.
    lo = tl.sum(tl.where(below, sheared, 0.0), 1)
    up = tl.sum(tl.where(below, 0.0, sheared), 1)
    if N == 1:
        return tl.reshape(lo, (BLOCK,)), tl.reshape(up, (BLOCK,))
    blocks = tl.arange(0, N)
    coarse = (blocks[:, None] - blocks[None, :] + N) % N
    lo = tl.gather(lo, tl.broadcast_to(tl.reshape(coarse, (N, N, 1)), (N, N, GROUP)), 1)
    coarse = (blocks[:, None] - blocks[None, :] + N - 1) % N
    up = tl.gather(up, tl.broadcast_to(tl.reshape(coarse, (N, N, 1)), (N, N, GROUP)), 1)
    # Now [a, m, v] holds the diagonal GROUP * m + v where m <= a (lo) or m < a (up), else
    # GROUP * (m - N) + v.
    lo_below = tl.reshape(blocks[None, :] <= blocks[:, None], (N, N, 1))
    up_below = tl.reshape(blocks[None, :] < blocks[:, None], (N, N, 1))
    lower = tl.sum(tl.where(lo_below, lo, 0.0) + tl.where(up_below, up, 0.0), 0)
    upper = tl.sum(tl.where(lo_below, 0.0, lo) + tl.where(up_below, 0.0, up), 0)
    return tl.reshape(lower, (BLOCK,)), tl.reshape(upper, (BLOCK,))


@triton.jit
def _head_bases(Q, K, batch_head, q_heads, group, seq_q, rows, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh):
    """The program's first probe row of Q (row ``seq_q - rows`` of its query head) and its KV head's K."""
    batch = batch_head // q_heads
    head = batch_head % q_heads
    q_base = (
        Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + (seq_q - rows).to(tl.int64) * stride_qs
    )
    return q_base, K + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh


@triton.jit
def _probe_row_stats(
    Q, K, RowMax, RowSum,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    q_heads, group, seq_q, seq_k, rows, chunk_keys, num_chunks, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 1: per probe row, the maximum and the sum of ``exp2(s - max)`` of its scaled logits
    ``s`` over one chunk of ``chunk_keys`` keys (max ``-inf`` and sum 0 where it sees none)."""
    batch_head = tl.program_id(0)
    chunk = tl.program_id(1)
    q_base, k_base = _head_bases(
        Q, K, batch_head, q_heads, group, seq_q, rows, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh
    )
    q = q_base  # read slice by slice in _tile_logits unless held whole
    if BLOCK_D == HEAD_DIM:
        q = _load_rows(q_base, 0, rows, stride_qs, 0, BLOCK, HEAD_DIM)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    chunk_start = chunk * chunk_keys
    chunk_stop = tl.minimum(chunk_start + chunk_keys, seq_k)
    for start_n in range(chunk_start, chunk_stop, BLOCK_N):
        acc = _tile_logits(
            q, q_base, k_base, start_n, rows, seq_k, stride_qs, stride_ks,
            HEAD_DIM, BLOCK, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION,
        )  # fmt: skip
        s = _visible_logits(acc, start_n, chunk_stop, rows, seq_k, qk_scale, BLOCK, BLOCK_N, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    stats = (batch_head * num_chunks + chunk).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(RowMax + stats, m_i)
    tl.store(RowSum + stats, l_i)


@triton.jit
def _probe_sums(
    Q, K, RowMax, RowSum, Vertical, Slash, SeamLow, SeamHigh,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    q_heads, group, seq_q, seq_k, rows, chunk_tiles, num_chunks, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SHEAR_GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SLASH: tl.constexpr,
):  # fmt: skip
    """Pass 2: the vertical sums of one chunk's keys and the slash sums of its inner diagonals
    (causal and ``SLASH``), plus the two seam slots of the chunk (first lower, last upper)."""
    batch_head = tl.program_id(0)
    chunk = tl.program_id(1)
    q_base, k_base = _head_bases(
        Q, K, batch_head, q_heads, group, seq_q, rows, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh
    )
    offs_m = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)

    # Each row's log-sum-exp from the chunks' statistics, combined in chunk order.
    stats = (batch_head * num_chunks).to(tl.int64) * BLOCK + offs_m
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    for other in range(0, num_chunks):
        m_c = tl.load(RowMax + stats + other * BLOCK)
        l_c = tl.load(RowSum + stats + other * BLOCK)
        m_new = tl.maximum(m_i, m_c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_safe) + l_c * tl.math.exp2(m_c - m_safe)
        m_i = m_new
    # Padding rows see no key (sum 0): their logits are -inf, so any finite lse gives p = 0.
    seen = l_i > 0.0
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), 0.0)

    q = q_base  # read slice by slice in _tile_logits unless held whole
    if BLOCK_D == HEAD_DIM:
        q = _load_rows(q_base, 0, rows, stride_qs, 0, BLOCK, HEAD_DIM)
    out_row = Vertical + batch_head.to(tl.int64) * seq_k
    slash_row = Slash + batch_head.to(tl.int64) * seq_k
    seam = (batch_head * num_chunks + chunk).to(tl.int64) * BLOCK + offs_n
    first_tile = chunk * chunk_tiles
    tiles = tl.minimum(chunk_tiles, tl.cdiv(seq_k, BLOCK) - first_tile)
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for tile in range(0, tiles):
        start_n = (first_tile + tile) * BLOCK
        acc = _tile_logits(
            q, q_base, k_base, start_n, rows, seq_k, stride_qs, stride_ks,
            HEAD_DIM, BLOCK, BLOCK, BLOCK_D, DOT_FP32, PRECISION,
        )  # fmt: skip
        s = _visible_logits(acc, start_n, seq_k, rows, seq_k, qk_scale, BLOCK, BLOCK, CAUSAL)
        p = tl.math.exp2(s - lse[:, None])
        keys = start_n + offs_n
        tl.store(out_row + keys, tl.sum(p, 0), mask=keys < seq_k)
        if CAUSAL and SLASH:
            lower, upper = _diagonal_sums(p, BLOCK, SHEAR_GROUP)
            # Row i sits at seq_k - rows + i, so the main diagonal (i = c) is at this distance.
            distances = seq_k - rows - start_n + offs_n
            inner = (tile > 0) & (distances >= 0) & (distances < seq_k)
            tl.store(slash_row + distances, lower + carry, mask=inner)
            tl.store(SeamLow + seam, lower, mask=(offs_n >= 0) & (tile == 0))
            carry = upper
    if CAUSAL and SLASH:
        tl.store(SeamHigh + seam, carry)


@triton.jit
def _slash_seams(
    Slash, SeamLow, SeamHigh, seq_k, rows, chunk_tiles, num_chunks, num_tiles, BLOCK: tl.constexpr
):  # fmt: skip
    """Pass 3: seam ``j`` (0 to ``num_chunks``), the slot of chunk ``j``'s first lower diagonals,
    is their sum plus chunk ``j - 1``'s last upper diagonals."""
    batch_head = tl.program_id(0)
    seam = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    distances = seq_k - rows - tl.minimum(seam * chunk_tiles, num_tiles) * BLOCK + offs
    base = (batch_head * num_chunks + seam).to(tl.int64) * BLOCK
    low = tl.load(SeamLow + base + offs, mask=(offs >= 0) & (seam < num_chunks), other=0.0)
    high = tl.load(SeamHigh + base - BLOCK + offs, mask=(offs >= 0) & (seam > 0), other=0.0)
    tl.store(
        Slash + batch_head.to(tl.int64) * seq_k + distances, low + high, mask=(distances >= 0) & (distances < seq_k)
    )


class LaunchConfig(NamedTuple):
    """Tile and launch choices of the two main passes for one padded row count."""

    pass1_keys: int  # pass 1's key tile (its rows: the padded row count)
    pass1_warps: int
    pass1_stages: int
    shear_group: int  # the side of the blocks sheared first (:func:`_diagonal_sums`)
    warps: int  # pass 2
    stages: int


def _launch_config(block: int, sliced: bool = False) -> LaunchConfig:
    """The launch choices for ``block`` padded rows, the probe rows held whole or (``sliced``)
    read in head-dim slices: from a sweep at 128K keys, 32/8 heads, head_dim 128, bf16 on an
    H200 (sliced: eight warps, which spill far less); under the interpreter, small tiles that
    cover the one- and two-level shear and pass 1's wider key tiles."""
    if interpreting():
        return LaunchConfig(max(block, 32), 4, 1, max(block // 2, 16), 4, 1)
    if sliced:
        return LaunchConfig(max(block, 64), 8, 2, min(block, 64), 8, 2)
    if block >= 128:
        return LaunchConfig(128, 4, 2, 64, 4, 2)
    if block == 64:
        return LaunchConfig(64, 4, 3, 64, 2, 2)
    return LaunchConfig(64, 4, 2, block, 4, 2)


def _tiles_per_chunk(device: torch.device, programs_per_pass: int, tiles: int, step: int) -> int:
    """Key tiles per chunk: enough chunks for ``_PROGRAMS_PER_SM`` programs per multiprocessor
    (two tiles under the interpreter, so that the tests cross chunk seams), in multiples of
    ``step`` (pass 1's key tile in tiles of pass 2)."""
    if device.type == "cuda":
        wanted = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        chunks = max(1, min(tiles, triton.cdiv(wanted, programs_per_pass)))
        per_chunk = triton.cdiv(tiles, chunks)
    else:
        per_chunk = 2
    return triton.cdiv(per_chunk, step) * step


def probe_last_queries_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_queries: int,
    block_k: int,
    scale: float,
    causal: bool,
    tiles_per_chunk: int | None = None,
    slash: bool = True,
) -> ProbeSums:
    """Same result as :func:`.naive.probe_last_queries`, with the kernels.

    ``tiles_per_chunk``: key tiles (of the padded row count, at least 16 keys) per program;
    default: enough programs to fill the GPU (:func:`_tiles_per_chunk`). It changes only the
    order of the float32 sums. ``slash=False``: the vertical and block sums only (``slash`` is
    None): pass 2 skips the diagonal shear and pass 3 does not run (``auto``'s probe reads
    block sums only).
    """
    reason = unsupported_reason(q, k=k, num_queries=num_queries)
    if reason is not None:
        raise ValueError(f"the Triton last-query probe cannot run this case: {reason}")
    batch, q_heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    rows = min(num_queries, seq_q)
    group = gqa_group(q, k)
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    block = max(16, triton.next_power_of_2(rows))
    element_bytes = q.element_size()
    if interpreting():  # the tests cover both: whole rows up to head_dim 64, slices beyond
        block_d = min(dim, 64)
    elif block * dim * element_bytes <= _RESIDENT_Q_BYTES:
        block_d = dim
    else:
        block_d = max(16, _RESIDENT_Q_BYTES // 2 // (block * element_bytes))
    config = _launch_config(block, sliced=block_d < dim)
    tiles = num_blocks(seq_k, block)
    programs = batch * q_heads
    if tiles_per_chunk is None:
        tiles_per_chunk = _tiles_per_chunk(q.device, programs, tiles, config.pass1_keys // block)
    elif tiles_per_chunk < 1:
        raise ValueError(f"tiles_per_chunk must be positive, got {tiles_per_chunk}")
    chunks = num_blocks(tiles, tiles_per_chunk)
    use_float32_dot = dot_in_float32(q.dtype)
    constants = dict(
        HEAD_DIM=dim,
        BLOCK=block,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        DOT_FP32=use_float32_dot,
        PRECISION="ieee" if use_float32_dot else "tf32",
    )
    shape_args = (*q.stride()[:3], *k.stride()[:3], q_heads, group, seq_q, seq_k, rows)
    qk_scale = scale * _LOG2_E

    row_max = _empty((programs, chunks, block), dtype=torch.float32, device=q.device)
    row_sum = _empty((programs, chunks, block), dtype=torch.float32, device=q.device)
    _probe_row_stats[(programs, chunks)](
        q, k, row_max, row_sum, *shape_args, tiles_per_chunk * block, chunks, qk_scale,
        BLOCK_N=config.pass1_keys, **constants, num_warps=config.pass1_warps, num_stages=config.pass1_stages,
    )  # fmt: skip

    vertical = _empty((batch, q_heads, seq_k), dtype=torch.float32, device=q.device)
    sheared = causal and slash
    if sheared:
        slash_sums = _empty((batch, q_heads, seq_k), dtype=torch.float32, device=q.device)
        seam_low = _empty((programs, chunks, block), dtype=torch.float32, device=q.device)
        seam_high = _empty((programs, chunks, block), dtype=torch.float32, device=q.device)
    else:  # no slash lines without a causal mask, as in the reference; none at all when not asked for
        slash_sums = torch.zeros((batch, q_heads, seq_k), dtype=torch.float32, device=q.device) if slash else None
        seam_low = seam_high = row_max  # unused pointers
    _probe_sums[(programs, chunks)](
        q, k, row_max, row_sum, vertical, row_max if slash_sums is None else slash_sums, seam_low, seam_high,
        *shape_args, tiles_per_chunk, chunks, qk_scale, SHEAR_GROUP=config.shear_group, **constants, SLASH=sheared,
        num_warps=config.warps, num_stages=config.stages,
    )  # fmt: skip
    if sheared:
        _slash_seams[(programs, chunks + 1)](
            slash_sums, seam_low, seam_high, seq_k, rows, tiles_per_chunk, chunks, tiles, BLOCK=block
        )
    return ProbeSums(vertical=vertical, slash=slash_sums, block=block_sum(vertical, block_k), num_queries=rows)
