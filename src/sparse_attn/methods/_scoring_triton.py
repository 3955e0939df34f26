"""Triton scoring kernels for the estimators (each with a PyTorch reference in :mod:`._common`).

``antidiagonal_block_probs_triton`` computes XAttention's block importance (reference:
:func:`._common.antidiagonal_block_probs_reference`) in one pass over the strided scores:

* one program scores ``BLOCK_M`` query cells against key cells, ``BLOCK_N`` at a time; a
  cell pair's antidiagonal sum is ``stride`` ``(BLOCK_M x D) @ (D x BLOCK_N)`` products of
  row-strided loads, so the ``(cells, stride * D)`` cell vectors are never built;
* per tile it writes, for each query cell and each KV block, the log-sum-exp of the cell's
  scores over that block, and keeps each row's running log-sum-exp (online softmax);
* a final PyTorch step turns them into probabilities ``exp(lse_row_block - lse_row)`` and
  averages the rows of each query block.

The per-(query cell, KV block) log-sum-exps are the only large intermediate: float32
``(B, heads, Sq / stride, n_kv)``, processed a few heads at a time so that it stays under
``CHUNK_ELEMENTS`` floats (256 MiB). Under ``TRITON_INTERPRET=1`` (CPU tests) one small tile
configuration runs, with bf16 products taken in float32 (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import functools

import torch

from ..backends.triton_kernel import interpreting
from ..pattern import num_blocks
from ._common import CHUNK_ELEMENTS, cells_to_block_probs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

_LOG2_E = 1.4426950408889634


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def antidiagonal_triton_unsupported_reason(q: torch.Tensor, *, stride: int, block_k: int) -> str | None:
    """Why the Triton antidiagonal kernel cannot run this case, or ``None``."""
    if triton is None:
        return "triton is not installed"
    if q.device.type != "cuda" and not interpreting():
        return "needs a CUDA device (or TRITON_INTERPRET=1)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32, not {q.dtype}"
    if q.shape[-1] not in (16, 32, 64, 128, 256):
        return f"takes head_dim 16, 32, 64, 128 or 256, not {q.shape[-1]}"
    if not _is_power_of_two(stride):
        return f"needs a power-of-two stride, got {stride}"
    cells_per_kv_block = block_k // stride
    if not _is_power_of_two(cells_per_kv_block) or cells_per_kv_block > 128:
        return f"needs block_k / stride to be a power of two <= 128, got {block_k} / {stride}"
    return None


def triton_scoring_available(q: torch.Tensor, *, stride: int, block_k: int) -> bool:
    """Whether estimators should take the Triton path: on CUDA, when the kernel supports the case."""
    return q.device.type == "cuda" and antidiagonal_triton_unsupported_reason(q, stride=stride, block_k=block_k) is None


if triton is not None:

    @triton.jit
    def _antidiagonal_row_block_lse(
        Q,
        K,
        RowBlockLse,
        RowLse,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        head_start,
        chunk_heads,
        group,
        seq_q,
        seq_k,
        q_cells,
        k_cells,
        n_kv,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        STRIDE: tl.constexpr,
        CELLS_PER_KV_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Per query cell: log2-sum-exp2 of its scores per KV block, and over all visible keys."""
        # Heaviest (last) query tiles first: causal rows grow with position.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        batch_head = tl.program_id(1)
        batch = batch_head // chunk_heads
        head = head_start + batch_head % chunk_heads
        kv_head = head // group
        BLOCKS_PER_TILE: tl.constexpr = BLOCK_N // CELLS_PER_KV_BLOCK

        cells = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        offset = seq_k - seq_q
        # Last query position of each cell: a key cell is visible when its first key is not later.
        last_query = tl.minimum((cells + 1) * STRIDE, seq_q) - 1 + offset
        if CAUSAL:
            tile_last_query = tl.minimum((tile * BLOCK_M + BLOCK_M) * STRIDE, seq_q) - 1 + offset
            key_cell_end = tl.minimum(tile_last_query // STRIDE + 1, k_cells)
        else:
            key_cell_end = k_cells

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        out_rows = RowBlockLse + batch_head.to(tl.int64) * q_cells * n_kv + cells.to(tl.int64) * n_kv
        row_in_range = cells < q_cells
        for start_n in range(0, key_cell_end, BLOCK_N):
            key_cells = start_n + offs_n
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for i in range(STRIDE):
                # Query cell rows last-to-first against key cell rows first-to-last: the antidiagonal.
                q_rows = cells * STRIDE + (STRIDE - 1 - i)
                k_rows = key_cells * STRIDE + i
                q_i = tl.load(
                    q_base + q_rows[:, None] * stride_qs + offs_d[None, :], mask=(q_rows < seq_q)[:, None], other=0.0
                )
                k_i = tl.load(
                    k_base + k_rows[:, None] * stride_ks + offs_d[None, :], mask=(k_rows < seq_k)[:, None], other=0.0
                )
                if DOT_FP32:
                    acc = tl.dot(q_i.to(tl.float32), tl.trans(k_i.to(tl.float32)), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(q_i, tl.trans(k_i), acc, input_precision=PRECISION)
            scores = acc * qk_scale
            visible = (key_cells < k_cells)[None, :]
            if CAUSAL:
                visible = visible & (key_cells[None, :] * STRIDE <= last_query[:, None])
            scores = tl.where(visible, scores, float("-inf"))

            per_block = tl.reshape(scores, (BLOCK_M, BLOCKS_PER_TILE, CELLS_PER_KV_BLOCK))
            block_max = tl.max(per_block, axis=2)
            block_max_safe = tl.where(block_max == float("-inf"), 0.0, block_max)
            block_sum = tl.sum(tl.math.exp2(per_block - block_max_safe[:, :, None]), axis=2)
            block_lse = block_max_safe + tl.math.log2(block_sum)
            kv_blocks = start_n // CELLS_PER_KV_BLOCK + tl.arange(0, BLOCKS_PER_TILE)
            tl.store(
                out_rows[:, None] + kv_blocks[None, :],
                block_lse,
                mask=row_in_range[:, None] & (kv_blocks < n_kv)[None, :],
            )

            # The row's running sum is rebuilt from the per-block sums: one exp2 per block, not per key.
            m_new = tl.maximum(m_i, tl.max(block_max, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(block_lse - m_new[:, None]), 1)
            m_i = m_new
        row_lse = m_i + tl.math.log2(l_i)
        tl.store(RowLse + batch_head.to(tl.int64) * q_cells + cells, row_lse, mask=row_in_range)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for 16-bit inputs on Hopper.
_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 2)]


@functools.lru_cache(maxsize=None)
def _autotuned_kernel(cells_per_kv_block: int, is_float32: bool):
    candidates = [(32, 32, 4, 2)] if is_float32 else _CONFIGS
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": max(n, cells_per_kv_block)}, num_warps=w, num_stages=s)
        for m, n, w, s in candidates
    ]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "STRIDE", "CELLS_PER_KV_BLOCK", "CAUSAL", "PRECISION"])(
        _antidiagonal_row_block_lse
    )


