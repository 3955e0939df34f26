"""The compensated forward kernel: exact, pooled (PSA) and linear (SLA) blocks of a query block in one program.

Runs a :class:`~sparse_attn.compensated_pattern.CompensatedPattern` (the rule, exactly:
:mod:`.compensated_reference`). One program computes one query block of one query head (the
tile is the pattern block: ``BLOCK_M = block_q``, ``BLOCK_N = block_k``), in the plan's work order:

1. *Exact blocks* with the online softmax of FlashAttention-2 (log2 units,
   ``qk_scale = scale * log2 e``): the plan's full entries without a mask, then the partial ones
   (causal diagonal, sequence tail) with the causal / bounds mask, as :mod:`.triton_blasst` walks them.
2. *Pooled blocks*, in the same online softmax: the pooled K/V of every level the pattern uses
   are computed once per call (means of aligned groups of ``2**l`` positions, in the input dtype,
   all levels in one buffer); the plan sorts each query block's pooled entries by level, so the
   kernel runs one loop per level with that level's tile: ``block_k >> l`` pooled keys, padded to
   16 (the smallest ``tl.dot`` operand) with masked columns. A pooled key's score gets
   ``log2(n)`` added, ``n`` the number of positions it averages (``2**l``, fewer for the last
   group of the sequence), computed from its position.
3. The softmax output is stored (and the log-sum-exp with ``return_lse``); then, for patterns
   with linear entries and a projection, the *linear branch*: ``phi(q)`` is taken on the
   program's query tile (softmax over the head dimension, ``elu + 1`` or ``relu``), and the
   states ``phi(K_j)^T V_j`` (``D x D``) and ``phi(K_j)^T 1`` of the query block's linear entries
   are summed in float32, ``LINEAR_CHUNK`` output columns at a time (a ``D x LINEAR_CHUNK``
   register tile, so the whole ``D x D`` sum is never live at once), then
   ``O_l = phi(q) H / (phi(q) . z)`` is written, unprojected, to a float32 buffer. The states are
   computed per call in PyTorch (one batched float32 matmul over blocks) with the *total* over all
   blocks appended as block ``n_kv``, and stored in the input dtype for 16-bit inputs (float32
   otherwise): ``(n_kv + 1) * D * (D + 1)`` elements per (batch, KV head), e.g. 1.5 GiB in
   bfloat16 for Wan 2.1's 75,600 tokens, 40 heads and 64-token blocks.

Linear walk (decided in the plan, per query block): summing the states of the linear entries
costs one ``D x D`` load per entry, so where the linear entries are the majority (SLA: 85 % of
the blocks at its defaults) the kernel starts from the total and subtracts the states of the
*other* blocks instead (``min(n, n_kv - n)`` loads). The plan builds those complement lists
from a per-head ``(n_q, n_kv)`` bool table (block-level, one pattern head at a time). The
subtraction cancels at most about half of the total (it is chosen only when the linear entries
are the majority), so float32 keeps it within the tolerance of the direct sum; a non-finite
K or V anywhere in a (batch, KV head) reaches the linear output of every query block that
subtracts (it is in the total), where the reference sums only the listed blocks.

Cost of the linear walk (not yet measured on a GPU): ``min(n, n_kv - n)`` loads of ``D x D``
states per query block, e.g. at SLA's defaults about 15 % of the blocks, 32 KiB each in
bfloat16 at ``D = 128``: the same per-block state subtraction as the paper's released kernel
(which subtracts the critical blocks' states only, having no negligible class), and memory-bound
where the exact part is compute-bound. If it dominates at video sizes, the critical blocks'
share can instead be taken from the K/V tiles the exact loop already loads
(``phi(q) phi(K_j)^T V_j``, two more products per critical block and no state loads), leaving
only the negligible blocks to the states.

Reuse: the launch ABI (:func:`.launch.launch_arguments`), the plan's full counts and work
order (:func:`sparse_attn.plan.plan_for`), the input checks (:func:`.triton.input_unsupported_reason`).
Forward-only: :func:`gradient_unsupported_reason` says so and
:func:`sparse_attn.compensated_pattern.resolve_compensated_backend` then runs the reference,
which autograd differentiates. Block sizes 16 to 128 (powers of two); GPU autotuning covers
warps and pipeline stages only. Under ``TRITON_INTERPRET=1`` (CPU tests) one configuration runs,
with bf16 products taken in float32 as in :mod:`.triton`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..compensated_pattern import FEATURE_MAPS, LINEAR, MAX_POOL_LEVEL, CompensatedPattern
from ..geometry import num_blocks
from ..plan import plan_for
from ..utils import interpreting, length_bucket
from . import launch
from .compensated_reference import linear_states, pooled
from .triton import block_tile_unsupported_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["CompensatedPlan", "compensated_plan", "forward", "gradient_unsupported_reason", "unsupported_reason"]

name = "triton_compensated"

_BLOCKS = (16, 32, 64, 128)
# Autotuned (num_warps, num_stages); the tile is the pattern's block.
_LAUNCH_CONFIGS = ((4, 1), (4, 2), (8, 1), (8, 2))
# Output columns of the linear branch summed at once (a D x LINEAR_CHUNK float32 register tile).
_LINEAR_CHUNK = 32
# Pattern heads whose (n_q, n_kv) linear table the plan holds at once.
_PLAN_TABLE_ELEMENTS = 1 << 24


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, *, return_lse: bool) -> str | None:
    """Why the compensated kernel cannot run this case, or ``None`` when it can."""
    return block_tile_unsupported_reason(q, pattern, CompensatedPattern, "the compensated kernel", _BLOCKS)


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this kernel cannot differentiate the case: it is forward-only."""
    return "inputs require grad and the compensated (psa/sla) kernel is forward-only"


