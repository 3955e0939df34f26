"""The BLASST forward kernel: block-sparse FlashAttention that skips candidate blocks far below the running maximum.

Runs a :class:`~sparse_attn.skip_pattern.SkipThresholdPattern` (candidate lists plus ``λ``;
the rule, exactly: :mod:`.blasst_reference`). One program computes one query block of one
query head (the kernel tile is the pattern block: ``BLOCK_M = block_q``, ``BLOCK_N = block_k``,
so each skip decision is the pattern's (query block, KV block) decision and does not depend on
tuning). It walks its candidates in the visiting order of
:func:`sparse_attn.skip_pattern.visiting_order`: the partial entries (causal diagonal,
sequence tail; with the causal / bounds mask) first, then the full entries ascending (no
mask). For each block it computes the scores ``q·kᵀ`` and their row maxima; in log2 units
(``qk_scale = scale * log2 e``) a row allows skipping when its block maximum is below
``m + log2 λ`` or is ``-inf``, or the row lies past the last query; when every row allows
it, the block is skipped: no exp, no row sum, no P·V. Otherwise the online softmax takes the
block as in :mod:`.triton`. V is loaded beside K either way, as in the paper's prefill kernel
(prefill is compute-bound; unconditional loads keep the memory pipeline regular): only the
decode kernel of the paper skips V loads. The running maximum of a row that has seen no key stays
``-inf`` (exponents are then taken against 0), so the skip test reads the true running
maximum. Each program writes how many blocks it computed (``computed``), so the density
actually computed can be reported.

Reuse: the launch ABI (tensors, strides, head mapping, lengths, ``qk_scale``) is
:func:`.launch.launch_arguments`'s, shared with the Triton and Gluon kernels, the plan (full
counts, work order) is :func:`sparse_attn.plan.plan_for`'s, and the input checks are
:func:`.triton.input_unsupported_reason`'s. The online-softmax step of :mod:`.triton`
(``_attend_blocks``) walks a run of blocks with no per-block hook, so the skip test cannot be
put inside it; the loop here is its block-at-a-time counterpart.

Forward-only: :func:`gradient_unsupported_reason` names why, and
:func:`sparse_attn.skip_pattern.resolve_skip_backend` then runs the reference rule, which
autograd differentiates. Block sizes 16 to 128 (powers of two); GPU autotuning covers warps
and pipeline stages only (the tile is fixed by the pattern). Under ``TRITON_INTERPRET=1`` (CPU
tests) one configuration runs, with bf16 products taken in float32 as in :mod:`.triton`.
"""

from __future__ import annotations

import functools
import math

import torch

from ..geometry import num_blocks
from ..plan import plan_for
from ..skip_pattern import SkipThresholdPattern
from ..utils import interpreting, length_bucket
from . import launch
from .triton import block_tile_unsupported_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

name = "triton_blasst"