def antidiagonal_block_probs_triton(
    q: torch.Tensor, k: torch.Tensor, *, stride: int, block_q: int, block_k: int, scale: float, causal: bool
) -> torch.Tensor:
    """Same result as :func:`._common.antidiagonal_block_probs_reference`, with the Triton kernel."""
    reason = antidiagonal_triton_unsupported_reason(q, stride=stride, block_k=block_k)
    if reason is not None:
        raise ValueError(f"the Triton antidiagonal kernel cannot run this case: {reason}")
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    q_cells, k_cells = num_blocks(seq_q, stride), num_blocks(seq_k, stride)
    n_kv = num_blocks(seq_k, block_k)
    cells_per_kv_block = block_k // stride
    chunk_heads = max(1, min(q_heads, CHUNK_ELEMENTS // (batch * q_cells * n_kv)))
    is_float32 = q.dtype == torch.float32
    dot_in_float32 = is_float32 or (interpreting() and q.dtype == torch.bfloat16)
    constants = dict(
        HEAD_DIM=dim,
        STRIDE=stride,
        CELLS_PER_KV_BLOCK=cells_per_kv_block,
        CAUSAL=bool(causal),
        DOT_FP32=dot_in_float32,
        PRECISION="ieee" if dot_in_float32 else "tf32",
    )
    pieces = []
    for head_start in range(0, q_heads, chunk_heads):
        heads = min(chunk_heads, q_heads - head_start)
        # Blocks past a row's causal extent are never written: they stay at -inf (probability 0).
        row_block_lse = torch.full((batch, heads, q_cells, n_kv), float("-inf"), device=q.device)
        row_lse = torch.empty((batch, heads, q_cells), device=q.device)
        args = (
            q, k, row_block_lse, row_lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            head_start, heads, q_heads // kv_heads,
            seq_q, seq_k, q_cells, k_cells, n_kv, scale / stride * _LOG2_E,
        )  # fmt: skip
        if interpreting():
            block_m, block_n = 16, max(16, cells_per_kv_block)
            _antidiagonal_row_block_lse[(num_blocks(q_cells, block_m), batch * heads)](
                *args, BLOCK_M=block_m, BLOCK_N=block_n, **constants
            )
        else:
            kernel = _autotuned_kernel(cells_per_kv_block, is_float32)
            kernel[lambda meta: (num_blocks(q_cells, meta["BLOCK_M"]), batch * heads)](*args, **constants)
        # In place: the log2 scores become probabilities exp2(lse_row_block - lse_row).
        cell_probs = row_block_lse.sub_(row_lse[..., None]).exp2_()
        pieces.append(cells_to_block_probs(cell_probs, block_q // stride))
        del row_block_lse, row_lse, cell_probs
    return torch.cat(pieces, dim=1)