@dataclass(frozen=True)
class CompensatedPlan:
    """What the kernel reads beside the exact lists, built once per pattern (cached on it).

    ``pooled_indices`` int32 ``(B, H, n_q, max_pooled)``: each query block's pooled entries sorted
    by (level, block); ``level_starts`` int32 ``(B, H, n_q, MAX_POOL_LEVEL + 1)``: level ``l``'s
    entries are slots ``[level_starts[l - 1], level_starts[l])``. ``linear_indices`` int32
    ``(B, H, n_q, width)`` / ``linear_counts``: the blocks whose states the linear walk reads,
    ``linear_subtract`` int32 (1: start from the total and subtract them; 0: add them),
    ``has_linear`` int32 (the query block has linear entries)."""

    pooled_indices: torch.Tensor
    level_starts: torch.Tensor
    max_level: int
    linear_indices: torch.Tensor
    linear_counts: torch.Tensor
    linear_subtract: torch.Tensor
    has_linear: torch.Tensor
    linear: bool


def _sorted_first(keep: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the ``values`` where ``keep`` holds, in their order, in the first ``width`` slots (0 after)."""
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    picked = torch.gather(values, -1, order)
    count = keep.sum(-1, keepdim=True)
    return torch.where(torch.arange(width, device=keep.device) < count, picked, 0).to(torch.int32)


def _build_plan(pattern: CompensatedPattern) -> CompensatedPlan:
    device, n_kv = pattern.device, pattern.num_kv_blocks
    used = pattern._comp_used()
    levels = pattern.comp_levels.long()
    indices = pattern.comp_indices.long()
    pooled_entry = used & (levels > 0)
    # Sort key: (level, block); non-pooled entries last.
    key = torch.where(pooled_entry, levels * (n_kv + 1) + indices, (MAX_POOL_LEVEL + 1) * (n_kv + 1))
    order = torch.sort(key, dim=-1, stable=True).indices
    pooled_count = pooled_entry.sum(-1)
    max_pooled = max(int(pooled_count.max()), 1)
    pooled_indices = torch.gather(indices, -1, order)[..., :max_pooled]
    pooled_indices = torch.where(torch.arange(max_pooled, device=device) < pooled_count[..., None], pooled_indices, 0)
    per_level = [torch.zeros_like(pooled_count)]
    per_level += [(pooled_entry & (levels == level)).sum(-1) for level in range(1, MAX_POOL_LEVEL + 1)]
    level_starts = torch.stack(per_level, -1).cumsum(-1).to(torch.int32)
    pooled_levels = pattern.pooled_levels()

    linear_entry = used & (levels == LINEAR)
    linear_count = linear_entry.sum(-1)  # (B, H, n_q)
    subtract = linear_count > n_kv - linear_count
    walk = torch.where(subtract, n_kv - linear_count, linear_count)
    width = max(int(walk.max()), 1)
    direct = _sorted_first(linear_entry, indices, width)
    complement = torch.zeros_like(direct)
    if bool(subtract.any()):
        # Per pattern head (a few at a time): the (n_q, n_kv) table of linear entries, its complement sorted.
        batch, heads, n_q = linear_count.shape
        step = max(1, _PLAN_TABLE_ELEMENTS // max(1, batch * n_q * (n_kv + 1)))
        for first in range(0, heads, step):
            part = slice(first, first + step)
            columns = torch.where(linear_entry[:, part], indices[:, part], n_kv)
            table = torch.zeros((*columns.shape[:3], n_kv + 1), dtype=torch.bool, device=device)
            table.scatter_(-1, columns, True)
            blocks = torch.arange(n_kv, device=device).expand(*columns.shape[:3], n_kv)
            complement[:, part] = _sorted_first(~table[..., :n_kv], blocks, width)
    return CompensatedPlan(
        pooled_indices=pooled_indices.to(torch.int32).contiguous(),
        level_starts=level_starts.contiguous(),
        max_level=max(pooled_levels, default=0),
        linear_indices=torch.where(subtract[..., None], complement, direct).contiguous(),
        linear_counts=walk.to(torch.int32).contiguous(),
        linear_subtract=subtract.to(torch.int32).contiguous(),
        has_linear=(linear_count > 0).to(torch.int32).contiguous(),
        linear=bool((linear_count > 0).any()) and pattern.projection is not None,
    )


def compensated_plan(pattern: CompensatedPattern) -> CompensatedPlan:
    """The kernel's plan for ``pattern``, built on first request and cached on the pattern."""
    plan = pattern.cached_plan("compensated_plan")
    if plan is None:
        plan = pattern.store_plan("compensated_plan", _build_plan(pattern))
    return plan


if triton is not None:
    from .tile_steps import block_scores, online_update, store_rows

    @triton.jit
    def _exact_blocks(
        acc, m_i, l_i, q, k_base, v_base, index_base, first_slot, last_slot, stride_ks, stride_vs, query_pos,
        seq_k, qk_scale, offs_n, offs_d,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        """The online softmax over the exact entries in slots ``[first_slot, last_slot)``."""
        for slot in range(first_slot, last_slot):
            key_pos = tl.load(index_base + slot) * BLOCK_N + offs_n
            scores, v = block_scores(
                q, k_base, v_base, key_pos, stride_ks, stride_vs, query_pos, seq_k, offs_d,
                MASKED, CAUSAL, DOT_FP32, PRECISION, EVEN_K,
            )  # fmt: skip
            acc, m_i, l_i = online_update(acc, m_i, l_i, scores * qk_scale, v, DOT_FP32, PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _pooled_blocks(
        acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pvs, index_base, first_slot, last_slot,
        level_offset, level_length, seq_k, qk_scale, offs_d,
        LEVEL: tl.constexpr, POOL_N: tl.constexpr, TILE: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """The online softmax over the pooled entries of one level in slots ``[first_slot, last_slot)``."""
        offs_p = tl.arange(0, TILE)
        for slot in range(first_slot, last_slot):
            kv_block = tl.load(index_base + slot)
            pooled_pos = kv_block * POOL_N + offs_p
            valid = (offs_p < POOL_N) & (pooled_pos < level_length)
            rows = level_offset + pooled_pos
            k_tile = tl.trans(
                tl.load(pk_base + rows[:, None] * stride_pks + offs_d[None, :], mask=valid[:, None], other=0.0)
            )
            v = tl.load(pv_base + rows[:, None] * stride_pvs + offs_d[None, :], mask=valid[:, None], other=0.0)
            if DOT_FP32:
                scores = tl.dot(q.to(tl.float32), k_tile.to(tl.float32), input_precision=PRECISION)
            else:
                scores = tl.dot(q, k_tile, input_precision=PRECISION)
            # One pooled key stands for the positions it averages: its weight is multiplied by their number.
            averaged = tl.minimum(seq_k - pooled_pos * (1 << LEVEL), 1 << LEVEL)
            bias = tl.math.log2(tl.maximum(averaged, 1).to(tl.float32))
            scores = tl.where(valid[None, :], scores * qk_scale + bias[None, :], float("-inf"))
            acc, m_i, l_i = online_update(acc, m_i, l_i, scores, v, DOT_FP32, PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _compensated_forward(
        Q, K, V, Out, Lse, KvCounts, KvFullCounts, KvIndices, WorkOrder,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os, stride_cb, stride_ch, stride_ib, stride_ih, stride_iq,
        num_q_heads, group, pattern_head_divisor, seq_q, seq_k, qk_scale,
        PooledK, PooledV, stride_pkb, stride_pkh, stride_pks, stride_pvb, stride_pvh, stride_pvs,
        offset_1, offset_2, offset_3, offset_4, length_1, length_2, length_3, length_4,
        PooledIndices, LevelStarts, stride_pib, stride_pih, stride_piq, stride_lsb, stride_lsh, stride_lsq,
        LinearIndices, LinearCounts, LinearSubtract, HasLinear, stride_lib, stride_lih, stride_liq,
        stride_lcb, stride_lch, States, Sums, num_kv_heads, n_kv_blocks, LinearOut,
        stride_lob, stride_loh, stride_los,
        seq_bucket, work_bucket,  # autotuning keys only
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
        WRITE_LSE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
        EVEN_Q: tl.constexpr, MAX_LEVEL: tl.constexpr, TILE_1: tl.constexpr, TILE_2: tl.constexpr,
        TILE_3: tl.constexpr, TILE_4: tl.constexpr, LINEAR_BRANCH: tl.constexpr, FEATURE: tl.constexpr,
        LINEAR_CHUNK: tl.constexpr,
    ):  # fmt: skip
        # Query blocks vary fastest over the grid, so the programs running together share one head's
        # K/V, pooled K/V and linear states in L2.
        batch_head = tl.program_id(1)
        q_block = tl.load(WorkOrder + tl.program_id(0))
        batch = batch_head // num_q_heads
        head = batch_head % num_q_heads
        kv_head = head // group
        rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_in_range = rows < seq_q

        q_pointers = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        q_pointers += rows[:, None] * stride_qs + offs_d[None, :]
        if EVEN_Q:
            q = tl.load(q_pointers)
        else:
            q = tl.load(q_pointers, mask=row_in_range[:, None], other=0.0)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

        pattern_head = head // pattern_head_divisor
        count_offset = batch * stride_cb + pattern_head * stride_ch + q_block
        count = tl.load(KvCounts + count_offset)
        full_count = tl.load(KvFullCounts + count_offset)
        index_base = KvIndices + batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + q_block * stride_iq
        query_pos = rows + (seq_k - seq_q)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, m_i, l_i = _exact_blocks(
            acc, m_i, l_i, q, k_base, v_base, index_base, 0, full_count, stride_ks, stride_vs, query_pos,
            seq_k, qk_scale, offs_n, offs_d, BLOCK_N, False, CAUSAL, DOT_FP32, PRECISION, EVEN_K,
        )  # fmt: skip
        acc, m_i, l_i = _exact_blocks(
            acc, m_i, l_i, q, k_base, v_base, index_base, full_count, count, stride_ks, stride_vs, query_pos,
            seq_k, qk_scale, offs_n, offs_d, BLOCK_N, True, CAUSAL, DOT_FP32, PRECISION, EVEN_K,
        )  # fmt: skip

        if MAX_LEVEL > 0:
            pk_base = PooledK + batch.to(tl.int64) * stride_pkb + kv_head.to(tl.int64) * stride_pkh
            pv_base = PooledV + batch.to(tl.int64) * stride_pvb + kv_head.to(tl.int64) * stride_pvh
            pooled_base = PooledIndices + batch.to(tl.int64) * stride_pib + pattern_head * stride_pih
            pooled_base += q_block * stride_piq
            starts = LevelStarts + batch.to(tl.int64) * stride_lsb + pattern_head * stride_lsh + q_block * stride_lsq
            acc, m_i, l_i = _pooled_blocks(
                acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pvs, pooled_base, tl.load(starts),
                tl.load(starts + 1), offset_1, length_1, seq_k, qk_scale, offs_d,
                1, BLOCK_N // 2, TILE_1, DOT_FP32, PRECISION,
            )  # fmt: skip
            if MAX_LEVEL > 1:
                acc, m_i, l_i = _pooled_blocks(
                    acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pvs, pooled_base, tl.load(starts + 1),
                    tl.load(starts + 2), offset_2, length_2, seq_k, qk_scale, offs_d,
                    2, BLOCK_N // 4, TILE_2, DOT_FP32, PRECISION,
                )  # fmt: skip
            if MAX_LEVEL > 2:
                acc, m_i, l_i = _pooled_blocks(
                    acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pvs, pooled_base, tl.load(starts + 2),
                    tl.load(starts + 3), offset_3, length_3, seq_k, qk_scale, offs_d,
                    3, BLOCK_N // 8, TILE_3, DOT_FP32, PRECISION,
                )  # fmt: skip
            if MAX_LEVEL > 3:
                acc, m_i, l_i = _pooled_blocks(
                    acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pvs, pooled_base, tl.load(starts + 3),
                    tl.load(starts + 4), offset_4, length_4, seq_k, qk_scale, offs_d,
                    4, BLOCK_N // 16, TILE_4, DOT_FP32, PRECISION,
                )  # fmt: skip

        store_rows(
            Out, Lse, acc, m_i, l_i, batch, head, batch_head, rows, row_in_range, offs_d,
            stride_ob, stride_oh, stride_os, seq_q, EVEN_Q, WRITE_LSE, False,
        )  # fmt: skip

        if LINEAR_BRANCH:
            list_offset = batch * stride_lcb + pattern_head * stride_lch + q_block
            walk = tl.load(LinearCounts + list_offset)
            subtract = tl.load(LinearSubtract + list_offset)
            has_linear = tl.load(HasLinear + list_offset)
            linear_base = LinearIndices + batch.to(tl.int64) * stride_lib + pattern_head * stride_lih
            linear_base += q_block * stride_liq
            x = q.to(tl.float32)
            if FEATURE == 0:
                e = tl.math.exp(x - tl.max(x, 1)[:, None])
                phi = e / tl.sum(e, 1)[:, None]
            elif FEATURE == 1:
                phi = tl.where(x > 0, x + 1.0, tl.math.exp(x))
            else:
                phi = tl.maximum(x, 0.0)
            state_head = batch.to(tl.int64) * num_kv_heads + kv_head
            sums_base = Sums + state_head * (n_kv_blocks + 1) * HEAD_DIM
            states_base = States + state_head * (n_kv_blocks + 1) * HEAD_DIM * HEAD_DIM
            # The walk: add the listed blocks' states, or start from the total (block n_kv) and subtract them.
            start = subtract.to(tl.float32)
            sign = 1.0 - 2.0 * start
            z = tl.load(sums_base + n_kv_blocks * HEAD_DIM + offs_d).to(tl.float32) * start
            for slot in range(0, walk):
                kv_block = tl.load(linear_base + slot)
                z += sign * tl.load(sums_base + kv_block * HEAD_DIM + offs_d).to(tl.float32)
            denominator = tl.sum(phi * z[None, :], 1)
            defined = (has_linear > 0) & (denominator != 0.0)
            denominator = tl.where(defined, denominator, 1.0)
            lo_base = LinearOut + batch.to(tl.int64) * stride_lob + head.to(tl.int64) * stride_loh
            for chunk in tl.static_range(HEAD_DIM // LINEAR_CHUNK):
                offs_c = chunk * LINEAR_CHUNK + tl.arange(0, LINEAR_CHUNK)
                total = states_base + n_kv_blocks * HEAD_DIM * HEAD_DIM
                state = tl.load(total + offs_d[:, None] * HEAD_DIM + offs_c[None, :]).to(tl.float32) * start
                for slot in range(0, walk):
                    kv_block = tl.load(linear_base + slot)
                    block_state = states_base + kv_block.to(tl.int64) * HEAD_DIM * HEAD_DIM
                    state += sign * tl.load(block_state + offs_d[:, None] * HEAD_DIM + offs_c[None, :]).to(tl.float32)
                numerator = tl.dot(phi, state, input_precision=PRECISION)
                result = tl.where(defined[:, None], numerator / denominator[:, None], 0.0)
                lo_pointers = lo_base + rows[:, None] * stride_los + offs_c[None, :]
                tl.store(lo_pointers, result, mask=row_in_range[:, None])

    @functools.cache
    def _autotuned_kernel():
        configs = [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in _LAUNCH_CONFIGS]
        key = ["seq_bucket", "work_bucket", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL", "PRECISION", "MAX_LEVEL"]
        return triton.autotune(configs=configs, key=key + ["LINEAR_BRANCH"])(_compensated_forward)


def _list_strides(x: torch.Tensor, pattern_batch: int) -> tuple[int, int, int]:
    """Batch (0 when one pattern serves the batch), head and query-block strides of a ``(B, H, n_q, ...)`` list."""
    return (0 if pattern_batch == 1 else x.stride(0), x.stride(1), x.stride(2))


def forward(q, k, v, pattern: CompensatedPattern, *, causal: bool, scale: float, return_lse: bool = False):
    """``(out, lse, linear)`` as :func:`.compensated_reference.forward` returns them, from the kernel."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    plan = plan_for(pattern, causal=causal)
    extra = compensated_plan(pattern)
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    n_q_blocks, n_kv = num_blocks(seq_q, pattern.block_q), pattern.num_kv_blocks
    out, lse, args = launch.launch_arguments(q, k, v, plan, scale=scale, return_lse=return_lse)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    # Pooled K/V of levels 1 .. max_level in one buffer each (in the input dtype).
    offsets, lengths = [0] * MAX_POOL_LEVEL, [0] * MAX_POOL_LEVEL
    if extra.max_level:
        keys, values, position = [], [], 0
        for level in range(1, extra.max_level + 1):
            keys.append(pooled(k, level, dtype)[0].to(q.dtype))
            values.append(pooled(v, level, dtype)[0].to(q.dtype))
            offsets[level - 1], lengths[level - 1] = position, keys[-1].shape[2]
            position += keys[-1].shape[2]
        pooled_k, pooled_v = torch.cat(keys, 2), torch.cat(values, 2)
    else:
        pooled_k, pooled_v = k, v  # not read
    args += (pooled_k, pooled_v, *pooled_k.stride()[:3], *pooled_v.stride()[:3], *offsets, *lengths)
    args += (extra.pooled_indices, extra.level_starts)
    args += (*_list_strides(extra.pooled_indices, pattern.batch), *_list_strides(extra.level_starts, pattern.batch))

    linear = None
    if extra.linear:
        states, sums = linear_states(k, v, pattern.block_k, pattern.feature_map, torch.float32)
        # The total over all blocks as block n_kv, for the subtracting walk; stored in the input dtype
        # for 16-bit inputs (half the bytes the walk reads), summed in float32 in the kernel.
        state_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
        states = torch.cat([states, states.sum(2, keepdim=True)], 2).to(state_dtype).contiguous()
        sums = torch.cat([sums, sums.sum(2, keepdim=True)], 2).to(state_dtype).contiguous()
        linear = launch.allocate((batch, q_heads, seq_q, dim), torch.float32, q.device)
    else:
        states = sums = torch.zeros(1, dtype=torch.float32, device=q.device)  # not read
    linear_out = linear if linear is not None else out
    args += (extra.linear_indices, extra.linear_counts, extra.linear_subtract, extra.has_linear)
    args += (
        *_list_strides(extra.linear_indices, pattern.batch),
        *_list_strides(extra.linear_counts, pattern.batch)[:2],
    )
    args += (states, sums, kv_heads, n_kv, linear_out, *linear_out.stride()[:3])
    args += (length_bucket(seq_k), plan.work_bucket)
    constants = dict(
        **launch.mode_constants(q, k, pattern, causal=causal, return_lse=return_lse),
        BLOCK_M=pattern.block_q,
        BLOCK_N=pattern.block_k,
        MAX_LEVEL=extra.max_level,
        **{f"TILE_{level}": max(16, pattern.block_k >> level) for level in range(1, MAX_POOL_LEVEL + 1)},
        LINEAR_BRANCH=extra.linear,
        FEATURE=FEATURE_MAPS.index(pattern.feature_map),
        LINEAR_CHUNK=min(_LINEAR_CHUNK, dim),
    )
    grid = (n_q_blocks, batch * q_heads)
    if interpreting():
        _compensated_forward[grid](*args, **constants)
    else:
        _autotuned_kernel()[grid](*args, **constants)
    return out, (lse if return_lse else None), linear
