"""Gluon backend: warp-specialized block-sparse attention forward for Hopper (sm_90).

The Triton kernel (:mod:`.triton`) leaves the schedule to the compiler: every warp loads,
multiplies and exponentiates in turn. This kernel writes the schedule of FlashAttention-3
(Shah et al., 2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony and
Low-precision", section 3) by hand in Gluon (``triton.experimental.gluon``), for the
block-sparse walk of the Triton kernel:

* warp specialization: one producer warp issues TMA loads of the query tile and, for every
  listed KV block, of its K and V tiles into a ring of ``STAGES`` shared-memory slots (as many
  as fit, see :func:`.configs.gluon_stages`), with mbarriers signalling "ready" (transaction
  count) and "free" (consumers done);
* two consumer warpgroups, each owning 64 of the tile's 128 query rows, run independently
  (each waits for its own data and releases slots by arriving on a count-2 barrier), so one
  warpgroup's softmax overlaps the other's tensor-core work;
* intra-warpgroup pipelining: the ``Q K^T`` wgmma of step ``j`` and the ``P V`` wgmma of
  step ``j - 1`` are in flight together while the softmax of step ``j`` waits only for the
  former (``warpgroup_mma_wait(1)``); ``P`` stays in registers as the A operand.

The block walk, masks and numerics are those of the Triton kernel: query blocks in the plan's
work order, scores kept in log2 units with the scale folded into one multiply, a row with
nothing visible yet keeps ``m = 0`` instead of ``-inf``, full blocks (the plan's full counts:
every row sees every key) skip the mask, and the mask (causal and/or key bounds) is applied
from the list's first partial block on. A token rule that is a box predicate
(:mod:`sparse_attn.rule_predicate`, e.g. the exact neighbourhood windows of ``neighborhood``)
joins that mask (constexpr ``BOX``): the plan's :attr:`~sparse_attn.plan.BlockSparsePlan.predicate_lists`
put the entries the rule does not cut first, each row's packed bounds are loaded once per work
item and each key tile's codes per step. A warpgroup skips the steps whose key groups none of
its 64 rows may see (the predicate's group summaries; ``BOX=2``, :func:`_unseen_step`): no
``Q K^T``, no softmax, only the ``P V`` of a zero ``P`` (so a non-finite V value reaches the rows
as without skipping), the same result bit for bit; the producer still loads the tiles (one H100:
HunyuanVideo's ``neighborhood`` windows 10.25 -> 9.53 ms, docs/spatial.md). Other token rules
(bitmasks) are the Triton kernel's. Loads go through tensor descriptors made on the device
per (batch, head) with that head's sequence length as the row bound, so rows past the end read
as zeros. The launch arguments are the Triton kernel's (:mod:`.launch`).

Scope: compute capability 9.x, float16/bfloat16, head_dim 64 or 128, pattern blocks
``block_q`` a multiple of 128 and ``block_k`` a multiple of 64, 16-byte aligned addresses
and strides (:func:`cannot_run_reason`); ``backend="gluon"`` falls back to the Triton kernel
elsewhere. ``auto`` also leaves light head_dim-64 cases (fewer than 5 kept blocks per query
block on average) and patterns of at most two kept blocks per query block to the Triton kernel
(:func:`slower_than_triton_reason`). Gluon has no
interpreter, so CPU tests compile this kernel for sm_90 (``triton.compile`` with a
``GPUTarget``, ptxas included) and the GPU tests compare it with the reference backend.
"""

from __future__ import annotations

import functools

import torch

from ..geometry import num_blocks
from ..pattern import BlockSparsePattern
from ..plan import BlockSparsePlan, plan_for
from ..rule_predicate import GROUP
from ..utils import device_capability, interpreting
from . import configs, triton_backward
from .configs import GLUON_BLOCK_M
from .gluon_lang import gl, gluon, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from .launch import (
    descriptor_compatible,
    ensure_scratch_allocator,
    flat_descriptor,
    heads_per_wave,
    launch_arguments,
    lead_blocks,
)

name = "gluon"

# auto takes this kernel at head_dim 64 only from a mean of 5+ kept blocks per query block
# (work bucket 3). Until the twenty-eighth session the bound was bucket 5 (17+ blocks), from an
# H100 run before launch-made descriptors, the persistent kernel and launch waves
# (benchmarks/results/h100/kernels_gluon.json). Re-measured on the H200 with those
# (kernels_pingpong_d64_s48.json, 32K, 32/8 heads): Gluon 0.62 / 1.08 ms against the Triton
# kernel's 0.65 / 1.18 at densities 0.05 / 0.1 (buckets 3 and 4).
MIN_WORK_BUCKET_SMALL_DIM = 3

# The persistent kernel (one program per SM, an item's loads under the previous one's stores)
# takes work buckets up to 5 (a mean of at most 32 kept blocks per query block). Measured on the
# H200 against the one-item kernel (benchmarks/results/h200/kernels_gluon_persistent.json vs
# kernels_fa4.json, head_dim 128): 32K densities 0.05 / 0.1 / 0.2 (buckets 3-5) 0.94 / 1.66 / 3.09
# vs 1.04 / 1.79 / 3.38 ms, 128K density 0.05 (bucket 5) 12.86 vs 13.16; slower from bucket 6 on
# (128K density 0.1: 25.6 vs 25.0; 0.2: 53.4 vs 51.0; 32K dense 15.3 vs 14.6; 128K dense 280 vs
# 239), where its static round-robin over items of very unequal length balances worse than the
# hardware's scheduling of one program per item.
PERSISTENT_MAX_WORK_BUCKET = 5

# ... unless the launch comes in several waves (launch.heads_per_wave) and some query blocks keep
# more than this many times the mean number of blocks. The static round-robin then hands one
# head's heavy items (say the dense rows of text tokens beside a video) to the same few programs
# wave after wave. Measured on the H200 with waves (waves_persistent_hunyuan.json; HunyuanVideo
# shape, 24 heads, inputs in tile order): `neighborhood` defaults (rows of 26 blocks on average,
# text rows of 936) 14.96 ms persistent vs 10.99 one program per item; GNA block-exact 8.23 vs
# 5.19. Random causal patterns (a ratio of about 2) stay persistent: 0.86 vs 0.99 ms at 32K and
# density 0.05, 12.54 vs 14.07 at 128K (waves_persistent_causal.json).
PERSISTENT_MAX_ROW_IMBALANCE = 4.0

