"""NSA's selection-block scores in one fused kernel: ``O(output)`` memory, no atomics, deterministic.

One program per (tile of ``BLOCK_T`` query tokens, batch x KV head, run of ``NS_EFF`` selection
blocks). With ``L = l / d`` stride pieces per compressed key and ``R = l' / d`` per selection
block, the compressed keys reaching into blocks ``j0 .. j0 + NS_EFF - 1`` are ``i`` in
``[j0 R - (L - 1), (j0 + NS_EFF) R)``; ``NS_EFF = (SPLIT BLOCK_N - (L - 1)) // R`` (at least 1) so
that they fit one step of ``SPLIT`` sub-tiles of ``BLOCK_N`` keys (with the defaults R = 4, L = 2
and one sub-tile of 128 keys: 31 blocks in 125 keys), and the query tile is read once per head.
The program reads its keys in such steps, stopping at the last key its last token sees. For each
step it loops over the group's ``G`` query heads (any ``G``: heads are not packed into rows),
loading the head's query tile once for the step's sub-tiles: ``s = q_h k^T`` (``tl.dot``),
``p = exp2(s scale log2(e) - lse_h log2(e))`` where the key is visible and the row's
``lse`` is finite, else 0, summed over the heads in registers. The sum meets the overlap matrix
``W[i, j] = |pieces of i in block j|`` (small integers built from indices in registers) in a second
``tl.dot`` into a ``(BLOCK_T, NS)`` accumulator (``NS``: ``NS_EFF`` rounded up to a power of two,
at least 16; the extra columns are not stored), stored once; every output element is written.

Precision: 16-bit inputs take the first product in their dtype (float32 accumulation); the
probability sums enter the second product split into a bfloat16 high part and a bfloat16
residual (two tensor-core products, about 16 significant bits; ``W`` is exact in bfloat16).
Float32 inputs, and every input under ``TRITON_INTERPRET=1`` (whose bfloat16 ``dot`` is wrong),
take both products in float32 (IEEE). Tile shapes are autotuned on the GPU over
:data:`CONFIGS`; the interpreter runs one small tile (16 tokens, one sub-tile of 16 keys).
"""

from __future__ import annotations

import functools

import torch

from ...backends import launch
from ...utils import dot_in_float32, interpreting, length_bucket
from .._dispatch import device_unsupported_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["CONFIGS", "blocks_per_program", "compressed_block_scores_triton", "unsupported_reason"]

_LOG2_E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Autotune candidates on the GPU: (BLOCK_T, BLOCK_N, num_warps, SPLIT); a step reads SPLIT sub-tiles
# of BLOCK_N keys (each head's query tile loaded once for all of them) and a program's blocks follow
# from BLOCK_N x SPLIT. Wider steps read the queries from L2 less often: at NSA's 64K shape a
# program of 128 keys reloads each head's 64 x 128 query tile per 2 MFLOP of products, close to the
# L2's rate. The one 256-key tile (32, 256, 8) (thirty-second session) takes mma.sync, not
# wgmma, at 32 rows; the split steps of two 128-key sub-tiles (thirty-third session) keep 64-row
# wgmma tiles; compiled for sm_90a (bf16, head_dim 128) they use 255 registers at 8 warps.
CONFIGS = tuple((t, n, w, 1) for t in (32, 64) for n in (64, 128) for w in (4, 8)) + (
    (32, 256, 8, 1),
    (64, 128, 4, 2),
    (64, 128, 8, 2),
)
_INTERPRETER_CONFIG = (16, 16, 4, 1)


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why :func:`compressed_block_scores_triton` cannot run on ``q``'s case, or ``None``."""
    if triton is None:
        return "triton is not installed"
    reason = device_unsupported_reason(q)
    if reason is not None:
        return reason
    if q.dtype not in _DTYPES:
        return f"the compressed-scores kernel takes float16, bfloat16 or float32, got {q.dtype}"
    dim = q.shape[-1]
    if not 16 <= dim <= 256 or dim & (dim - 1):
        return f"the compressed-scores kernel takes a power-of-two head_dim in 16..256, got {dim}"
    return None