_BLOCKS = (16, 32, 64, 128)
# Autotuned (num_warps, num_stages); the tile is the pattern's block.
_LAUNCH_CONFIGS = ((4, 1), (4, 2), (8, 1), (8, 2), (8, 3))


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, return_lse: bool) -> str | None:
    """Why the skipping kernel cannot run this case, or ``None`` when it can."""
    return block_tile_unsupported_reason(q, pattern, SkipThresholdPattern, "the skipping kernel", _BLOCKS)


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this kernel cannot differentiate the case: it is forward-only (no BLASST backward)."""
    return "inputs require grad and the BLASST skipping kernel is forward-only"


if triton is not None:
    from .tile_steps import block_scores, online_update, store_rows

    @triton.jit
    def _visit_blocks(
        acc,
        m_i,
        l_i,
        computed,
        q,
        k_base,
        v_base,
        index_base,
        first_slot,
        last_slot,
        stride_ks,
        stride_vs,
        query_pos,
        row_in_range,
        seq_k,
        qk_scale,
        log2_threshold,
        offs_n,
        offs_d,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,
        SKIP: tl.constexpr,
    ):
        """The skip test and, for kept blocks, the online-softmax update over slots ``[first_slot, last_slot)``."""
        for slot in range(first_slot, last_slot):
            key_pos = tl.load(index_base + slot) * BLOCK_N + offs_n
            scores, v = block_scores(
                q, k_base, v_base, key_pos, stride_ks, stride_vs, query_pos, seq_k, offs_d,
                MASKED, CAUSAL, DOT_FP32, PRECISION, EVEN_K,
            )  # fmt: skip
            scores = scores * qk_scale  # scaled log2 units, as m is kept
            if SKIP:
                block_max = tl.max(scores, 1)
                allows = (block_max < m_i + log2_threshold) | (block_max == float("-inf"))
                keep = tl.sum((row_in_range & (allows == 0)).to(tl.int32), 0) > 0
            else:
                keep = tl.full([], 1, tl.int1)
            if keep:
                acc, m_i, l_i = online_update(acc, m_i, l_i, scores, v, DOT_FP32, PRECISION)
                computed += 1
        return acc, m_i, l_i, computed

    @triton.jit
    def _blasst_forward(
        Q,
        K,
        V,
        Out,
        Lse,
        KvCounts,
        KvFullCounts,
        KvIndices,
        WorkOrder,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_ob,
        stride_oh,
        stride_os,
        stride_cb,
        stride_ch,
        stride_ib,
        stride_ih,
        stride_iq,
        num_q_heads,
        group,
        pattern_head_divisor,
        seq_q,
        seq_k,
        qk_scale,
        Computed,
        log2_threshold,
        seq_bucket,  # autotuning keys only: ceil(log2(seq_k)) and ceil(log2(mean candidates
        work_bucket,  # per query block)), so long or dense cases do not reuse a short/sparse tuning
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        WRITE_LSE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_Q: tl.constexpr,
        SKIP: tl.constexpr,
    ):
        batch_head = tl.program_id(0)
        # Query blocks in the plan's work order (heaviest first); one program per query block.
        q_block = tl.load(WorkOrder + tl.program_id(1))
        batch = batch_head // num_q_heads
        head = batch_head % num_q_heads
        kv_head = head // group
        rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        row_in_range = rows < seq_q
        q_pointers = q_base + rows[:, None] * stride_qs + offs_d[None, :]
        if EVEN_Q:
            q = tl.load(q_pointers)
        else:
            q = tl.load(q_pointers, mask=row_in_range[:, None], other=0.0)

        pattern_head = head // pattern_head_divisor
        count_offset = batch * stride_cb + pattern_head * stride_ch + q_block
        count = tl.load(KvCounts + count_offset)
        full_count = tl.load(KvFullCounts + count_offset)
        index_base = KvIndices + batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + q_block * stride_iq
        query_pos = rows + (seq_k - seq_q)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        computed = tl.zeros([], dtype=tl.int32)
        # The visiting order: partial entries (diagonal, tail) first, then the full ones ascending.
        acc, m_i, l_i, computed = _visit_blocks(
            acc, m_i, l_i, computed, q, k_base, v_base, index_base, full_count, count, stride_ks, stride_vs,
            query_pos, row_in_range, seq_k, qk_scale, log2_threshold, offs_n, offs_d,
            BLOCK_N, True, CAUSAL, DOT_FP32, PRECISION, EVEN_K, SKIP,
        )  # fmt: skip
        acc, m_i, l_i, computed = _visit_blocks(
            acc, m_i, l_i, computed, q, k_base, v_base, index_base, 0, full_count, stride_ks, stride_vs,
            query_pos, row_in_range, seq_k, qk_scale, log2_threshold, offs_n, offs_d,
            BLOCK_N, False, CAUSAL, DOT_FP32, PRECISION, EVEN_K, SKIP,
        )  # fmt: skip

        store_rows(
            Out, Lse, acc, m_i, l_i, batch, head, batch_head, rows, row_in_range, offs_d,
            stride_ob, stride_oh, stride_os, seq_q, EVEN_Q, WRITE_LSE, False,
        )  # fmt: skip
        tl.store(Computed + batch_head.to(tl.int64) * tl.num_programs(1) + q_block, computed)

    @functools.cache
    def _autotuned_kernel():
        configs = [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in _LAUNCH_CONFIGS]
        return triton.autotune(
            configs=configs,
            key=["seq_bucket", "work_bucket", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL", "PRECISION", "SKIP"],
        )(_blasst_forward)


def forward(q, k, v, pattern: SkipThresholdPattern, *, causal: bool, scale: float, return_lse: bool = False):
    """``(out, lse, computed)``: attention over ``pattern``'s candidates with the skip rule.

    Shapes as in :func:`sparse_attn.block_sparse_attention`; ``lse`` float32 ``(B, Hq, Sq)``
    (``None`` unless ``return_lse``); ``computed`` int32 ``(B, Hq, n_q_blocks)``, the blocks each
    query block computed (its candidates minus the skipped ones)."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    plan = plan_for(pattern, causal=causal)
    batch, q_heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    n_q_blocks = num_blocks(seq_q, pattern.block_q)
    out, lse, args = launch.launch_arguments(q, k, v, plan, scale=scale, return_lse=return_lse)
    # Every program writes its count; -1 marks one that did not.
    computed = torch.full((batch, q_heads, n_q_blocks), -1, dtype=torch.int32, device=q.device)
    threshold = pattern.skip_threshold
    # log2 λ, compared with scores in scaled log2 units; unused when λ = 0 (SKIP off).
    log2_threshold = math.log2(threshold) if threshold > 0 else 0.0
    args += (computed, log2_threshold, length_bucket(seq_k), plan.work_bucket)
    constants = dict(
        **launch.mode_constants(q, k, pattern, causal=causal, return_lse=return_lse),
        BLOCK_M=pattern.block_q,
        BLOCK_N=pattern.block_k,
        SKIP=threshold > 0,
    )
    grid = (batch * q_heads, n_q_blocks)
    if interpreting():
        _blasst_forward[grid](*args, **constants)
    else:
        _autotuned_kernel()[grid](*args, **constants)
    return out, (lse if return_lse else None), computed
