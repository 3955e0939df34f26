"""NSA's selection-block scores in one fused kernel: ``O(output)`` memory, no atomics, deterministic.

One program per (tile of ``BLOCK_T`` query tokens, batch x KV head, run of ``NS_EFF`` selection
blocks). With ``L = l / d`` stride pieces per compressed key and ``R = l' / d`` per selection
block, the compressed keys reaching into blocks ``j0 .. j0 + NS_EFF - 1`` are ``i`` in
``[j0 R - (L - 1), (j0 + NS_EFF) R)``; ``NS_EFF = (BLOCK_N - (L - 1)) // R`` (at least 1) so that
they fit one sub-tile of ``BLOCK_N`` keys (with the defaults R = 4, L = 2: 31 blocks in 125 of 128
keys), and the query tile is read once per head. The program reads its keys in ``BLOCK_N``
sub-tiles, stopping at the last key its last token sees. For each sub-tile it loops over the
group's ``G`` query heads (any ``G``: heads are not packed into rows): ``s = q_h k^T``
(``tl.dot``), ``p = exp2(s scale log2(e) - lse_h log2(e))`` (a row whose ``lse`` is ``-inf``
takes an infinite bound, so its terms are 0), summed over the heads in registers; the keys a row
does not see are zeroed in the sum once, after the heads (their terms may be anything, ``+inf``
included, since the row's ``lse`` does not bound them). The query tile of each head comes through
pointer loads, or through a tensor descriptor over the group's heads (``USE_TMA``, Hopper, 16-bit
inputs), which Triton's pipeliner prefetches heads ahead (it does not pipeline the pointer loads
of this loop: the compiled sm_90a code has none of its ``cp.async``). The sum meets the overlap matrix
``W[i, j] = |pieces of i in block j|`` (small integers built from indices in registers) in a second
``tl.dot`` into a ``(BLOCK_T, NS)`` accumulator (``NS``: ``NS_EFF`` rounded up to a power of two,
at least 16; the extra columns are not stored), stored once; every output element is written.

Precision: 16-bit inputs take the first product in their dtype (float32 accumulation); the
probability sums enter the second product split into a bfloat16 high part and a bfloat16
residual (two tensor-core products, about 16 significant bits; ``W`` is exact in bfloat16).
Float32 inputs, and every input under ``TRITON_INTERPRET=1`` (whose bfloat16 ``dot`` is wrong),
take both products in float32 (IEEE). Tile shapes are autotuned on the GPU over
:data:`CONFIGS` (pointer loads) and :data:`TMA_CONFIGS` (descriptor loads, where they can run:
:func:`tma_unsupported_reason`, and only while :data:`AUTOTUNE_TMA` is on); ``loads=`` forces
one kind. The interpreter runs one small tile (16 tokens, 16 keys).
"""

from __future__ import annotations

import functools

import torch

from ...backends import launch
from ...utils import device_capability, dot_in_float32, interpreting, length_bucket
from .._dispatch import device_unsupported_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = [
    "CONFIGS",
    "LOAD_MODES",
    "TMA_CONFIGS",
    "blocks_per_program",
    "compressed_block_scores_triton",
    "tma_unsupported_reason",
    "unsupported_reason",
]