# Dense head_dim-64 patterns in query tiles of 192 rows over three consumer warpgroups (as
# FlashAttention-3/4 tile their head_dim-64 forward), kernel_configs(gluon_tall_tiles=...). On by
# default: H100, dense causal head_dim 64, 32 heads, 0.58 / 8.28 / 32.88 / 128.68 ms at 8K / 32K /
# 64K / 128K against 0.63 / 9.33 / 39.70 / 146.16 for 128-row tiles, FA4's dense kernel 0.52 /
# 8.24 / 33.75 / 128.26 in the same run (benchmarks/results/h100/kernels_tall128_s56.json).
TALL_TILES_BY_DEFAULT = True
# Thirteen warps (three consumer warpgroups and the producer) launch as sixteen (the producer's
# warpgroup is padded): 512 threads, so at most 128 registers a thread at launch (65,536 a
# multiprocessor). setmaxnreg then moves them: the producer's warpgroup drops to 24, the two
# worker consumers rise to 160 and the default consumer to 168 (no spills at 64- or 128-key
# steps). 152 at launch compiled but could not launch (the thirty-sixth session's first GPU run).
THREE_CONSUMER_MAXNREG = 128
# Key steps of the tall tiles: 128 (H100, dense causal head_dim 64, 32 heads: 8.38-8.89 ms at 32K
# against 9.33-9.41 at 64 and 9.30-9.98 for the 128-row tiles; 133.1-137.3 at 128K against
# 149.5-157.6 and 145.8-148.5; benchmarks/results/h100/tall_tiles_s56.json).
TALL_TILES_BLOCK_N = 128

# auto leaves patterns of at most 2 kept blocks per query block on average (work bucket 1) to
# the Triton kernel at every head_dim: at one block per query block, bidirectional, the image
# shape of benchmarks/spatial.py (16,896 tokens, 24 heads, head_dim 128) took 0.43 ms here
# against 0.14 ms on the Triton kernel (benchmarks/results/h200/spatial_random_blocks.json); at
# 3 blocks (work bucket 2) the Gluon kernel was the faster, 0.24 vs 0.33 ms. One measured case:
# the boundary between 1 and 3 blocks was not resolved further.
MAX_WORK_BUCKET_TRITON = 1


def cannot_run_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, capability: tuple[int, int] | None
) -> str | None:
    """Why the Gluon kernel cannot run this case on a device of this compute capability
    (``None`` off CUDA), or ``None`` when it can."""
    if gluon is None:
        return "this Triton has no Gluon (triton.experimental.gluon)"
    if capability is None:
        return "the Gluon kernel needs a CUDA device"
    if capability[0] != 9:
        return f"the Gluon kernel is for compute capability 9.x (Hopper), not {capability[0]}.{capability[1]}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Gluon kernel takes float16 or bfloat16, not {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"the Gluon kernel takes head_dim 64 or 128, not {q.shape[-1]}"
    if pattern.block_q % GLUON_BLOCK_M:
        return f"the Gluon kernel needs block_q a multiple of {GLUON_BLOCK_M}, got {pattern.block_q}"
    if pattern.block_k % 64:
        return f"the Gluon kernel needs block_k a multiple of 64, got {pattern.block_k}"
    if not all(descriptor_compatible(x) for x in (q, k, v)):
        return "the Gluon kernel needs 16-byte aligned addresses and strides with contiguous rows"
    return None


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str | None:
    """Why the Gluon kernel cannot run this case here, or ``None`` when it can."""
    if interpreting():
        return "the Gluon kernel has no interpreter (TRITON_INTERPRET=1)"
    return cannot_run_reason(q, k, v, pattern, device_capability(q.device))


def slower_than_triton_reason(q: torch.Tensor, plan: BlockSparsePlan) -> str | None:
    """Why ``auto`` leaves a case this kernel can run to the Triton kernel, or ``None``."""
    if q.shape[-1] < 128 and plan.work_bucket < MIN_WORK_BUCKET_SMALL_DIM:
        return f"at head_dim {q.shape[-1]} sparse patterns run faster on the Triton kernel"
    if plan.work_bucket <= MAX_WORK_BUCKET_TRITON:
        return "with at most 2 kept blocks per query block the Triton kernel runs faster"
    return None