if triton is not None:

    @triton.jit
    def _head_probabilities(q, lse_log2, keys, scale_log2, DOT_FP32: tl.constexpr):
        """``exp2(q k^T scale log2(e) - lse_log2)`` for every key (the caller masks the sum once)."""
        if DOT_FP32:
            logits = tl.dot(q.to(tl.float32), keys.to(tl.float32), input_precision="ieee")
        else:
            logits = tl.dot(q, keys)
        return tl.exp2(logits * scale_log2 - lse_log2[:, None])

    @triton.jit
    def _visible(cols, key_stop, row_ok, positions, compress_block, compress_stride):
        """Whether each row sees each key (the key ends at or before the row's position)."""
        return (
            row_ok[:, None]
            & (cols < key_stop)[None, :]
            & (cols[None, :] * compress_stride + compress_block - 1 <= positions[:, None])
        )

    @triton.jit
    def _weigh_blocks(acc, summed, cols, blocks, PIECES_PER_KEY: tl.constexpr, PIECES_PER_BLOCK: tl.constexpr,
                      DOT_FP32: tl.constexpr):  # fmt: skip
        """``acc += summed @ W[cols, blocks]``."""
        # Stride pieces shared by key i (pieces i .. i + L - 1) and block j (pieces j R .. j R + R - 1).
        low = tl.maximum(cols[:, None], blocks[None, :] * PIECES_PER_BLOCK)
        high = tl.minimum(cols[:, None] + PIECES_PER_KEY, blocks[None, :] * PIECES_PER_BLOCK + PIECES_PER_BLOCK)
        weights = tl.maximum(high - low, 0).to(tl.float32)
        if DOT_FP32:
            acc += tl.dot(summed, weights, input_precision="ieee")
        else:
            weights = weights.to(tl.bfloat16)
            high_part = summed.to(tl.bfloat16)
            residual = (summed - high_part.to(tl.float32)).to(tl.bfloat16)
            acc += tl.dot(high_part, weights)
            acc += tl.dot(residual, weights)
        return acc

    @triton.jit
    def _accumulate_keys(
        acc,
        q_base,
        lse_base,
        k_base,
        cols,
        key_stop,
        rows,
        row_ok,
        positions,
        blocks,
        stride_qh,
        stride_qm,
        stride_lh,
        stride_lm,
        stride_kn,
        group,
        scale_log2,
        compress_block,
        compress_stride,
        HEAD_DIM: tl.constexpr,
        PIECES_PER_KEY: tl.constexpr,
        PIECES_PER_BLOCK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        """``acc += (sum_h p_h[:, keys]) @ W[keys, blocks]`` for the ``SPLIT`` key sub-tiles of
        ``COLS`` keys from ``cols`` on (each head's query tile loaded once for all of them)."""
        offs_d = tl.arange(0, HEAD_DIM)
        keys = tl.load(
            k_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
            mask=(cols < key_stop)[None, :],
            other=0.0,
        )
        summed = tl.zeros([ROWS, COLS], tl.float32)
        cols_2 = cols + COLS
        summed_2 = tl.zeros([ROWS, COLS], tl.float32)
        if SPLIT == 2:
            keys_2 = tl.load(
                k_base + cols_2[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                mask=(cols_2 < key_stop)[None, :],
                other=0.0,
            )
        for head in range(0, group):
            q = tl.load(
                q_base + head * stride_qh + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            lse = tl.load(lse_base + head * stride_lh + rows * stride_lm, mask=row_ok, other=float("-inf"))
            # A row with lse = -inf sees no key: an infinite bound makes its terms exp2(-inf) = 0.
            lse_log2 = tl.where(lse > float("-inf"), lse * 1.4426950408889634, float("inf"))
            summed += _head_probabilities(q, lse_log2, keys, scale_log2, DOT_FP32)
            if SPLIT == 2:
                summed_2 += _head_probabilities(q, lse_log2, keys_2, scale_log2, DOT_FP32)
        # Keys the row does not see (past its position or past the keys) may have summed to
        # anything, +inf included (their logits are not bounded by the row's lse): zeroed once here.
        summed = tl.where(_visible(cols, key_stop, row_ok, positions, compress_block, compress_stride), summed, 0.0)
        if SPLIT == 2:
            summed_2 = tl.where(
                _visible(cols_2, key_stop, row_ok, positions, compress_block, compress_stride), summed_2, 0.0
            )
        acc = _weigh_blocks(acc, summed, cols, blocks, PIECES_PER_KEY, PIECES_PER_BLOCK, DOT_FP32)
        if SPLIT == 2:
            acc = _weigh_blocks(acc, summed_2, cols_2, blocks, PIECES_PER_KEY, PIECES_PER_BLOCK, DOT_FP32)
        return acc

    @triton.jit
    def _compressed_scores(
        Q,
        K,
        Lse,
        Out,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_lb,
        stride_lh,
        stride_lm,
        stride_ob,
        stride_oh,
        stride_om,
        kv_heads,
        group,
        chunk,
        n_cmp,
        n_select,
        first_pos,
        scale_log2,
        compress_block,
        compress_stride,
        chunk_bucket,
        n_select_bucket,
        HEAD_DIM: tl.constexpr,
        PIECES_PER_KEY: tl.constexpr,
        PIECES_PER_BLOCK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
        NS_EFF: tl.constexpr,
        NS: tl.constexpr,
    ):
        batch = tl.program_id(1) // kv_heads
        kv_head = tl.program_id(1) % kv_heads
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < chunk
        positions = rows + first_pos
        first_block = tl.program_id(2) * NS_EFF
        blocks = first_block + tl.arange(0, NS)
        # The program owns NS_EFF blocks; the accumulator's other columns miss keys and are not stored.
        block_ok = (tl.arange(0, NS) < NS_EFF) & (blocks < n_select)

        q_base = Q + batch.to(tl.int64) * stride_qb + (kv_head * group).to(tl.int64) * stride_qh
        lse_base = Lse + batch.to(tl.int64) * stride_lb + (kv_head * group).to(tl.int64) * stride_lh
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh

        # Keys that reach into the owned blocks: from those starting up to L - 1 pieces before the
        # first block to the last block's end; past the last key the tile's last token sees, nothing.
        last_position = first_pos + tl.minimum(tl.program_id(0) * BLOCK_T + BLOCK_T, chunk) - 1
        seen = tl.where(
            last_position >= compress_block - 1, (last_position - compress_block + 1) // compress_stride + 1, 0
        )
        key_stop = tl.minimum(tl.minimum(seen, n_cmp), (first_block + NS_EFF) * PIECES_PER_BLOCK)
        key_start = tl.maximum(first_block * PIECES_PER_BLOCK - (PIECES_PER_KEY - 1), 0)

        acc = tl.zeros([BLOCK_T, NS], tl.float32)
        for start in range(key_start, key_stop, BLOCK_N * SPLIT):
            cols = start + tl.arange(0, BLOCK_N)
            acc = _accumulate_keys(
                acc, q_base, lse_base, k_base, cols, key_stop, rows, row_ok, positions, blocks,
                stride_qh, stride_qm, stride_lh, stride_lm, stride_kn, group, scale_log2,
                compress_block, compress_stride, HEAD_DIM, PIECES_PER_KEY, PIECES_PER_BLOCK, DOT_FP32, BLOCK_T, BLOCK_N,
                SPLIT,
            )  # fmt: skip

        out = Out + batch.to(tl.int64) * stride_ob + kv_head.to(tl.int64) * stride_oh
        tl.store(
            out + rows[:, None].to(tl.int64) * stride_om + blocks[None, :],
            acc,
            mask=row_ok[:, None] & block_ok[None, :],
        )


def blocks_per_program(block_n: int, pieces_per_key: int, pieces_per_block: int) -> tuple[int, int]:
    """``(NS_EFF, NS)``: the selection blocks a program owns, chosen so that the keys reaching into
    them (``NS_EFF R + L - 1``) fit one ``block_n`` sub-tile when they can (at least one block, then
    several sub-tiles), and its accumulator's width (a power of two, at least 16 for ``tl.dot``)."""
    owned = max(1, (block_n - (pieces_per_key - 1)) // pieces_per_block)
    return owned, max(16, triton.next_power_of_2(owned))


def _with_blocks(config: dict, pieces_per_key: int, pieces_per_block: int) -> dict:
    owned, width = blocks_per_program(config["BLOCK_N"] * config["SPLIT"], pieces_per_key, pieces_per_block)
    return config | dict(NS_EFF=owned, NS=width)


def _grid(meta: dict, *, chunk: int, programs: int, n_select: int) -> tuple[int, int, int]:
    return triton.cdiv(chunk, meta["BLOCK_T"]), programs, triton.cdiv(n_select, meta["NS_EFF"])


def _owned(args: dict) -> tuple[int, int]:
    return blocks_per_program(args["BLOCK_N"] * args["SPLIT"], args["PIECES_PER_KEY"], args["PIECES_PER_BLOCK"])


@functools.cache
def _autotuned_kernel():
    configs = [triton.Config(dict(BLOCK_T=t, BLOCK_N=n, SPLIT=split), num_warps=w) for t, n, w, split in CONFIGS]
    key = ["group", "chunk_bucket", "n_select_bucket", "HEAD_DIM", "PIECES_PER_KEY", "PIECES_PER_BLOCK", "DOT_FP32"]
    blocks = dict(
        NS_EFF=lambda args: _owned(args)[0],
        NS=lambda args: _owned(args)[1],
    )
    return triton.autotune(configs=configs, key=key)(triton.heuristics(blocks)(_compressed_scores))


def compressed_block_scores_triton(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    *,
    first_pos: int,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    n_select: int,
    scale: float,
) -> torch.Tensor:
    """:func:`.naive.compressed_block_scores` in the kernel; same arguments (validated by the
    caller, :func:`sparse_attn.ops.compressed_scores.compressed_block_scores`) and result."""
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"the compressed-scores kernel cannot run this case: {reason}")
    batch, q_heads, chunk, dim = q.shape
    kv_heads, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    if chunk == 0 or n_cmp == 0:
        return torch.zeros((batch, kv_heads, chunk, n_select), dtype=torch.float32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cmp = k_cmp if k_cmp.stride(-1) == 1 else k_cmp.contiguous()
    out = launch.allocate((batch, kv_heads, chunk, n_select), torch.float32, q.device)
    args = (
        q, k_cmp, lse, out,
        *q.stride()[:3], *k_cmp.stride()[:3], *lse.stride(), *out.stride()[:3],
        kv_heads, q_heads // kv_heads, chunk, n_cmp, n_select, first_pos, scale * _LOG2_E,
        compress_block, compress_stride, length_bucket(chunk), length_bucket(n_select),
    )  # fmt: skip
    constants = dict(
        HEAD_DIM=dim,
        PIECES_PER_KEY=compress_block // compress_stride,
        PIECES_PER_BLOCK=select_block // compress_stride,
        DOT_FP32=dot_in_float32(q.dtype) or interpreting(),
    )
    if interpreting():
        block_t, block_n, warps, split = _INTERPRETER_CONFIG
        tile = _with_blocks(
            dict(BLOCK_T=block_t, BLOCK_N=block_n, SPLIT=split),
            constants["PIECES_PER_KEY"],
            constants["PIECES_PER_BLOCK"],
        )
        grid = _grid(tile, chunk=chunk, programs=batch * kv_heads, n_select=n_select)
        _compressed_scores[grid](*args, **constants, **tile, num_warps=warps)
    else:
        grid = functools.partial(_grid, chunk=chunk, programs=batch * kv_heads, n_select=n_select)
        _autotuned_kernel()[grid](*args, **constants)
    return out
