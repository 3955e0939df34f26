"""The scoring kernel of the estimators in Triton: XAttention's strided antidiagonal block scoring.

Reference: :func:`.naive.antidiagonal_block_probs_reference`. The same kernel serves the
sampled-row scoring of :mod:`sparse_attn.ops.sampled_rows` (cells of one row, every
``QUERY_STEP``-th query, reduced by the maximum), which calls :func:`cell_block_probs`; this
module is the kernel's only home.

* one program scores ``BLOCK_M`` query cells against key cells, ``BLOCK_N`` at a time; a
  cell pair's antidiagonal sum is ``stride`` ``(BLOCK_M x D) @ (D x BLOCK_N)`` products of
  row-strided loads (each optionally split over head-dim slices of ``BLOCK_D``), so the
  ``(cells, stride * D)`` cell vectors are never built. The main loop runs flat over
  (key tile, row offset, head-dim slice) steps with a key tile's epilogue on its last step,
  so loads stay pipelined across key tiles. The rows are read with pointer loads or, on Hopper,
  through TMA tensor descriptors over ``(cells, stride, head_dim)`` views (``loads=``; the
  autotuner times both: on the H200 at 128K TMA was no faster);
* per tile it writes, for each query cell and each KV block, the log-sum-exp of the cell's
  scores over that block to a scratch buffer, and keeps each row's running log-sum-exp
  (online softmax);
* after its last tile the program reads its own scratch rows back, turns them into
  probabilities ``exp(lse_row_block - lse_row)`` and averages the cells of each query block,
  writing the ``(query block, KV block)`` probabilities directly.

A launch scores the query cells of a range of query blocks (``q_blocks``: an estimator
streams its block scores chunk by chunk, :mod:`sparse_attn.ops.to_pattern`) and writes their
rows only. The per-(query cell, KV block) scratch is the only large intermediate: float32
``(B, heads, cells, n_kv)``, processed a few heads at a time (and, once one head's cells
alone would exceed it, a range of query cells at a time) so that it stays under
``SCRATCH_CHUNKS x CHUNK_ELEMENTS`` floats. Tile shapes are autotuned over
:data:`SCORING_CONFIGS`, or over the candidates a caller passes as ``configs=``
(``benchmarks/scoring_configs.py`` sweeps them one at a time). Under ``TRITON_INTERPRET=1`` (CPU tests) one small tile configuration runs,
with bf16 products taken in float32 (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ...backends import launch
from ...geometry import num_blocks
from ...utils import device_capability, dot_in_float32, interpreting, is_power_of_two, length_bucket
from .._chunking import CHUNK_ELEMENTS
from .._dispatch import device_unsupported_reason
from ..block_rows import query_block_range
from .naive import Fp8Keys, check_score_precision, fp8_keys, fp8_query_rows

__all__ = [
    "FP8_SCORING_CONFIGS",
    "LOAD_MODES",
    "SCORING_CONFIGS",
    "ScoringConfig",
    "antidiagonal_block_probs_triton",
    "cell_block_probs",
    "tma_unsupported_reason",
    "unsupported_reason",
]

_LOG2_E = 1.4426950408889634

# One autotune candidate: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages); BLOCK_D None is the
# whole head_dim per step.
ScoringConfig = tuple[int, int, int | None, int, int]

# Candidates for 16-bit inputs. Tiles that do not fit a GPU's shared memory or registers are
# skipped by the autotuner.
SCORING_CONFIGS: tuple[ScoringConfig, ...] = (
    # head_dim 128, stride 8 (XAttention): a 128 x 256 tile over half-head-dim steps led the
    # sweep at 128K on H100 (benchmarks/results/h100/scoring_configs*.log).
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 4), (128, 256, 32, 8, 6),
    (64, 256, 64, 4, 3), (64, 256, 64, 8, 4), (128, 256, None, 8, 2), (64, 256, None, 8, 2),
    (64, 128, None, 4, 3), (128, 128, None, 8, 3),
    # Small tiles for head_dim 256 with 128-key blocks per tile (sampled rows, stride 1).
    (64, 128, 64, 8, 3), (64, 128, None, 8, 2), (32, 128, None, 4, 2), (32, 64, None, 4, 1),
)  # fmt: skip
# The one candidate for float32 inputs.
_FLOAT32_CONFIGS: tuple[ScoringConfig, ...] = ((32, 32, None, 4, 2),)
# Candidates for fp8 codes (score_precision="fp8"): a row of 128 codes is 128 bytes, so whole-head
# steps move what a half-head bf16 step moves; the fp8 MMA takes k >= 32.
# (128 x 256 tiles spill a few registers on sm_90 as the 16-bit winners do; whole-head steps at
# 128 x 256 spill more, kept as candidates for the autotuner to judge.)
FP8_SCORING_CONFIGS: tuple[ScoringConfig, ...] = (
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, None, 8, 3), (128, 128, None, 8, 3),
    (128, 128, None, 8, 4), (64, 256, 64, 4, 4), (64, 256, None, 8, 3),
    # Added untested in the twelfth session, for the autotuner to judge beside the others.
    (128, 256, None, 8, 4), (256, 128, None, 8, 3),
)  # fmt: skip
# Float32 scratch of one launch, in chunked steps of CHUNK_ELEMENTS: four (1 GiB). One
# program's rows take BLOCK_M x n_kv floats (4 MiB at 1M tokens), so the operators' usual
# 256 MiB let a launch hold only 64 programs at 1M (half of an H200's SMs idle) and cut a
# 128K estimate into eight launches with a causal tail each; 1 GiB gives 256 programs at 1M
# and two launches at 128K.
SCRATCH_CHUNKS = 4
# Each score's exponential in the epilogue through the half-precision unit, two per instruction
# (16-bit and fp8 inputs on a GPU; float32 inputs and the interpreter take float32 exp2). Off:
# on the H200 at 128K (benchmarks/scoring_configs.py --exp2 f16x2 f32, fourteenth session) it
# was no faster than float32 exp2 for either precision (bf16 21.07 vs 21.04 ms, fp8 12.18 vs
# 11.85 ms at the default tile), and it is the less accurate of the two.
FAST_EXP2 = False
# Query cells per launch when one head's scratch rows would exceed the scratch: a multiple
# of every tile height (BLOCK_M <= 256).
_CELL_UNIT = 256


def unsupported_reason(
    q: torch.Tensor, *, stride: int, block_q: int, block_k: int, score_precision: str = "input"
) -> str | None:
    """Why the kernel cannot score ``q`` with these cells and blocks (and precision), or ``None``."""
    reason = device_unsupported_reason(q)
    if reason is not None:
        return reason
    if score_precision == "fp8" and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 9):
        return "fp8 scoring needs fp8 tensor cores (compute capability 8.9 or later)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32, not {q.dtype}"
    if q.shape[-1] not in (16, 32, 64, 128, 256):
        return f"takes head_dim 16, 32, 64, 128 or 256, not {q.shape[-1]}"
    if not is_power_of_two(stride):
        return f"needs a power-of-two stride, got {stride}"
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        cells = block // stride
        if block % stride or not is_power_of_two(cells) or cells > 128:
            return f"needs {name} / stride to be a power of two <= 128, got {block} / {stride}"
    return None


@triton.jit
def _antidiagonal_step(
    acc, q_base, k_base, first_cell, start_n, i, d_start, stride_qs, stride_ks, q_row_start, q_len, seq_k,
    STRIDE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Add one antidiagonal product of the tile's query cells from ``first_cell`` and key cells
    from ``start_n``: query cell row ``STRIDE - 1 - i`` against key cell row ``i``, head-dim
    columns from ``d_start`` (Q's first row is query row ``q_row_start``; rows from ``q_len``
    on are zeros).

    ``USE_TMA``: ``q_base`` and ``k_base`` are ``(cells, STRIDE, HEAD_DIM)`` tensor descriptors
    (whole cells only, cells past the end read as zeros), Q's counted from its first row; each
    operand is one box."""
    if USE_TMA:
        q_i = tl.reshape(q_base.load([first_cell - q_row_start // STRIDE, STRIDE - 1 - i, d_start]), (BLOCK_M, BLOCK_D))
        k_i = tl.reshape(k_base.load([start_n, i, d_start]), (BLOCK_N, BLOCK_D))
    else:
        offs_d = d_start + tl.arange(0, BLOCK_D)
        q_rows = (first_cell + tl.arange(0, BLOCK_M)) * STRIDE + (STRIDE - 1 - i)
        k_rows = (start_n + tl.arange(0, BLOCK_N)) * STRIDE + i
        q_i = tl.load(
            q_base + (q_rows - q_row_start)[:, None] * stride_qs + offs_d[None, :],
            mask=(q_rows < q_len)[:, None],
            other=0.0,
        )
        k_i = tl.load(k_base + k_rows[:, None] * stride_ks + offs_d[None, :], mask=(k_rows < seq_k)[:, None], other=0.0)
    if DOT_FP32:
        return tl.dot(q_i.to(tl.float32), tl.trans(k_i.to(tl.float32)), acc, input_precision=PRECISION)
    return tl.dot(q_i, tl.trans(k_i), acc, input_precision=PRECISION)


@triton.jit
def _exp2_f16x2(x):
    """``2^x`` for ``x <= 0`` through the half-precision special-function unit, two values per
    instruction (``ex2.approx.f16x2``): about 1e-3 relative error, in float32 out."""
    return tl.inline_asm_elementwise(
        "ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16, is_pure=True, pack=2
    ).to(tl.float32)


@triton.jit
def _tile_epilogue(
    acc, m_i, l_i, out_rows, row_in_range, last_query, first_last_query, start_n, offs_n, k_cells, n_kv, qk_scale,
    STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CELLS_PER_KV_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, FAST_EXP2: tl.constexpr,
):  # fmt: skip
    """Write one key tile's per-(query cell, KV block) log2-sum-exp; update the rows' running log-sum-exp.

    Only a tile that reaches past the keys or, causally, past its first query cell's last query
    masks its scores (``first_last_query``: that position; the others' are later)."""
    BLOCKS_PER_TILE: tl.constexpr = BLOCK_N // CELLS_PER_KV_BLOCK
    key_cells = start_n + offs_n
    scores = acc * qk_scale
    masked = start_n + BLOCK_N > k_cells
    if CAUSAL:
        masked = masked | ((start_n + BLOCK_N - 1) * STRIDE > first_last_query)
    if masked:
        visible = (key_cells < k_cells)[None, :]
        if CAUSAL:
            visible = visible & (key_cells[None, :] * STRIDE <= last_query[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    per_block = tl.reshape(scores, (BLOCK_M, BLOCKS_PER_TILE, CELLS_PER_KV_BLOCK))
    block_max = tl.max(per_block, axis=2)
    block_max_safe = tl.where(block_max == float("-inf"), 0.0, block_max)
    if FAST_EXP2:
        block_sum = tl.sum(_exp2_f16x2(per_block - block_max_safe[:, :, None]), axis=2)
    else:
        block_sum = tl.sum(tl.math.exp2(per_block - block_max_safe[:, :, None]), axis=2)
    block_lse = block_max_safe + tl.math.log2(block_sum)
    kv_blocks = start_n // CELLS_PER_KV_BLOCK + tl.arange(0, BLOCKS_PER_TILE)
    tl.store(
        out_rows[:, None] + kv_blocks[None, :], block_lse, mask=row_in_range[:, None] & (kv_blocks < n_kv)[None, :]
    )
    # The row's running sum is rebuilt from the per-block sums: one exp2 per block, not per key.
    m_new = tl.maximum(m_i, tl.max(block_max, 1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(block_lse - m_new[:, None]), 1)
    return m_new, l_i


@triton.jit
def _cell_block_probs(
    Q,
    K,
    RowBlockLse,
    BlockProbs,
    QScale,
    KScale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    head_start,
    chunk_heads,
    num_q_heads,
    group,
    q_row_start,
    q_len,
    seq_q,
    seq_k,
    q_cells,
    cell_start,
    cell_stop,
    chunk_cells,
    k_cells,
    q_block_start,
    q_block_stop,
    n_kv,
    qk_scale,
    seq_bucket,  # autotuning key only: ceil(log2(seq_k)), so each length range gets its own tuning
    HEAD_DIM: tl.constexpr,
    STRIDE: tl.constexpr,
    QUERY_STEP: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
    CELLS_PER_Q_BLOCK: tl.constexpr,
    CELLS_PER_KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALED: tl.constexpr,
    USE_TMA: tl.constexpr,
    FAST_EXP2: tl.constexpr,
):
    """Per (query block, KV block): the mean (or max) over the block's query cells of the cell's softmax mass.

    Query cell ``c`` is ``STRIDE`` rows of Q (``q_len`` rows in all) whose last query sits at
    position ``(c + 1) * STRIDE * QUERY_STEP - 1`` of the ``seq_q`` queries: ``QUERY_STEP`` > 1
    when Q holds every ``QUERY_STEP``-th query row only (ProxyAttn's sampled rows). Q may hold
    only rows ``q_row_start`` to ``q_len`` (an fp8 copy of the rows a launch scores). ``SCALED``:
    Q and K are codes whose products are multiplied by the heads' ``QScale`` ``(B, Hq)`` and
    ``KScale`` ``(B, Hkv)`` (folded into the softmax scale).
    """
    # Heaviest (last) query tiles first: causal rows grow with position.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // chunk_heads
    head = head_start + batch_head % chunk_heads
    kv_head = head // group
    BLOCKS_PER_TILE: tl.constexpr = BLOCK_N // CELLS_PER_KV_BLOCK
    # This launch covers query cells [cell_start, cell_stop) (at most chunk_cells, a whole number
    # of query blocks, starting on a query block); the scratch holds only those rows. The output
    # holds query blocks [q_block_start, q_block_stop).
    first_cell = cell_start + tile * BLOCK_M
    cells = first_cell + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    D_SPLIT: tl.constexpr = HEAD_DIM // BLOCK_D
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    if SCALED:
        qk_scale = (
            qk_scale
            * tl.load(QScale + batch * num_q_heads + head)
            * tl.load(KScale + batch * (num_q_heads // group) + kv_head)
        )
    offset = seq_k - seq_q
    # Last query position of each cell: a key cell is visible when its first key is not later.
    last_query = tl.minimum((cells + 1) * STRIDE * QUERY_STEP, seq_q) - 1 + offset
    first_last_query = tl.minimum((first_cell + 1) * STRIDE * QUERY_STEP, seq_q) - 1 + offset
    if CAUSAL:
        tile_last_query = tl.minimum((first_cell + BLOCK_M) * STRIDE * QUERY_STEP, seq_q) - 1 + offset
        key_cell_end = tl.minimum(tile_last_query // STRIDE + 1, k_cells)
    else:
        key_cell_end = k_cells

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    out_rows = RowBlockLse + (batch_head.to(tl.int64) * chunk_cells + (cells - cell_start)) * n_kv
    row_in_range = cells < cell_stop
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One loop over (key tile, query-row offset, head-dim slice) steps, with the tile's
    # epilogue on its last step: loads are pipelined across key-tile boundaries.
    if USE_TMA:
        # Whole cells of Q's rows (from q_row_start) and of the keys; a box is BLOCK_M (BLOCK_N)
        # cells at one row offset and BLOCK_D head-dim columns. From here on q_base and
        # k_base are descriptors.
        q_base = tl.make_tensor_descriptor(
            q_base, shape=[(q_len - q_row_start) // STRIDE, STRIDE, HEAD_DIM],
            strides=[STRIDE * stride_qs, stride_qs, 1], block_shape=[BLOCK_M, 1, BLOCK_D],
        )  # fmt: skip
        k_base = tl.make_tensor_descriptor(
            k_base, shape=[k_cells, STRIDE, HEAD_DIM], strides=[STRIDE * stride_ks, stride_ks, 1],
            block_shape=[BLOCK_N, 1, BLOCK_D],
        )  # fmt: skip
    STEPS: tl.constexpr = STRIDE * D_SPLIT
    for step in range(0, tl.cdiv(key_cell_end, BLOCK_N) * STEPS):
        start_n = (step // STEPS) * BLOCK_N
        acc = _antidiagonal_step(
            acc, q_base, k_base, first_cell, start_n, (step % STEPS) // D_SPLIT, (step % D_SPLIT) * BLOCK_D,
            stride_qs, stride_ks, q_row_start, q_len, seq_k, STRIDE, DOT_FP32, PRECISION, USE_TMA,
            BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        if step % STEPS == STEPS - 1:
            m_i, l_i = _tile_epilogue(
                acc, m_i, l_i, out_rows, row_in_range, last_query, first_last_query, start_n, offs_n, k_cells,
                n_kv, qk_scale, STRIDE, BLOCK_M, BLOCK_N, CELLS_PER_KV_BLOCK, CAUSAL, FAST_EXP2,
            )  # fmt: skip
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_lse = m_i + tl.math.log2(l_i)

    # Epilogue: read this program's scratch rows back (written above by other threads of
    # the program, hence the barrier) and average each query block's cell probabilities.
    tl.debug_barrier()
    Q_BLOCKS: tl.constexpr = BLOCK_M // CELLS_PER_Q_BLOCK
    BLOCK_J: tl.constexpr = 64
    q_blocks = first_cell // CELLS_PER_Q_BLOCK + tl.arange(0, Q_BLOCKS)
    cells_in_block = tl.maximum(tl.minimum(q_cells - q_blocks * CELLS_PER_Q_BLOCK, CELLS_PER_Q_BLOCK), 1).to(tl.float32)
    n_written = tl.minimum(tl.cdiv(key_cell_end, BLOCK_N) * BLOCKS_PER_TILE, n_kv)
    out_q_blocks = q_block_stop - q_block_start
    probs_rows = (
        BlockProbs
        + (batch * num_q_heads + head).to(tl.int64) * out_q_blocks * n_kv
        + (q_blocks - q_block_start).to(tl.int64) * n_kv
    )
    for start_j in range(0, n_written, BLOCK_J):
        kv_blocks = start_j + tl.arange(0, BLOCK_J)
        written = kv_blocks < n_written
        lse = tl.load(out_rows[:, None] + kv_blocks[None, :], mask=row_in_range[:, None] & written[None, :], other=0.0)
        p = tl.where(row_in_range[:, None] & written[None, :], tl.math.exp2(lse - row_lse[:, None]), 0.0)
        per_q_block = tl.reshape(p, (Q_BLOCKS, CELLS_PER_Q_BLOCK, BLOCK_J))
        if REDUCE_MAX:
            reduced = tl.max(per_q_block, axis=1)
        else:
            reduced = tl.sum(per_q_block, axis=1) / cells_in_block[:, None]
        tl.store(
            probs_rows[:, None] + kv_blocks[None, :],
            reduced,
            mask=(q_blocks < q_block_stop)[:, None] & written[None, :],
        )


def _config_kwargs(
    m: int, n: int, d: int | None, head_dim: int, cells_per_q_block: int, cells_per_kv_block: int
) -> dict:
    return {
        "BLOCK_M": max(m, cells_per_q_block),
        "BLOCK_N": max(n, cells_per_kv_block),
        "BLOCK_D": head_dim if d is None else min(d, head_dim),
    }


@functools.cache
def _autotuned_kernel(
    head_dim: int,
    cells_per_q_block: int,
    cells_per_kv_block: int,
    candidates: tuple[ScoringConfig, ...],
    load_modes: tuple[str, ...],
):
    configs = [
        triton.Config(
            {**_config_kwargs(m, n, d, head_dim, cells_per_q_block, cells_per_kv_block), "USE_TMA": mode == "tma"},
            num_warps=w,
            num_stages=s,
        )
        for m, n, d, w, s in candidates
        for mode in load_modes
    ]
    # Several candidates can collapse to one tile shape for large blocks: keep each once.
    unique = list({(str(c.kwargs), c.num_warps, c.num_stages): c for c in configs}.values())
    key = [
        "seq_bucket",
        "HEAD_DIM",
        "STRIDE",
        "QUERY_STEP",
        "REDUCE_MAX",
        "CELLS_PER_Q_BLOCK",
        "CELLS_PER_KV_BLOCK",
        "CAUSAL",
        "PRECISION",
        "SCALED",
        "FAST_EXP2",
    ]
    return triton.autotune(configs=unique, key=key)(_cell_block_probs)


def _grid(meta: dict, *, cells: int, programs: int) -> tuple[int, int]:
    return num_blocks(cells, meta["BLOCK_M"]), programs


LOAD_MODES = ("pointers", "tma")


def tma_unsupported_reason(q: torch.Tensor, k: torch.Tensor, *, stride: int) -> str | None:
    """Why the scoring cannot read these (already quantised, if fp8) ``q`` rows and ``k``
    through tensor descriptors, or ``None``: 16-bit or fp8 codes on compute capability 9+
    (or the interpreter), whole cells of ``stride`` rows, 16-byte aligned rows and heads."""
    if q.dtype == torch.float32:
        return "float32 inputs are read with pointer loads"
    capability = device_capability(q.device)
    if not interpreting() and (capability is None or capability[0] < 9):
        return "tensor descriptors need compute capability 9.0 or later"
    if q.shape[2] % stride or k.shape[2] % stride:
        return f"the query rows ({q.shape[2]}) and keys ({k.shape[2]}) must be whole cells of {stride}"
    if not (launch.descriptor_compatible(q) and launch.descriptor_compatible(k)):
        return "rows and heads must be 16-byte aligned with unit stride in head_dim"
    return None


def _load_modes(q: torch.Tensor, k: torch.Tensor, stride: int, loads: str | None) -> tuple[str, ...]:
    """The load modes to run (or autotune over): ``loads`` None is pointer loads plus TMA where
    it can run (pointer loads alone under the interpreter, which then runs one small tile)."""
    if loads is None:
        tma = not interpreting() and tma_unsupported_reason(q, k, stride=stride) is None
        return ("pointers", "tma") if tma else ("pointers",)
    if loads not in LOAD_MODES:
        raise ValueError(f"loads must be None or one of {LOAD_MODES}, got {loads!r}")
    if loads == "tma":
        reason = tma_unsupported_reason(q, k, stride=stride)
        if reason is not None:
            raise ValueError(f"loads='tma' cannot read these inputs: {reason}")
    return (loads,)


def cell_block_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    query_step: int,
    reduce_max: bool,
    seq_q: int,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
    configs: Sequence[ScoringConfig] | None = None,
    keys_fp8: Fp8Keys | None = None,
    loads: str | None = None,
) -> torch.Tensor:
    """Launch the kernel over head chunks; float32 ``(B, Hq, len(q_blocks), n_kv)``, blocks past the causal extent 0.

    q ``(B, Hq, q_len, D)`` holds every ``query_step``-th of ``seq_q`` queries (``query_step`` 1:
    all of them), cut into cells of ``stride`` rows; k ``(B, Hkv, Sk, D)``. Per (query block,
    KV block) of the query blocks ``q_blocks`` (default: all), the mean (or with ``reduce_max``
    the maximum) over the block's query cells of the cell's softmax mass on the KV block: only
    those blocks' cells are scored. ``configs``: the autotune candidates (default
    :data:`SCORING_CONFIGS` for 16-bit inputs, :data:`FP8_SCORING_CONFIGS` for fp8; float32
    inputs and the interpreter use their own single tile). ``keys_fp8`` (``query_step`` 1
    only): score in fp8, with these keys (:func:`.naive.fp8_keys` of ``k``) and the scored
    rows of ``q`` quantised per head here (:func:`.naive.fp8_query_rows`), the products' scales
    folded into the softmax scale: the reference's ``score_precision="fp8"``. ``loads``: how
    the kernel reads Q and K, ``"pointers"`` (row-strided loads) or ``"tma"`` (tensor
    descriptors over whole cells, Hopper or newer; :func:`tma_unsupported_reason`); ``None``
    autotunes over both where TMA can run.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    q_cells, k_cells = num_blocks(q_len, stride), num_blocks(seq_k, stride)
    n_kv = num_blocks(seq_k, block_k)
    rows = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    cells_per_q_block = block_q // (stride * query_step)
    cells_per_kv_block = block_k // stride
    first_cell, end_cell = rows.start * cells_per_q_block, min(q_cells, rows.stop * cells_per_q_block)
    q_row_start, q_stop = 0, q_len
    scales = (q, q)  # unused pointers unless scaled
    if keys_fp8 is not None:
        if query_step != 1:
            raise ValueError("fp8 scoring takes every query row (query_step 1)")
        # Only the rows this call scores are quantised (one scale per head over them), as the reference does.
        q_row_start, q_stop = first_cell * stride, min(q_len, end_cell * stride)
        q, q_scale = fp8_query_rows(q[:, :, q_row_start:q_stop])
        k, scales = keys_fp8.codes, (q_scale.contiguous(), keys_fp8.scale.contiguous())
    load_modes = _load_modes(q, k, stride, loads)
    if "tma" in load_modes and not interpreting():  # descriptors made on the device need global scratch
        launch.ensure_scratch_allocator()
    # The scratch holds SCRATCH_CHUNKS x CHUNK_ELEMENTS floats at most: a few heads at a time,
    # and when one head's rows alone exceed that (very long sequences), a range of query cells
    # at a time, in whole multiples of _CELL_UNIT (every tile height and query block divides it).
    cells_per_chunk = end_cell - first_cell
    scratch_elements = SCRATCH_CHUNKS * CHUNK_ELEMENTS
    if batch * cells_per_chunk * n_kv > scratch_elements:
        cells_per_chunk = max(_CELL_UNIT, scratch_elements // (batch * n_kv) // _CELL_UNIT * _CELL_UNIT)
    chunk_heads = max(1, min(q_heads, scratch_elements // (batch * cells_per_chunk * n_kv)))
    is_float32 = q.dtype == torch.float32
    scaled = keys_fp8 is not None
    # fp8 codes: the tensor cores' fp8 products on a GPU; under the interpreter the codes are
    # taken in float32, which represents every e4m3 value and product exactly.
    use_float32_dot = dot_in_float32(q.dtype) or (scaled and interpreting())
    constants = dict(
        HEAD_DIM=dim,
        STRIDE=stride,
        QUERY_STEP=query_step,
        REDUCE_MAX=reduce_max,
        CELLS_PER_Q_BLOCK=cells_per_q_block,
        CELLS_PER_KV_BLOCK=cells_per_kv_block,
        CAUSAL=bool(causal),
        DOT_FP32=use_float32_dot,
        PRECISION="ieee" if use_float32_dot else "tf32",
        SCALED=scaled,
        FAST_EXP2=FAST_EXP2 and not interpreting() and not is_float32,
    )
    default_configs = FP8_SCORING_CONFIGS if scaled else SCORING_CONFIGS
    candidates = _FLOAT32_CONFIGS if is_float32 else tuple(default_configs if configs is None else configs)
    # Blocks past a query block's causal extent are never written: they stay 0.
    probs = torch.zeros((batch, q_heads, len(rows), n_kv), dtype=torch.float32, device=q.device)
    scratch = torch.empty((batch, chunk_heads, cells_per_chunk, n_kv), dtype=torch.float32, device=q.device)
    for head_start in range(0, q_heads, chunk_heads):
        heads = min(chunk_heads, q_heads - head_start)
        for cell_start in range(first_cell, end_cell, cells_per_chunk):
            cells = min(cells_per_chunk, end_cell - cell_start)
            args = (
                *(q, k, scratch, probs, *scales),
                *q.stride()[:3],
                *k.stride()[:3],
                *(head_start, heads, q_heads, q_heads // kv_heads),
                *(q_row_start, q_stop, seq_q, seq_k, q_cells, cell_start, cell_start + cells, cells_per_chunk, k_cells),
                *(rows.start, rows.stop, n_kv, scale / stride * _LOG2_E, length_bucket(seq_k)),
            )
            if interpreting():
                # One small tile; head_dim split in two steps (when it can be) to cover that path too.
                tile = _config_kwargs(16, 16, max(16, dim // 2), dim, cells_per_q_block, cells_per_kv_block)
                use_tma = load_modes == ("tma",)
                _cell_block_probs[(num_blocks(cells, tile["BLOCK_M"]), batch * heads)](
                    *args, **tile, **constants, USE_TMA=use_tma
                )
            else:
                kernel = _autotuned_kernel(dim, cells_per_q_block, cells_per_kv_block, candidates, load_modes)
                kernel[functools.partial(_grid, cells=cells, programs=batch * heads)](*args, **constants)
    return probs


def antidiagonal_block_probs_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
    configs: Sequence[ScoringConfig] | None = None,
    score_precision: str = "input",
    keys_fp8: Fp8Keys | None = None,
    loads: str | None = None,
) -> torch.Tensor:
    """Same result as :func:`.naive.antidiagonal_block_probs_reference`, with the kernel.

    ``configs``: autotune candidates to use instead of :data:`SCORING_CONFIGS` (16-bit inputs
    on a GPU only), e.g. one at a time to time each. ``loads``: ``"pointers"`` or ``"tma"``
    to force one way of reading Q and K (default: autotuned over both where TMA can run).
    """
    check_score_precision(score_precision, keys_fp8, k)
    reason = unsupported_reason(q, stride=stride, block_q=block_q, block_k=block_k, score_precision=score_precision)
    if reason is not None:
        raise ValueError(f"the Triton antidiagonal kernel cannot run this case: {reason}")
    if score_precision == "fp8" and keys_fp8 is None:
        keys_fp8 = fp8_keys(k)
    return cell_block_probs(
        q,
        k,
        stride=stride,
        query_step=1,
        reduce_max=False,
        seq_q=q.shape[2],
        block_q=block_q,
        block_k=block_k,
        scale=scale,
        causal=causal,
        q_blocks=q_blocks,
        configs=configs,
        keys_fp8=keys_fp8,
        loads=loads,
    )