if gluon is not None:
    # Launch-order helpers are plain Triton functions, which Gluon kernels call as they are.
    from .tile_steps import dense_tile_item, lead_wave_item, wave_item, work_item

    @gluon.jit
    def _producer(
        q_base, k_base, v_base, stride_qs, stride_ks, stride_vs, seq_q, seq_k, row_start, index_base, n_steps,
        q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, QDesc, KDesc, VDesc, q_row0, kv_row0,
        HEAD_DIM: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        HOST_DESC: gl.constexpr, Q_BOXES: gl.constexpr,
    ):  # fmt: skip
        """One warp: TMA loads of the query tile, then K and V tiles of every listed block.

        ``HOST_DESC``: read through the launch's descriptors over the flattened ``(B*H*S, D)``
        tensors, at rows ``q_row0`` / ``kv_row0`` onward, instead of making per-head descriptors
        here (see :func:`host_descriptors`). ``Q_BOXES``: 1 (the query tile in one 128-row box)
        or 3 (a 192-row tile in three 64-row boxes, each into its warpgroup's rows)."""
        Q_BOX: gl.constexpr = 128 if Q_BOXES == 1 else 64
        if HOST_DESC:
            q_desc = QDesc
            k_desc = KDesc
            v_desc = VDesc
        else:
            q_desc = tma.make_tensor_descriptor(
                q_base, [seq_q, HEAD_DIM], [stride_qs, 1], [Q_BOX, HEAD_DIM], q_smem.type.layout
            )
            k_desc = tma.make_tensor_descriptor(
                k_base, [seq_k, HEAD_DIM], [stride_ks, 1], [BLOCK_N, HEAD_DIM], k_smem.type.layout
            )
            v_desc = tma.make_tensor_descriptor(
                v_base, [seq_k, HEAD_DIM], [stride_vs, 1], [BLOCK_N, HEAD_DIM], v_smem.type.layout
            )
        mbarrier.expect(q_bar, Q_BOXES * q_desc.block_type.nbytes)
        if Q_BOXES == 1:
            tma.async_copy_global_to_shared(q_desc, [q_row0 + row_start, 0], q_bar, q_smem)
        else:
            for box in gl.static_range(Q_BOXES):
                tma.async_copy_global_to_shared(
                    q_desc, [q_row0 + row_start + box * Q_BOX, 0], q_bar, q_smem.slice(box * Q_BOX, Q_BOX)
                )
        _produce_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_free, index_base, n_steps, 0, kv_row0,
                    BLOCK_K, BLOCK_N, STAGES)  # fmt: skip

    @gluon.jit
    def _produce_kv(
        k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_free, index_base, n_steps, step_base, kv_row0,
        BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """TMA loads of the K and V tiles of one work item's listed blocks into the ring; ``step_base``
        counts the ring steps of earlier items (a persistent program's ring runs on across items)."""
        SUBTILES: gl.constexpr = BLOCK_K // BLOCK_N
        for step in range(n_steps):
            ring_step = step_base + step
            slot = ring_step % STAGES
            # A fresh barrier counts as having completed the phase before phase 0, so the first
            # pass over the ring does not wait.
            phase = ((ring_step // STAGES) & 1) ^ 1
            kv_block = gl.load(index_base + step // SUBTILES)
            key_start = kv_block * BLOCK_K + (step % SUBTILES) * BLOCK_N
            mbarrier.wait(kv_free.index(slot), phase)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + key_start, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [kv_row0 + key_start, 0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _softmax_step(
        s, m_i, l_i, step, n_full, index_base, query_pos, seq_k, qk_scale, BoxTable, box_low, box_high, box_guard,
        s_layout: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, EVEN_K: gl.constexpr,
        BOX: gl.constexpr,
    ):  # fmt: skip
        """Mask (from the first non-full block on), then the online-softmax update of one step.

        ``BOX``: the pattern's token rule is a box predicate (:mod:`sparse_attn.rule_predicate`),
        evaluated on every step from ``n_full`` on: the key codes of the tile (row 0 of
        ``BoxTable``) against the rows' packed bounds ``box_low`` / ``box_high`` (the upper bounds
        with the guard bits already set)."""
        SUBTILES: gl.constexpr = BLOCK_K // BLOCK_N
        if CAUSAL or not EVEN_K or BOX:
            if step >= n_full:
                kv_block = gl.load(index_base + step // SUBTILES)
                key_start = kv_block * BLOCK_K + (step % SUBTILES) * BLOCK_N
                key_pos = key_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                if CAUSAL:
                    s = gl.where(key_pos[None, :] <= query_pos[:, None], s, float("-inf"))
                if BOX and EVEN_K:
                    # Every key exists: the guard bits against the scalar guard, or a key every
                    # query sees (code < 0). Measured 4 % faster here than the fused test below
                    # (gluon_fused_box_ab_s43.json: 10.50 vs 10.94 ms at HunyuanVideo).
                    code = gl.load(BoxTable + key_pos)
                    lower = (code | box_guard)[None, :] - box_low[:, None]
                    upper = box_high[:, None] - code[None, :]
                    allowed = ((lower & upper & box_guard) == box_guard) | (code < 0)[None, :]
                    s = gl.where(allowed, s, float("-inf"))
                elif BOX:
                    # A ragged last tile: the predicate's fused test (sparse_attn.rule_predicate.
                    # box_visible), per key a code, the guard bits to keep and the value to match,
                    # which also hides the keys past seq_k, so no separate bounds mask (that mask
                    # beside the predicate made the kernel 1.6x slower at Wan 2.1's 75,600 tokens).
                    in_range = key_pos < seq_k
                    code = gl.load(BoxTable + key_pos, mask=in_range, other=0)
                    keep = gl.where(code < 0, 0, box_guard)
                    want = gl.where(in_range, keep, box_guard | 1)
                    lower = (code | box_guard)[None, :] - box_low[:, None]
                    upper = box_high[:, None] - code[None, :]
                    s = gl.where((lower & upper & keep[None, :]) == want[None, :], s, float("-inf"))
                elif not EVEN_K:
                    s = gl.where((key_pos < seq_k)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _first_step(
        q, k_smem, k_ready, s_zero, m_i, l_i, step, ring_step, n_full, index_base, query_pos, seq_k, qk_scale,
        BoxTable, box_low, box_high, box_guard, s_layout: gl.constexpr, p_layout: gl.constexpr,
        BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
        EVEN_K: gl.constexpr, BOX: gl.constexpr,
    ):  # fmt: skip
        """A warpgroup's first step: its ``Q K^T`` and softmax (no ``P V`` before it to overlap); returns
        ``(m_i, l_i, P)``."""
        slot = ring_step % STAGES
        mbarrier.wait(k_ready.index(slot), (ring_step // STAGES) & 1)
        s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, _, m_i, l_i = _softmax_step(
            s, m_i, l_i, step, n_full, index_base, query_pos, seq_k, qk_scale, BoxTable, box_low, box_high, box_guard,
            s_layout, BLOCK_K, BLOCK_N, CAUSAL, EVEN_K, BOX,
        )  # fmt: skip
        return m_i, l_i, gl.convert_layout(p.to(q.dtype), p_layout)

    @gluon.jit
    def _pipelined_step(
        q, k_smem, v_smem, k_ready, v_ready, kv_free, s_zero, acc, p_op, m_i, l_i, step, ring_step, prev_ring,
        n_full, index_base, query_pos, seq_k, qk_scale, BoxTable, box_low, box_high, box_guard,
        s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK_K: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, EVEN_K: gl.constexpr, BOX: gl.constexpr,
    ):  # fmt: skip
        """One step after the first: its ``Q K^T`` and the ``P V`` of the step taken before it
        (ring step ``prev_ring``) go to the tensor cores together, and the softmax runs while
        ``P V`` is still in flight; then that step's slot is released."""
        slot = ring_step % STAGES
        prev = prev_ring % STAGES
        mbarrier.wait(k_ready.index(slot), (ring_step // STAGES) & 1)
        s_token = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), (prev_ring // STAGES) & 1)
        acc_token = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_token,))
        p, alpha, m_i, l_i = _softmax_step(
            s, m_i, l_i, step, n_full, index_base, query_pos, seq_k, qk_scale, BoxTable, box_low, box_high, box_guard,
            s_layout, BLOCK_K, BLOCK_N, CAUSAL, EVEN_K, BOX,
        )  # fmt: skip
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_token, p_op))
        mbarrier.arrive(kv_free.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        return acc, gl.convert_layout(p.to(q.dtype), p_layout), m_i, l_i

    @gluon.jit
    def _last_step(v_smem, v_ready, kv_free, acc, p_op, ring_step, STAGES: gl.constexpr):
        """The ``P V`` of the last step taken, then its slot released."""
        slot = ring_step % STAGES
        mbarrier.wait(v_ready.index(slot), (ring_step // STAGES) & 1)
        acc_token = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_token, p_op))
        mbarrier.arrive(kv_free.index(slot), count=1)
        return acc

    @gluon.jit
    def _may_see(
        step, n_steps, n_full, index_base, group_base, n_groups, group_low, group_high, box_guard,
        BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
    ):  # fmt: skip
        """Whether step ``step`` is a whole entry or one of its 64-key groups may be seen by the
        warpgroup's rows (summaries ``group_low`` / ``group_high``, the latter with the guard bits
        set; :func:`sparse_attn.rule_predicate.groups_may_see`). Steps from ``n_steps`` on read
        block 0 (their answer is not used)."""
        SUBTILES: gl.constexpr = BLOCK_K // BLOCK_N
        kv_block = gl.load(index_base + step // SUBTILES, mask=step < n_steps, other=0)
        key_group = (kv_block * BLOCK_K + (step % SUBTILES) * BLOCK_N) // 64
        seen = step < n_full
        for part in gl.static_range(BLOCK_N // 64):
            key_min = gl.load(group_base + 2 * n_groups + key_group + part)
            key_max = gl.load(group_base + 3 * n_groups + key_group + part)
            meet = ((key_max | box_guard) - group_low) & (group_high - key_min) & box_guard
            seen = seen | (meet == box_guard)
        return seen

    @gluon.jit
    def _unseen_step(v_smem, k_ready, v_ready, kv_free, acc, p_op, m_i, ring_step, STAGES: gl.constexpr):
        """A step none of the warpgroup's rows may see: no ``Q K^T``, no softmax. Every score would be
        masked, so the sum and the accumulator keep their values and the running maximum too,
        except that a row with nothing visible yet takes ``m = 0`` as :func:`_softmax_step` gives
        it (so the results stay the same bit for bit). The ``P V`` of the step before runs alone,
        and this step's ``P`` is zero: the next ``P V`` multiplies its V tile by zeros as the
        unskipped step would (a non-finite V value still reaches the rows). Its K tile is waited
        for though unread, so the slot is released only once both copies into it have landed."""
        slot = ring_step % STAGES
        prev = (ring_step - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (ring_step // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((ring_step - 1) // STAGES) & 1)
        acc_token = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_token, p_op))
        mbarrier.arrive(kv_free.index(prev), count=1)
        return acc, gl.zeros_like(p_op), gl.where(m_i == float("-inf"), 0.0, m_i)

    @gluon.jit
    def _consumer(
        q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free,
        index_base, n_steps, n_full, row_start, seq_q, seq_k, qk_scale,
        out_base, stride_os, lse_base, BoxTable, box_guard,
        ROW_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, EVEN_K: gl.constexpr, EVEN_Q: gl.constexpr,
        BOX: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup of the one-item-per-program kernel (see :func:`_consume_item`)."""
        _consume_item(
            q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free,
            index_base, n_steps, n_full, row_start, seq_q, seq_k, qk_scale, out_base, stride_os, lse_base, 0, 0,
            BoxTable, box_guard, ROW_OFFSET, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
        )  # fmt: skip

    @gluon.jit
    def _consume_item(
        q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free,
        index_base, n_steps, n_full, row_start, seq_q, seq_k, qk_scale,
        out_base, stride_os, lse_base, step_base, q_phase, BoxTable, box_guard,
        ROW_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, EVEN_K: gl.constexpr, EVEN_Q: gl.constexpr,
        BOX: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup: 64 query rows of one work item through every listed block, then the
        output rows. ``step_base`` counts the ring steps of the program's earlier items and
        ``q_phase`` is the query tile's load phase; once its last product is done it releases the
        query tile (``q_free``), so a persistent producer loads the next item's during the stores.
        ``BOX``: 0 (no token rule), 1 (a box predicate, evaluated on the cut entries' steps) or 2
        (the same, and the steps none of these 64 rows may see take neither ``Q K^T`` nor the
        softmax, :func:`_unseen_step`)."""
        HALF: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        dtype: gl.constexpr = q_smem.dtype

        q = q_smem.slice(ROW_OFFSET, HALF)
        rows = row_start + ROW_OFFSET + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
        query_pos = rows + (seq_k - seq_q)
        box_low = 0
        box_high = 0
        if BOX:
            # The rows' packed bounds (rows 1 and 2 of the predicate's table), loaded once per item;
            # the upper bounds carry the guard bits the test sets on them.
            box_low = gl.load(BoxTable + seq_k + query_pos, mask=rows < seq_q, other=0)
            box_high = gl.load(BoxTable + 2 * seq_k + query_pos, mask=rows < seq_q, other=0) | box_guard
        s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([HALF], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)
        p_op = gl.zeros([HALF, BLOCK_N], dtype, p_layout)
        mbarrier.wait(q_bar, q_phase)

        if BOX == 2:
            # Steps whose key groups none of these rows may see (rule_predicate's group summaries)
            # take no Q K^T and no softmax: their P is zero, so only P V runs, which keeps a
            # non-finite V value reaching these rows as it does without skipping.
            group_base = BoxTable + 3 * seq_k
            n_groups = seq_k // 64 + 2
            query_group = (row_start + ROW_OFFSET + seq_k - seq_q) // 64
            group_low = gl.load(group_base + query_group)
            group_high = gl.load(group_base + n_groups + query_group) | box_guard
            # Each step's test is loaded one step ahead, so its loads wait under the step before.
            seen = _may_see(
                0, n_steps, n_full, index_base, group_base, n_groups, group_low, group_high, box_guard, BLOCK_K,
                BLOCK_N,
            )  # fmt: skip
            next_seen = _may_see(
                1, n_steps, n_full, index_base, group_base, n_groups, group_low, group_high, box_guard, BLOCK_K,
                BLOCK_N,
            )  # fmt: skip
            if n_steps > 0:
                if seen:
                    m_i, l_i, p_op = _first_step(
                        q, k_smem, k_ready, s_zero, m_i, l_i, 0, step_base, n_full, index_base, query_pos, seq_k,
                        qk_scale, BoxTable, box_low, box_high, box_guard, s_layout, p_layout, BLOCK_K, BLOCK_N,
                        STAGES, CAUSAL, EVEN_K, BOX,
                    )  # fmt: skip
                else:
                    mbarrier.wait(k_ready.index(step_base % STAGES), (step_base // STAGES) & 1)
                    m_i = gl.zeros_like(m_i)  # as _softmax_step leaves a row with nothing visible yet
            for step in range(1, n_steps):
                ring_step = step_base + step
                seen = next_seen
                next_seen = _may_see(
                    step + 1, n_steps, n_full, index_base, group_base, n_groups, group_low, group_high, box_guard,
                    BLOCK_K, BLOCK_N,
                )  # fmt: skip
                if seen:
                    acc, p_op, m_i, l_i = _pipelined_step(
                        q, k_smem, v_smem, k_ready, v_ready, kv_free, s_zero, acc, p_op, m_i, l_i, step, ring_step,
                        ring_step - 1, n_full, index_base, query_pos, seq_k, qk_scale, BoxTable, box_low, box_high,
                        box_guard, s_layout, o_layout, p_layout, BLOCK_K, BLOCK_N, STAGES, CAUSAL, EVEN_K, BOX,
                    )  # fmt: skip
                else:
                    acc, p_op, m_i = _unseen_step(v_smem, k_ready, v_ready, kv_free, acc, p_op, m_i, ring_step, STAGES)
            if n_steps > 0:
                acc = _last_step(v_smem, v_ready, kv_free, acc, p_op, step_base + n_steps - 1, STAGES)
        else:
            if n_steps > 0:
                m_i, l_i, p_op = _first_step(
                    q, k_smem, k_ready, s_zero, m_i, l_i, 0, step_base, n_full, index_base, query_pos, seq_k,
                    qk_scale, BoxTable, box_low, box_high, box_guard, s_layout, p_layout, BLOCK_K, BLOCK_N, STAGES,
                    CAUSAL, EVEN_K, BOX,
                )  # fmt: skip
            for step in range(1, n_steps):
                ring_step = step_base + step
                acc, p_op, m_i, l_i = _pipelined_step(
                    q, k_smem, v_smem, k_ready, v_ready, kv_free, s_zero, acc, p_op, m_i, l_i, step, ring_step,
                    ring_step - 1, n_full, index_base, query_pos, seq_k, qk_scale, BoxTable, box_low, box_high,
                    box_guard, s_layout, o_layout, p_layout, BLOCK_K, BLOCK_N, STAGES, CAUSAL, EVEN_K, BOX,
                )  # fmt: skip
            if n_steps > 0:
                acc = _last_step(v_smem, v_ready, kv_free, acc, p_op, step_base + n_steps - 1, STAGES)
        mbarrier.arrive(q_free, count=1)

        if BOX:
            # A row the rule leaves without any key has acc = 0 and l = 0: output 0, LSE -inf.
            l_i_safe = gl.where(l_i == 0.0, 1.0, l_i)
        else:
            l_i_safe = l_i
        l_o = gl.convert_layout(l_i_safe, gl.SliceLayout(1, o_layout))
        out = acc / l_o[:, None]
        out_rows = row_start + ROW_OFFSET + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        pointers = out_base + out_rows[:, None] * stride_os + cols[None, :]
        if EVEN_Q:
            gl.store(pointers, out.to(dtype))
        else:
            gl.store(pointers, out.to(dtype), mask=(out_rows < seq_q)[:, None])
        if WRITE_LSE:
            lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
            gl.store(lse_base + rows, lse, mask=rows < seq_q)

    @gluon.jit
    def _allocate_ring(
        dtype: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        CONSUMERS: gl.constexpr,
    ):  # fmt: skip
        """The query tile (64 rows per consumer warpgroup; three take a 256-row buffer, as shared
        memory shapes are powers of two), the K/V ring of ``STAGES`` slots and their barriers,
        initialised."""
        Q_ROWS: gl.constexpr = 128 if CONSUMERS == 2 else 256
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [Q_ROWS, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_free, count=CONSUMERS)  # every consumer warpgroup releases the query tile
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_free.index(i), count=CONSUMERS)  # every consumer warpgroup releases a slot
        return q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free

    @gluon.jit
    def _gluon_block_sparse_forward(
        Q, K, V, Out, Lse, KvCounts, KvFullCounts, KvIndices, WorkOrder,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os, stride_cb, stride_ch, stride_ib, stride_ih, stride_iq,
        num_q_heads, group, pattern_head_divisor, seq_q, seq_k, qk_scale, QDesc, KDesc, VDesc, BoxTable, box_guard,
        num_tiles, heads_per_wave, lead_tiles, all_heads,
        HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, EVEN_K: gl.constexpr, EVEN_Q: gl.constexpr,
        HOST_DESC: gl.constexpr, BOX: gl.constexpr, CONSUMERS: gl.constexpr,
    ):  # fmt: skip
        """One program per work item, in the launch order of :func:`.tile_steps.lead_wave_item` (a 1D grid).

        ``CONSUMERS``: 2 (query tiles of 128 rows: the pattern's query blocks or parts of them) or
        3 (tiles of 192 rows over three consumer warpgroups, :func:`.tile_steps.dense_tile_item`:
        dense patterns only, no lead; ``num_tiles`` counts 192-row tiles)."""
        if CONSUMERS == 3:
            tile_rank, batch_head = wave_item(gl.program_id(0), heads_per_wave, num_tiles)
            batch, head, kv_head, row_start, n_steps, n_full, index_base = dense_tile_item(
                tile_rank, batch_head, KvCounts, KvFullCounts, KvIndices,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
                num_tiles, (seq_q + BLOCK_Q - 1) // BLOCK_Q, 192, BLOCK_Q, BLOCK_K, BLOCK_N,
            )  # fmt: skip
        else:
            tile_rank, batch_head = lead_wave_item(gl.program_id(0), heads_per_wave, num_tiles, lead_tiles, all_heads)
            batch, head, kv_head, row_start, n_steps, n_full, index_base = work_item(
                tile_rank, batch_head, WorkOrder, KvCounts, KvFullCounts, KvIndices,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
                BLOCK_Q, BLOCK_K, BLOCK_N,
            )  # fmt: skip
        q_base = Q + batch.to(gl.int64) * stride_qb + head.to(gl.int64) * stride_qh
        k_base = K + batch.to(gl.int64) * stride_kb + kv_head.to(gl.int64) * stride_kh
        v_base = V + batch.to(gl.int64) * stride_vb + kv_head.to(gl.int64) * stride_vh
        out_base = Out + batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh
        lse_base = Lse + batch_head.to(gl.int64) * seq_q
        # First rows of this (batch, head) in the flattened tensors the host descriptors cover;
        # per-head device descriptors start at the head's first row.
        q_row0 = 0
        kv_row0 = 0
        if HOST_DESC:
            q_row0 = batch_head * seq_q
            kv_row0 = (batch * (num_q_heads // group) + kv_head) * seq_k
        q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free = _allocate_ring(
            Q.dtype.element_ty, HEAD_DIM, BLOCK_N, STAGES, CONSUMERS
        )
        # The partition lists stay spelled out per consumer count: built by a loop or shared between
        # the branches, Gluon lost their constexpr arguments (thirty-fifth session).
        if CONSUMERS == 3:
            gl.warp_specialize(
                [
                    (
                        _consumer,
                        (
                            q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free, index_base, n_steps,
                            n_full, row_start, seq_q, seq_k, qk_scale, out_base, stride_os, lse_base, BoxTable,
                            box_guard, 0, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
                        ),
                    ),
                    (
                        _consumer,
                        (
                            q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free, index_base, n_steps,
                            n_full, row_start, seq_q, seq_k, qk_scale, out_base, stride_os, lse_base, BoxTable,
                            box_guard, 64, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
                        ),
                    ),
                    (
                        _consumer,
                        (
                            q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free, index_base, n_steps,
                            n_full, row_start, seq_q, seq_k, qk_scale, out_base, stride_os, lse_base, BoxTable,
                            box_guard, 128, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
                        ),
                    ),
                    (
                        _producer,
                        (
                            q_base, k_base, v_base, stride_qs, stride_ks, stride_vs, seq_q, seq_k, row_start,
                            index_base, n_steps, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, QDesc,
                            KDesc, VDesc, q_row0, kv_row0, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, HOST_DESC, 3,
                        ),
                    ),
                ],
                [4, 4, 1],
                [160, 160, 24],
            )  # fmt: skip
        else:
            gl.warp_specialize(
                [
                    (
                        _consumer,
                        (
                            q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free, index_base, n_steps,
                            n_full, row_start, seq_q, seq_k, qk_scale, out_base, stride_os, lse_base, BoxTable,
                            box_guard, 0, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
                        ),
                    ),
                    (
                        _consumer,
                        (
                            q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free, index_base, n_steps,
                            n_full, row_start, seq_q, seq_k, qk_scale, out_base, stride_os, lse_base, BoxTable,
                            box_guard, 64, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
                        ),
                    ),
                    (
                        _producer,
                        (
                            q_base, k_base, v_base, stride_qs, stride_ks, stride_vs, seq_q, seq_k, row_start,
                            index_base, n_steps, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, QDesc,
                            KDesc, VDesc, q_row0, kv_row0, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, HOST_DESC, 1,
                        ),
                    ),
                ],
                [4, 1],
                [232, 24],
            )  # fmt: skip

    @gluon.jit
    def _persistent_producer(
        QDesc, KDesc, VDesc, WorkOrder, KvCounts, KvFullCounts, KvIndices,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
        seq_q, seq_k, num_items, num_tiles, heads_per_wave,
        q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free,
        BLOCK_Q: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """One warp of a persistent program: for each of its work items the query tile (once both
        consumers released the previous one) and the K/V tiles, the ring running on across items."""
        step_base = 0
        local = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            tile_rank, batch_head = wave_item(item, heads_per_wave, num_tiles)
            batch, head, kv_head, row_start, n_steps, n_full, index_base = work_item(
                tile_rank, batch_head, WorkOrder, KvCounts, KvFullCounts, KvIndices,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
                BLOCK_Q, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            kv_row0 = (batch * (num_q_heads // group) + kv_head) * seq_k
            # The first wait passes at once: a fresh barrier counts as having completed phase -1.
            mbarrier.wait(q_free, (local & 1) ^ 1)
            mbarrier.expect(q_bar, QDesc.block_type.nbytes)
            tma.async_copy_global_to_shared(QDesc, [batch_head * seq_q + row_start, 0], q_bar, q_smem)
            _produce_kv(KDesc, VDesc, k_smem, v_smem, k_ready, v_ready, kv_free, index_base, n_steps, step_base,
                        kv_row0, BLOCK_K, BLOCK_N, STAGES)  # fmt: skip
            step_base += n_steps
            local += 1

    @gluon.jit
    def _persistent_consumer(
        Out, Lse, WorkOrder, KvCounts, KvFullCounts, KvIndices, stride_ob, stride_oh, stride_os,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
        seq_q, seq_k, qk_scale, num_items, num_tiles, heads_per_wave,
        q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free, BoxTable, box_guard,
        ROW_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_K: gl.constexpr,
        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr,
        EVEN_K: gl.constexpr, EVEN_Q: gl.constexpr, BOX: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup of a persistent program: :func:`_consume_item` for each of its work items."""
        step_base = 0
        local = 0
        for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
            tile_rank, batch_head = wave_item(item, heads_per_wave, num_tiles)
            batch, head, kv_head, row_start, n_steps, n_full, index_base = work_item(
                tile_rank, batch_head, WorkOrder, KvCounts, KvFullCounts, KvIndices,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
                BLOCK_Q, BLOCK_K, BLOCK_N,
            )  # fmt: skip
            out_base = Out + batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh
            lse_base = Lse + batch_head.to(gl.int64) * seq_q
            _consume_item(
                q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_free, q_free,
                index_base, n_steps, n_full, row_start, seq_q, seq_k, qk_scale, out_base, stride_os, lse_base,
                step_base, local & 1, BoxTable, box_guard,
                ROW_OFFSET, HEAD_DIM, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
            )  # fmt: skip
            step_base += n_steps
            local += 1

    @gluon.jit
    def _gluon_persistent_forward(
        Q, K, V, Out, Lse, KvCounts, KvFullCounts, KvIndices, WorkOrder,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os, stride_cb, stride_ch, stride_ib, stride_ih, stride_iq,
        num_q_heads, group, pattern_head_divisor, seq_q, seq_k, qk_scale, QDesc, KDesc, VDesc,
        num_items, num_tiles, heads_per_wave, BoxTable, box_guard,
        HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, EVEN_K: gl.constexpr, EVEN_Q: gl.constexpr,
        BOX: gl.constexpr,
    ):  # fmt: skip
        """Persistent: one program per SM walks work items ``pid, pid + grid, ...`` of the same
        order as the one-item kernel's grid (:func:`.tile_steps.wave_item`: waves of heads, each wave's
        query tiles heaviest first; no lead of heavy query blocks: the persistent kernel runs
        where rows are alike), so the producer loads an item's query and first K/V tiles while the consumers
        still finish and store the previous one. Host descriptors only."""
        q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free = _allocate_ring(
            Q.dtype.element_ty, HEAD_DIM, BLOCK_N, STAGES, 2
        )
        gl.warp_specialize(
            [
                (
                    _persistent_consumer,
                    (
                        Out, Lse, WorkOrder, KvCounts, KvFullCounts, KvIndices, stride_ob, stride_oh, stride_os,
                        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group,
                        pattern_head_divisor, seq_q, seq_k, qk_scale, num_items, num_tiles, heads_per_wave,
                        q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free, BoxTable, box_guard,
                        0, HEAD_DIM, BLOCK_Q, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
                    ),
                ),
                (
                    _persistent_consumer,
                    (
                        Out, Lse, WorkOrder, KvCounts, KvFullCounts, KvIndices, stride_ob, stride_oh, stride_os,
                        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group,
                        pattern_head_divisor, seq_q, seq_k, qk_scale, num_items, num_tiles, heads_per_wave,
                        q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free, BoxTable, box_guard,
                        64, HEAD_DIM, BLOCK_Q, BLOCK_K, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, EVEN_K, EVEN_Q, BOX,
                    ),
                ),
                (
                    _persistent_producer,
                    (
                        QDesc, KDesc, VDesc, WorkOrder, KvCounts, KvFullCounts, KvIndices,
                        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group,
                        pattern_head_divisor, seq_q, seq_k, num_items, num_tiles, heads_per_wave,
                        q_smem, k_smem, v_smem, q_bar, q_free, k_ready, v_ready, kv_free,
                        BLOCK_Q, BLOCK_K, BLOCK_N, STAGES,
                    ),
                ),
            ],
            [4, 1],
            [232, 24],
        )  # fmt: skip


def _box_mode(has_predicate: bool, seq_q: int, seq_k: int) -> int:
    """The kernels' ``BOX``: 0 without a box predicate; 2 (skip the steps a warpgroup's rows may not
    see) where each warpgroup's 64 rows are one group of the predicate's summaries (query rows
    start on a multiple of 64 in key positions) unless ``kernel_configs(rule_skip_steps=False)``;
    else 1."""
    if not has_predicate:
        return 0
    aligned = (seq_k - seq_q) % GROUP == 0
    return 2 if aligned and configs.current().rule_skip_steps is not False else 1


def _tall_tiles(q: torch.Tensor, pattern: BlockSparsePattern, plan: BlockSparsePlan, has_rule: bool) -> bool:
    """Whether to run 192-row query tiles over three consumer warpgroups (``CONSUMERS = 3``):
    asked for or :data:`TALL_TILES_BY_DEFAULT`, and a head_dim-64 pattern without a token rule,
    of key blocks a multiple of :data:`TALL_TILES_BLOCK_N`, that keeps every block (its lists
    then nest, as :func:`.tile_steps.dense_tile_item` needs)."""
    asked = configs.current().gluon_tall_tiles
    if not (TALL_TILES_BY_DEFAULT if asked is None else asked):
        return False
    # Key steps split pattern blocks, never span two (tile_steps' SUBTILES = BLOCK_K // BLOCK_N).
    whole_steps = pattern.block_k % TALL_TILES_BLOCK_N == 0
    return q.shape[-1] == 64 and not has_rule and plan.density == 1.0 and whole_steps


def _persistent(plan: BlockSparsePlan, waves: bool) -> bool:
    """Whether to run the persistent kernel (where launch-made descriptors apply): asked for with
    ``kernel_configs(gluon_persistent=...)``, else for light work items (mean kept blocks per query
    block up to 32, work bucket <= :data:`PERSISTENT_MAX_WORK_BUCKET`) of rows alike enough
    (:data:`PERSISTENT_MAX_ROW_IMBALANCE`) where the launch comes in several ``waves``."""
    asked = configs.current().gluon_persistent
    if asked is not None:
        return asked
    if plan.work_bucket > PERSISTENT_MAX_WORK_BUCKET:
        return False
    return not waves or plan.row_imbalance <= PERSISTENT_MAX_ROW_IMBALANCE


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def uses_host_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern) -> bool:
    """Whether the kernel reads through descriptors made once at launch (:func:`host_descriptors`)
    rather than per program on the device.

    Those cover the flattened ``(B*H*S, D)`` tensors, so they need contiguous ``(B, H, S, D)``
    inputs and whole key blocks (``seq_k`` a multiple of ``block_k``): a K/V tile then never
    reaches into the next head's rows. A last query tile may: the rows it reads past ``seq_q``
    are another head's queries, computed and never stored, which changes nothing. Overridden by
    ``kernel_configs(gluon_host_descriptors=...)`` (off, or on where possible).
    """
    asked = configs.current().gluon_host_descriptors
    if asked is False:
        return False
    return all(x.is_contiguous() for x in (q, k, v)) and k.shape[2] % pattern.block_k == 0


def host_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, q_rows: int = GLUON_BLOCK_M):
    """TMA descriptors over the flattened ``(B*H*S, D)`` query, key and value tensors, with the
    shared-memory layouts the kernel allocates (query boxes of ``q_rows`` rows: 128, or 64 for
    the tall tiles' three boxes; K/V tiles of ``block_n``)."""
    return flat_descriptor(q, q_rows), flat_descriptor(k, block_n), flat_descriptor(v, block_n)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool = False,
):
    """Block-sparse attention with the Gluon kernel (call only where :func:`unsupported_reason`
    returns ``None``). Shapes as in :func:`sparse_attn.block_sparse_attention`."""
    plan = plan_for(pattern, causal=causal)
    batch, q_heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    predicate_lists = plan.predicate_lists
    if predicate_lists is None:
        out, lse, args = launch_arguments(q, k, v, plan, scale=scale, return_lse=return_lse)
        box = (plan.full_counts, 0)  # unused without a rule
    else:
        lists = (predicate_lists.full_counts, predicate_lists.kv_indices)
        out, lse, args = launch_arguments(q, k, v, plan, scale=scale, return_lse=return_lse, lists=lists)
        box = (predicate_lists.predicate.words, predicate_lists.predicate.guard)
    # Tall tiles (:func:`_tall_tiles`): 192 rows in three 64-row query boxes, key steps of
    # TALL_TILES_BLOCK_N, no lead, no persistence.
    tall = _tall_tiles(q, pattern, plan, predicate_lists is not None)
    tile_rows = 192 if tall else GLUON_BLOCK_M
    block_n = TALL_TILES_BLOCK_N if tall else configs.gluon_block_n(pattern.block_k, rule=predicate_lists is not None)
    descriptors = None
    if uses_host_descriptors(q, k, v, pattern):
        descriptors = host_descriptors(q, k, v, block_n, q_rows=64 if tall else GLUON_BLOCK_M)
    constants = dict(
        HEAD_DIM=dim,
        BLOCK_Q=pattern.block_q,
        BLOCK_K=pattern.block_k,
        BLOCK_N=block_n,
        STAGES=configs.gluon_stages(dim, block_n),
        CAUSAL=bool(causal),
        WRITE_LSE=bool(return_lse),
        EVEN_K=seq_k % pattern.block_k == 0,
        EVEN_Q=seq_q % (tile_rows if tall else pattern.block_q) == 0,
        BOX=_box_mode(predicate_lists is not None, seq_q, seq_k),
    )
    if tall:
        grid = (batch * q_heads, num_blocks(seq_q, tile_rows))
    else:
        grid = (batch * q_heads, num_blocks(seq_q, pattern.block_q) * (pattern.block_q // GLUON_BLOCK_M))
    num_items = grid[0] * grid[1]
    order = (grid[1], heads_per_wave(q, k))  # query tiles per head, (batch, head) pairs per wave
    if descriptors is not None and not tall and _persistent(plan, waves=order[1] < grid[0]):
        programs = min(num_items, _multiprocessors(q.device))
        _gluon_persistent_forward[(programs,)](*args, *descriptors, num_items, *order, *box, **constants, num_warps=4)
    else:
        if descriptors is None:
            ensure_scratch_allocator()
        _gluon_block_sparse_forward[(num_items,)](
            *args,
            *(descriptors or (None, None, None)),
            *box,
            *order,
            0 if tall else lead_blocks(plan) * (pattern.block_q // GLUON_BLOCK_M),
            grid[0],
            HOST_DESC=descriptors is not None,
            CONSUMERS=3 if tall else 2,
            **constants,
            num_warps=4,
            **({"maxnreg": THREE_CONSUMER_MAXNREG} if tall else {}),
        )
    if return_lse:
        return out, lse
    return out


# This backend's backward takes delta= and dq_into= (backends.fusable_backward_module).
BACKWARD_TAKES_DELTA = True


def backward(q, k, v, out, lse, dout, dlse, plan, *, scale: float, delta=None, dq_into=None):
    """This backend's backward: the Triton backend's (:mod:`.triton_backward`) on this kernel's
    output and log-sum-exp, with its dK/dV and dQ passes in the warp-specialized Gluon kernels
    (:mod:`.gluon_backward`) where those are the default (head_dim 128 on Hopper, 16-bit, no
    token rule) unless ``kernel_configs(gluon_backward=...)`` says otherwise. ``delta`` and
    ``dq_into``: as :func:`.triton_backward.backward`'s."""
    return triton_backward.backward(
        q, k, v, out, lse, dout, dlse, plan, scale=scale, gluon_by_default=True, delta=delta, dq_into=dq_into
    )


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend cannot differentiate this case, or ``None``. Its ``backward`` is the
    Triton backend's (:mod:`.triton_backward`), run on this kernel's output and log-sum-exp."""
    return None