_LOG2_E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Autotune candidates on the GPU: (BLOCK_T, BLOCK_N, num_warps); a program's blocks follow from BLOCK_N.
# Timed alone at NSA's 64K shape (thirty-third session, benchmarks/results/h200/NOTES.md): the
# selection took 10.6 ms with (64, 128, 4), 12.2-22.2 with the others. Tried there and dropped:
# one 256-key tile (32, 256, 8) (15.7 ms: mma.sync at 32 rows) and steps of two 128-key sub-tiles
# under one query load (12.1-14.4 ms: 255 registers, spills).
CONFIGS = tuple((t, n, w) for t in (32, 64) for n in (64, 128) for w in (4, 8))
# With the query tiles through tensor descriptors (pipelined: 3 stages of one head's tile); compiled
# for sm_90a (bf16, head_dim 128): 136-255 registers, no spills; (64, 128, 4) would spill 136 bytes.
TMA_CONFIGS = ((64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8))
LOAD_MODES = ("pointers", "tma")
# Whether ``loads=None`` lets the autotuner take descriptor loads too. Off: tested on the H200 in
# the thirty-fourth session, but slower there (NSA's 64K selection: best descriptor tile 11.54 ms,
# best pointer tile 10.60; benchmarks/results/h200/nsa_selection_configs_s54.json).
AUTOTUNE_TMA = False
_INTERPRETER_CONFIG = (16, 16, 4)


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
        USE_TMA: tl.constexpr,
    ):
        """``acc += (sum_h p_h[:, cols]) @ W[cols, blocks]`` for the key sub-tile ``cols`` (``COLS`` keys)."""
        offs_d = tl.arange(0, HEAD_DIM)
        keys = tl.load(
            k_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
            mask=(cols < key_stop)[None, :],
            other=0.0,
        )
        summed = tl.zeros([ROWS, COLS], tl.float32)
        for head in range(0, group):
            if USE_TMA:  # rows past the chunk come back as zeros
                q = q_base.load([head, tl.program_id(0) * ROWS, 0]).reshape(ROWS, HEAD_DIM)
            else:
                q = tl.load(
                    q_base + head * stride_qh + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None],
                    other=0.0,
                )
            lse = tl.load(lse_base + head * stride_lh + rows * stride_lm, mask=row_ok, other=float("-inf"))
            # A row with lse = -inf sees no key: an infinite bound makes its terms exp2(-inf) = 0.
            lse_log2 = tl.where(lse > float("-inf"), lse * 1.4426950408889634, float("inf"))
            summed += _head_probabilities(q, lse_log2, keys, scale_log2, DOT_FP32)
        # Keys the row does not see (past its position or past the keys) may have summed to
        # anything, +inf included (their logits are not bounded by the row's lse): zeroed once here.
        visible = (
            row_ok[:, None]
            & (cols < key_stop)[None, :]
            & (cols[None, :] * compress_stride + compress_block - 1 <= positions[:, None])
        )
        summed = tl.where(visible, summed, 0.0)
        return _weigh_blocks(acc, summed, cols, blocks, PIECES_PER_KEY, PIECES_PER_BLOCK, DOT_FP32)

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
        USE_TMA: tl.constexpr,
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
        if USE_TMA:  # the group's query heads as one descriptor: box (1 head, BLOCK_T rows, HEAD_DIM)
            q_base = tl.make_tensor_descriptor(
                q_base, shape=[group, chunk, HEAD_DIM], strides=[stride_qh, stride_qm, 1],
                block_shape=[1, BLOCK_T, HEAD_DIM],
            )  # fmt: skip
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
        for start in range(key_start, key_stop, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            acc = _accumulate_keys(
                acc, q_base, lse_base, k_base, cols, key_stop, rows, row_ok, positions, blocks,
                stride_qh, stride_qm, stride_lh, stride_lm, stride_kn, group, scale_log2,
                compress_block, compress_stride, HEAD_DIM, PIECES_PER_KEY, PIECES_PER_BLOCK, DOT_FP32, BLOCK_T, BLOCK_N,
                USE_TMA,
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
    owned, width = blocks_per_program(config["BLOCK_N"], pieces_per_key, pieces_per_block)
    return config | dict(NS_EFF=owned, NS=width)


def _grid(meta: dict, *, chunk: int, programs: int, n_select: int) -> tuple[int, int, int]:
    return triton.cdiv(chunk, meta["BLOCK_T"]), programs, triton.cdiv(n_select, meta["NS_EFF"])


def _owned(args: dict) -> tuple[int, int]:
    return blocks_per_program(args["BLOCK_N"], args["PIECES_PER_KEY"], args["PIECES_PER_BLOCK"])


@functools.cache
def _autotuned_kernel(modes: tuple[str, ...]):
    """The kernel autotuned over the tiles of each load mode in ``modes``."""
    tiles = {"pointers": CONFIGS, "tma": TMA_CONFIGS}
    configs = [
        triton.Config(dict(BLOCK_T=t, BLOCK_N=n, USE_TMA=mode == "tma"), num_warps=w)
        for mode in modes
        for t, n, w in tiles[mode]
    ]
    key = ["group", "chunk_bucket", "n_select_bucket", "HEAD_DIM", "PIECES_PER_KEY", "PIECES_PER_BLOCK", "DOT_FP32"]
    blocks = dict(NS_EFF=lambda args: _owned(args)[0], NS=lambda args: _owned(args)[1])
    return triton.autotune(configs=configs, key=key)(triton.heuristics(blocks)(_compressed_scores))


def tma_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the kernel cannot read ``q``'s query tiles through tensor descriptors, or ``None``:
    16-bit inputs on compute capability 9+ (or the interpreter), 16-byte aligned rows and heads."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"descriptor loads take float16/bfloat16 queries, got {q.dtype}"
    capability = device_capability(q.device)
    if not interpreting() and (capability is None or capability[0] < 9):
        return "tensor descriptors need compute capability 9.0 or later"
    # The descriptor spans the group's heads, so the head stride enters it even for one head.
    if not launch.descriptor_compatible(q) or (q.stride(1) * q.element_size()) % 16:
        return "the query rows and heads must be 16-byte aligned with unit stride in head_dim"
    return None


def _load_modes(q: torch.Tensor, loads: str | None) -> tuple[str, ...]:
    """The load modes to run (``loads``) or, for ``None``, to autotune over: pointer loads, plus
    descriptor loads where they can run if :data:`AUTOTUNE_TMA` (pointer loads alone under the
    interpreter)."""
    if loads is None:
        tma = AUTOTUNE_TMA and not interpreting() and tma_unsupported_reason(q) is None
        return ("pointers", "tma") if tma else ("pointers",)
    if loads not in LOAD_MODES:
        raise ValueError(f"loads must be None or one of {LOAD_MODES}, got {loads!r}")
    if loads == "tma":
        reason = tma_unsupported_reason(q)
        if reason is not None:
            raise ValueError(f"loads='tma' cannot run this case: {reason}")
    return (loads,)


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
    loads: str | None = None,
) -> torch.Tensor:
    """:func:`.naive.compressed_block_scores` in the kernel; same arguments (validated by the
    caller, :func:`sparse_attn.ops.compressed_scores.compressed_block_scores`) and result.
    ``loads``: ``"pointers"`` or ``"tma"`` for the query tiles, or ``None`` (the autotuner's
    choice among the modes that can run)."""
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"the compressed-scores kernel cannot run this case: {reason}")
    modes = _load_modes(q, loads)
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
    if "tma" in modes:
        launch.ensure_scratch_allocator()
    if interpreting():
        block_t, block_n, warps = _INTERPRETER_CONFIG
        tile = _with_blocks(
            dict(BLOCK_T=block_t, BLOCK_N=block_n, USE_TMA=modes == ("tma",)),
            constants["PIECES_PER_KEY"],
            constants["PIECES_PER_BLOCK"],
        )
        grid = _grid(tile, chunk=chunk, programs=batch * kv_heads, n_select=n_select)
        _compressed_scores[grid](*args, **constants, **tile, num_warps=warps)
    else:
        grid = functools.partial(_grid, chunk=chunk, programs=batch * kv_heads, n_select=n_select)
        _autotuned_kernel(modes)[grid](*args, **constants)
    return out
