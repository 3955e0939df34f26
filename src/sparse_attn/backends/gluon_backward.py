"""Gluon passes of the block-sparse backward for Hopper (sm_90), warp-specialized.

The Triton backward (:mod:`.triton_backward`) runs seven products per (query tile, key tile)
pair in two passes (dK/dV, then dQ) and leaves the schedule to the compiler. This module offers
both passes as kernels that write the schedule of FlashAttention-3's backward (Shah et al.,
2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision",
sections 3.1 and B.1: producer/consumer warp specialization, the probabilities fed to the next
product from registers) by hand in Gluon, for the plan's block lists.

**dK/dV** (:func:`dkdv`, four products):

* one program per (batch, KV head, tile of 128 keys), in the Triton pass's launch order (the
  transposed lists' work order, :func:`.tile_steps.lead_wave_item`);
* a producer warp loads the key and value tiles once, then, for every query head of the GQA
  group and every query block that lists this KV block, TMA loads of 64-row tiles of Q and dO
  into a ring of ``STAGES`` slots (one "ready" barrier with both transactions, one count-2
  "free" barrier released by the consumers); in causal mode it skips the tiles that end before
  the key tile starts, exactly as the consumers do;
* two consumer warpgroups, each owning 64 of the 128 keys, compute per step
  ``S^T = K Q^T`` and ``dP^T = V dO^T`` (both A operands from shared memory, issued together),
  ``P^T = exp2(S^T * scale * log2(e) - lse)`` (the causal mask only on tiles straddling the
  diagonal), ``dS^T = P^T (dP^T - delta)``, then ``dV += P^T dO`` (issued before dS is formed)
  and ``dK += dS^T Q`` with ``P^T`` and ``dS^T`` as register A operands, awaited before the slot
  is released (no intra-warpgroup pipelining yet: the overlap is between the two warpgroups);
  dK/dV are summed over the group in registers (no atomics, deterministic);
* ``lse`` and ``delta`` (float32, per query row) are read by the consumers with plain loads.

**dQ** (:func:`dq`, three products): one program per (batch, query head, tile of 128 rows) in
the forward's work order; the producer loads the Q and dO tiles once and the K and V tiles of
every listed block, 64 keys per step, into a ring of ``DQ_STAGES``; each consumer warpgroup owns
64 rows: ``S = Q K^T`` and ``dP = dO V^T`` together, ``P``, ``dS = P (dP - delta)``, then
``dQ += dS K`` with ``dS`` from registers. No atomics.

**Wide steps** (``kernel_configs(gluon_backward_wide_steps=True)``; off by default: measured no faster).
Both score products of a step (``S^T``/``dP^T`` in dK/dV, ``S``/``dP`` in dQ) take both operands
from shared memory. As 64 x 64 wgmma tiles they read 1/16 byte of it per multiply-add: at the
tensor cores' full rate (about 2,000 multiply-adds a clock per SM on an H100, by arithmetic) that
is all of the 128 bytes a clock its shared memory delivers; 64 x 128 tiles read 1/21. Wide steps
make them 64 x 128 tiles: 128 query rows a dK/dV step (constexpr ``STEP_M``; head_dim 64 only,
where the two float32 score tiles and the two gradient accumulators fit the consumer's registers:
at 128 ptxas spills about 2.4 KB, and about 1 KB with a box predicate, which keeps 64-row steps)
and 128 keys a dQ step (``STEP_N``). In the wide dK/dV step dS is formed before either gradient
product is issued, so the float32 tiles die before both operands are held (40 bytes of spills
instead of 112 with whole blocks). Shallower rings (:data:`WIDE_STAGES`, :data:`DQ_WIDE_STAGES`)
hold the larger tiles. GPU tests passed (H100, thirty-eighth session: GQA, Sq < Sk, ragged lengths,
256-blocks, causal or not). Forward + backward on one H100 (32K, 32/8 heads, random causal
patterns, ``benchmarks/results/h100/training_bwd_variants_s58.json``): at head_dim 64 the two
Gluon passes took 4.49 against 4.75 ms at density 0.1 with wide steps but 9.39 against 8.55 at
0.2 (the Triton passes, the default there: 4.66 and 8.55); at head_dim 128 (wide dQ steps only)
7.26 / 13.65 against 7.29 / 12.91 ms, within the run-to-run spread. Not a gain either way, so off.

**Fused dQ: tried and removed** (thirty-eighth session). The dK/dV pass also computed each step's
share of dQ, ``dS K`` over its 64 keys, added to a float32 buffer with atomics (five products per
tile pair instead of seven, no dQ pass; head_dim 64, where the consumers had registers to spare;
commits 0c9eae3 and 12378ab keep the code). On one H100 forward + backward at 32K, head_dim 64,
32/8 heads, took 6.27 and 11.16 ms at densities 0.1 and 0.2 against 4.75 and 8.55 for the two
Gluon passes (``benchmarks/results/h100/training_bwd_variants_s58.json``): the dQ product, its
shared-memory round trip of ``dS^T`` and the atomics cost the dK/dV pass more than the whole dQ
pass. Its GPU test also found dQ wrong without the causal mask at ragged key lengths (keys past
``seq_k`` entered the dQ sum). As at head_dim 128 (the twenty-seventh session's attempt, commit
7401911, docs/h200.md), the two passes stay.

**Token rules.** A rule that is a box predicate (:mod:`sparse_attn.rule_predicate`: the exact
windows of ``neighborhood``, NSA's sliding window) is evaluated in both passes (constexpr
``BOX``) on every step, as the Triton passes do: the dK/dV consumers load their 64 key codes once
and each step's rows' packed bounds, the dQ consumers their rows' bounds once and each key tile's
codes; the pairs it hides get probability 0. They take such patterns when asked
(``kernel_configs(gluon_backward=...)``), not by default (:data:`BOX_BY_DEFAULT`: measured no
faster). Rules read as bitmasks stay with the Triton passes.

**Ragged lengths.** Lengths need not be multiples of the blocks (constexprs ``EVEN_Q`` /
``EVEN_K`` off): a ragged last tile reads the next head's rows (or TMA's zero fill past the
tensor), and those rows get probability 0 (rows past ``seq_q``: log-sum-exp read as +inf and
masked; keys past ``seq_k`` in the dQ pass: masked) and are never stored; dK/dV skip 64-row
steps wholly past ``seq_q``. Since the thirty-fourth session they take such lengths by default
too; tested against the reference on an H100, timed there only with a box rule (Wan 2.1's
75,600 tokens, see :data:`BOX_BY_DEFAULT`).

The delta pass stays the Triton one. Scope (:func:`cannot_run_reason`): compute capability 9.x,
float16/bfloat16, head_dim 64 or 128, no token rule other than a box predicate, ``block_q`` a
multiple of 64 (128 for the dQ pass) and ``block_k`` of 128, contiguous q/k/v/dO (the
descriptors cover the flattened ``(B*H*S, D)`` tensors); elsewhere the Triton pass runs, with a
warning where they were asked for. They run by default after the Gluon forward (``backend="gluon"``,
or ``"auto"`` where it picks Gluon) at head_dim 128 (:data:`DEFAULT_HEAD_DIMS`), where the
twenty-seventh session measured them faster (forward + backward 109.5 against 126.7 ms at 128K /
0.1, 13.1 against 14.9 at 32K / 0.2; 32/8 heads, bf16, random causal patterns,
``benchmarks/results/h200/training_gluon_backward_s47.json``), and leave the Triton passes quietly
where they cannot take the case; at head_dim 64 they were level or slower and run only when asked
(``kernel_configs(gluon_backward=True)``, or ``"dkdv"`` / ``"dq"`` for one pass;
``gluon_backward=False`` keeps the Triton passes everywhere). Their gradients equalled the Triton
passes' bit for bit in those runs (the same products summed in the same order). At head_dim 128
ptxas spills 84 bytes per dK/dV consumer thread (200 before the thirty-sixth session made the
step's row offsets in the loop rather than hoisting 16 registers of them; 212 with ragged lengths),
none at head_dim 64 and none in the dQ kernel. The change timed level (one H100, two rounds each,
forward + backward at head_dim 128: 32K 7.31-7.32 / 12.91-13.04 ms against 7.29-7.39 /
13.06-13.07 at densities 0.1 / 0.2, 128K 107.1-110.9 / 202.3-219.0 against 105.7-110.9 /
209.0-220.8; ``benchmarks/results/h100/dkdv_row_offsets_*_s58.json``).
"""

from __future__ import annotations

import warnings

import torch

from ..plan import BlockSparsePlan
from ..rule_predicate import BoxPredicate
from ..utils import device_capability, interpreting
from . import configs
from .gluon_lang import gl, gluon, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from .launch import LOG2_E, block_list_strides, flat_descriptor

BLOCK_M = 64  # query rows per step (the N of the transposed score products)
BLOCK_N = 128  # keys per program, 64 per consumer warpgroup
STAGES = {64: 4, 128: 3}  # ring depth per head_dim: Q and dO tiles of 8 / 16 KiB each, beside 32 / 64 KiB of K and V
# The dQ pass's K/V ring: 64-key tiles of 8 / 16 KiB each, beside 32 / 64 KiB of Q and dO.
DQ_STAGES = {64: 6, 128: 4}
# Wide steps (kernel_configs(gluon_backward_wide_steps=True)): 128 query rows a dK/dV step and
# 128 keys a dQ step instead of 64, so the two score products (both operands from shared memory)
# run as 64 x 128 wgmma tiles rather than 64 x 64; ring depths per head_dim for those tiles.
# On sm_90a (tests/backends/test_gluon_backward.py) the wide dK/dV step spills 40 bytes a
# consumer thread at head_dim 64 (causal, whole blocks; up to 348 with ragged lengths), about
# 1 KB with a box predicate and 2.4 KB at head_dim 128, so it runs at head_dim 64 without a box
# predicate only; the wide dQ step spills none at 64 and 40 bytes at 128. Off: on an H100 they were
# no faster (training_bwd_variants_s58.json; see the module docstring).
WIDE_STAGES = {64: 4}
DQ_WIDE_STAGES = {64: 4, 128: 2}
WIDE_STEPS_BY_DEFAULT = False


def step_rows(kind: str, head_dim: int, block_q: int, box: bool) -> int:
    """Query rows a dK/dV step (``kind="dkdv"``) or keys a dQ step (``"dq"``) takes: 128 for wide
    steps (asked for, or :data:`WIDE_STEPS_BY_DEFAULT`) where they fit (:data:`WIDE_STAGES`,
    :data:`DQ_WIDE_STAGES`; a dK/dV step within the pattern's query blocks and without a ``box``
    predicate), else 64."""
    asked = configs.current().gluon_backward_wide_steps
    if not (WIDE_STEPS_BY_DEFAULT if asked is None else asked):
        return 64
    if kind == "dkdv":
        return 128 if head_dim in WIDE_STAGES and block_q % 128 == 0 and not box else 64
    return 128 if head_dim in DQ_WIDE_STAGES else 64


# Head dims where the two passes run by default after the Gluon forward: at 128 they took forward
# + backward from 126.7 to 109.5 ms at 128K / 0.1 and from 14.9 to 13.1 ms at 32K / 0.2; at 64
# they were level or slower (2.74 against 2.63 ms at 32K / 0.05; twenty-seventh session,
# ``benchmarks/results/h200/training_gluon_backward_s47.json``).
DEFAULT_HEAD_DIMS = (128,)
# Whether patterns whose token rule is a box predicate take the Gluon passes by default (they
# always do when asked). Off: on one H100 (thirty-fourth session,
# ``benchmarks/results/h100/nsa_box_prep_ab_s54.json``) the Gluon passes were not faster there:
# NSA's 64K window branch forward + backward 17.60 ms against 16.75 with the Triton passes (the
# box test raises the dK/dV consumer's spills from 200 to 408 bytes), a 2048^2 image with
# 7 x 7 windows 4.33-4.35 against 4.32, Wan 2.1's 75,600 tokens 67.2-67.3 against 68.4-68.5.
BOX_BY_DEFAULT = False

if gluon is not None:
    from .tile_steps import lead_wave_item, work_item

    @gluon.jit
    def _steps_of(QCounts, QIndices, batch, kv_head, member, kv_block,
                  stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor,
                  SUB: gl.constexpr):  # fmt: skip
        """Query head ``member`` of the group: its head index, its tile count and list base."""
        head = kv_head * group + member
        pattern_head = head // pattern_head_divisor
        count = gl.load(QCounts + batch * stride_cb + pattern_head * stride_ch + kv_block)
        base = QIndices + batch.to(gl.int64) * stride_ib + pattern_head * stride_ih + kv_block * stride_ik
        return head, count * SUB, base

    @gluon.jit
    def _box_visible(code, keep, want, low, high, guard):
        """The box predicate's fused test (:func:`sparse_attn.rule_predicate.box_visible`) on
        operands already broadcast against each other: per key ``code`` / ``keep`` / ``want``,
        per query row ``low`` and ``high`` (the upper bounds with the guard bits already set)."""
        return (((code | guard) - low) & (high - code) & keep) == want

    @gluon.jit
    def _takes_step(
        first_row, key_start, offset, seq_q, CAUSAL: gl.constexpr, EVEN_Q: gl.constexpr, STEP_M: gl.constexpr
    ):
        """Whether the dK/dV pass computes the ``STEP_M`` query rows from ``first_row`` against the
        128 keys from ``key_start`` (the producer and the consumers skip the same steps)."""
        takes = True
        if CAUSAL:
            takes = first_row + (STEP_M - 1) + offset >= key_start
        if not EVEN_Q:
            takes = takes & (first_row < seq_q)
        return takes

    @gluon.jit
    def _first_row(base, step, BLOCK_Q: gl.constexpr, SUB: gl.constexpr, STEP_M: gl.constexpr):
        q_block = gl.load(base + step // SUB)
        return q_block * BLOCK_Q + (step % SUB) * STEP_M

    @gluon.constexpr_function
    def _scores_layout(columns):
        """The wgmma accumulator layout of a warpgroup's 64 x ``columns`` score tiles."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 16])

    @gluon.constexpr_function
    def _gradient_layout(head_dim):
        """The wgmma accumulator layout of a warpgroup's 64 x ``head_dim`` gradient tile."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, head_dim, 16])

    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr):
        """``(once, ready, free)``: the barrier of the tiles loaded once, and the ring's "ready"
        (one arrival: the producer's transactions) and "free" barriers (two: both consumer
        warpgroups release a slot), initialised."""
        once = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(once, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(free.index(i), count=2)
        return once, ready, free

    @gluon.jit
    def _producer(
        q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, free,
        QCounts, QIndices, batch, kv_head, kv_block, key_start, kv_row0, num_q_heads, seq_q, offset,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor,
        BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, EVEN_Q: gl.constexpr,
        STEP_M: gl.constexpr,
    ):  # fmt: skip
        """One warp: the K and V tiles once, then Q and dO tiles of every listed query tile."""
        SUB: gl.constexpr = BLOCK_Q // STEP_M
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + key_start, 0], kv_bar, k_smem)
        tma.async_copy_global_to_shared(v_desc, [kv_row0 + key_start, 0], kv_bar, v_smem)
        ring = 0
        for member in range(group):
            head, n_steps, base = _steps_of(
                QCounts, QIndices, batch, kv_head, member, kv_block,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor, SUB,
            )  # fmt: skip
            row0 = (batch * num_q_heads + head) * seq_q
            for step in range(n_steps):
                first_row = _first_row(base, step, BLOCK_Q, SUB, STEP_M)
                # Causal: a query tile that ends before the key tile starts sees none of it; a
                # step's tile wholly past seq_q (in a ragged last block) has no rows.
                if _takes_step(first_row, key_start, offset, seq_q, CAUSAL, EVEN_Q, STEP_M):
                    slot = ring % STAGES
                    # A fresh barrier counts as having completed the phase before phase 0.
                    mbarrier.wait(free.index(slot), ((ring // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(
                        q_desc, [row0 + first_row, 0], ready.index(slot), q_smem.index(slot)
                    )
                    tma.async_copy_global_to_shared(
                        do_desc, [row0 + first_row, 0], ready.index(slot), do_smem.index(slot)
                    )
                    ring += 1

    @gluon.jit
    def _consumer(
        q_smem, do_smem, k_smem, v_smem, kv_bar, ready, free, Lse, Delta, DK, DV,
        QCounts, QIndices, batch, kv_head, kv_block, key_start, kv_row0, num_q_heads, seq_q, offset,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor, scale, qk_scale,
        seq_k, BoxTable, box_guard,
        ROW_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, BOX: gl.constexpr, EVEN_Q: gl.constexpr, EVEN_K: gl.constexpr,
        STEP_M: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup: dK and dV of keys ``key_start + ROW_OFFSET`` to ``+ 64`` over every step
        of ``STEP_M`` query rows.

        ``BOX``: the pattern's token rule is a box predicate (:mod:`sparse_attn.rule_predicate`),
        tested on every step: the warpgroup's 64 key codes (row 0 of ``BoxTable``) loaded once,
        each step's query rows' packed bounds (rows 1 and 2) per step."""
        SUB: gl.constexpr = BLOCK_Q // STEP_M
        st_layout: gl.constexpr = _scores_layout(STEP_M)
        acc_layout: gl.constexpr = _gradient_layout(HEAD_DIM)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        dtype: gl.constexpr = q_smem.dtype
        k_half = k_smem.slice(ROW_OFFSET, 64)
        v_half = v_smem.slice(ROW_OFFSET, 64)
        key_pos = key_start + ROW_OFFSET + gl.arange(0, 64, layout=gl.SliceLayout(1, st_layout))
        dk = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
        key_code = 0
        key_keep = 0
        if BOX:
            # A key every query sees (code < 0) keeps no guard bit, so its test always holds.
            # Keys past seq_k (a ragged last block) are computed and never stored.
            if EVEN_K:
                key_code = gl.load(BoxTable + key_pos)
            else:
                key_code = gl.load(BoxTable + key_pos, mask=key_pos < seq_k, other=0)
            key_keep = gl.where(key_code < 0, 0, box_guard)
        mbarrier.wait(kv_bar, 0)
        ring = 0
        for member in range(group):
            head, n_steps, base = _steps_of(
                QCounts, QIndices, batch, kv_head, member, kv_block,
                stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor, SUB,
            )  # fmt: skip
            row_base = (batch * num_q_heads + head).to(gl.int64) * seq_q
            for step in range(n_steps):
                first_row = _first_row(base, step, BLOCK_Q, SUB, STEP_M)
                if _takes_step(first_row, key_start, offset, seq_q, CAUSAL, EVEN_Q, STEP_M):
                    slot = ring % STAGES
                    rows = first_row + gl.arange(0, STEP_M, layout=gl.SliceLayout(0, st_layout))
                    mbarrier.wait(ready.index(slot), (ring // STAGES) & 1)
                    st_zero = gl.zeros([64, STEP_M], gl.float32, st_layout)
                    q_t = q_smem.index(slot).permute((1, 0))
                    do_t = do_smem.index(slot).permute((1, 0))
                    s_token = warpgroup_mma(k_half, q_t, st_zero, use_acc=False, is_async=True)
                    dp_token = warpgroup_mma(v_half, do_t, st_zero, use_acc=False, is_async=True)
                    if EVEN_Q:
                        lse = gl.load(Lse + row_base + rows) * 1.4426950408889634
                    else:
                        # Rows past seq_q (another head's queries, read by the tile): probability 0.
                        lse = gl.load(Lse + row_base + rows, mask=rows < seq_q, other=float("inf"))
                        lse = lse * 1.4426950408889634
                    s_t = warpgroup_mma_wait(1, deps=(s_token,))
                    logits = s_t * qk_scale - lse[None, :]
                    if not EVEN_Q:
                        if first_row + STEP_M > seq_q:
                            logits = gl.where((rows < seq_q)[None, :], logits, float("-inf"))
                    if CAUSAL:
                        if key_start + 127 > first_row + offset:  # the tile pair straddles the diagonal
                            visible = key_pos[:, None] <= rows[None, :] + offset
                            logits = gl.where(visible, logits, float("-inf"))
                    if BOX:
                        if EVEN_Q:
                            low = gl.load(BoxTable + seq_k + offset + rows)
                            high = gl.load(BoxTable + 2 * seq_k + offset + rows) | box_guard
                        else:
                            low = gl.load(BoxTable + seq_k + offset + rows, mask=rows < seq_q, other=0)
                            high = gl.load(BoxTable + 2 * seq_k + offset + rows, mask=rows < seq_q, other=0)
                            high = high | box_guard
                        keep = key_keep[:, None]
                        visible = _box_visible(key_code[:, None], keep, keep, low[None, :], high[None, :], box_guard)
                        logits = gl.where(visible, logits, float("-inf"))
                    p_t = gl.exp2(logits)
                    if EVEN_Q:
                        delta = gl.load(Delta + row_base + rows)
                    else:
                        delta = gl.load(Delta + row_base + rows, mask=rows < seq_q, other=0.0)
                    if STEP_M == 64:
                        p_op = gl.convert_layout(p_t.to(dtype), op_layout)
                        # dV's product runs while dS is formed.
                        dv = warpgroup_mma(p_op, do_smem.index(slot), dv, is_async=True)
                        dp_t = warpgroup_mma_wait(1, deps=(dp_token,))
                        ds_op = gl.convert_layout((p_t * (dp_t - delta[None, :])).to(dtype), op_layout)
                    else:
                        # 64 x 128 score tiles: dS is formed before either product is issued, so
                        # the float32 P^T and dP^T are dead before the two operands are held.
                        dp_t = warpgroup_mma_wait(0, deps=(dp_token,))
                        ds_t = p_t * (dp_t - delta[None, :])
                        p_op = gl.convert_layout(p_t.to(dtype), op_layout)
                        ds_op = gl.convert_layout(ds_t.to(dtype), op_layout)
                        dv = warpgroup_mma(p_op, do_smem.index(slot), dv, is_async=True)
                    dk = warpgroup_mma(ds_op, q_smem.index(slot), dk, is_async=True)
                    dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))
                    mbarrier.arrive(free.index(slot), count=1)
                    ring += 1
        out_rows = key_start + ROW_OFFSET + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
        out_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        offsets = (kv_row0 + out_rows).to(gl.int64)[:, None] * HEAD_DIM + out_cols[None, :]
        if EVEN_K:
            gl.store(DK + offsets, (dk * scale).to(dtype))
            gl.store(DV + offsets, dv.to(dtype))
        else:
            # Keys past seq_k are the next head's (or TMA's zero fill): not stored.
            in_range = (out_rows < seq_k)[:, None]
            gl.store(DK + offsets, (dk * scale).to(dtype), mask=in_range)
            gl.store(DV + offsets, dv.to(dtype), mask=in_range)

    @gluon.jit
    def _gluon_dkdv(
        QDesc, DODesc, KDesc, VDesc, Lse, Delta, DK, DV, QCounts, QIndices,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_ik,
        num_q_heads, num_kv_heads, group, pattern_head_divisor, seq_q, seq_k, scale, qk_scale,
        n_blocks, per_wave, WorkOrder, lead_blocks, all_heads, BoxTable, box_guard,
        HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, BOX: gl.constexpr, EVEN_Q: gl.constexpr, EVEN_K: gl.constexpr,
        STEP_M: gl.constexpr,
    ):  # fmt: skip
        """One program per (batch, KV head, 128-key tile), in the Triton dK/dV pass's order, over
        steps of ``STEP_M`` (64 or 128) query rows."""
        TILES: gl.constexpr = BLOCK_K // 128
        rank, batch_head = lead_wave_item(gl.program_id(0), per_wave, n_blocks * TILES, lead_blocks * TILES, all_heads)
        kv_block = gl.load(WorkOrder + rank // TILES)
        key_start = (kv_block * TILES + rank % TILES) * 128
        batch = batch_head // num_kv_heads
        kv_head = batch_head % num_kv_heads
        kv_row0 = batch_head * seq_k
        offset = seq_k - seq_q
        dtype: gl.constexpr = DK.dtype.element_ty
        row_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([STEP_M, HEAD_DIM], dtype)
        key_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, STEP_M, HEAD_DIM], row_layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, STEP_M, HEAD_DIM], row_layout)
        k_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], key_layout)
        v_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], key_layout)
        kv_bar, ready, free = _ring_barriers(STAGES)
        gl.warp_specialize(
            [
                (
                    _consumer,
                    (q_smem, do_smem, k_smem, v_smem, kv_bar, ready, free, Lse, Delta, DK, DV,
                     QCounts, QIndices, batch, kv_head, kv_block, key_start, kv_row0, num_q_heads, seq_q, offset,
                     stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor, scale,
                     qk_scale, seq_k, BoxTable, box_guard, 0, HEAD_DIM, BLOCK_Q, STAGES, CAUSAL, BOX, EVEN_Q, EVEN_K,
                     STEP_M),
                ),
                (
                    _consumer,
                    (q_smem, do_smem, k_smem, v_smem, kv_bar, ready, free, Lse, Delta, DK, DV,
                     QCounts, QIndices, batch, kv_head, kv_block, key_start, kv_row0, num_q_heads, seq_q, offset,
                     stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor, scale,
                     qk_scale, seq_k, BoxTable, box_guard, 64, HEAD_DIM, BLOCK_Q, STAGES, CAUSAL, BOX, EVEN_Q, EVEN_K,
                     STEP_M),
                ),
                (
                    _producer,
                    (QDesc, DODesc, KDesc, VDesc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, free,
                     QCounts, QIndices, batch, kv_head, kv_block, key_start, kv_row0, num_q_heads, seq_q, offset,
                     stride_cb, stride_ch, stride_ib, stride_ih, stride_ik, group, pattern_head_divisor,
                     BLOCK_Q, STAGES, CAUSAL, EVEN_Q, STEP_M),
                ),
            ],
            [4, 1],
            [248, 24],
        )  # fmt: skip

    @gluon.jit
    def _dq_producer(
        q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_bar, ready, free,
        index_base, n_steps, q_row, kv_row0,
        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, STEP_N: gl.constexpr,
    ):  # fmt: skip
        """One warp: the 128-row Q and dO tiles once, then K and V tiles of every listed block."""
        SUB: gl.constexpr = BLOCK_K // STEP_N
        mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        tma.async_copy_global_to_shared(do_desc, [q_row, 0], q_bar, do_smem)
        for step in range(n_steps):
            slot = step % STAGES
            kv_block = gl.load(index_base + step // SUB)
            key_start = kv_block * BLOCK_K + (step % SUB) * STEP_N
            mbarrier.wait(free.index(slot), ((step // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + key_start, 0], ready.index(slot), k_smem.index(slot))
            tma.async_copy_global_to_shared(v_desc, [kv_row0 + key_start, 0], ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _dq_consumer(
        q_smem, do_smem, k_smem, v_smem, q_bar, ready, free, Lse, Delta, DQ,
        index_base, n_steps, row_start, row_base, seq_q, seq_k, scale, qk_scale, BoxTable, box_guard,
        ROW_OFFSET: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, BOX: gl.constexpr, EVEN_Q: gl.constexpr, EVEN_K: gl.constexpr,
        STEP_N: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup: dQ of rows ``row_start + ROW_OFFSET`` to ``+ 64`` over every listed key
        tile, ``STEP_N`` keys a step.

        ``BOX``: a box-predicate token rule, tested on every step: the rows' packed bounds loaded
        once, each key tile's codes per step."""
        SUB: gl.constexpr = BLOCK_K // STEP_N
        s_layout: gl.constexpr = _scores_layout(STEP_N)
        acc_layout: gl.constexpr = _gradient_layout(HEAD_DIM)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        dtype: gl.constexpr = q_smem.dtype
        q = q_smem.slice(ROW_OFFSET, 64)
        do = do_smem.slice(ROW_OFFSET, 64)
        rows = row_start + ROW_OFFSET + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
        keys = gl.arange(0, STEP_N, layout=gl.SliceLayout(0, s_layout))
        query_pos = rows + (seq_k - seq_q)
        if EVEN_Q:
            lse = gl.load(Lse + row_base + rows) * 1.4426950408889634
            delta = gl.load(Delta + row_base + rows)
        else:
            # Rows past seq_q (another head's queries, read by the tile) are computed with
            # probability 0 and never stored.
            lse = gl.load(Lse + row_base + rows, mask=rows < seq_q, other=float("inf")) * 1.4426950408889634
            delta = gl.load(Delta + row_base + rows, mask=rows < seq_q, other=0.0)
        box_low = 0
        box_high = 0
        if BOX:
            box_low = gl.load(BoxTable + seq_k + query_pos, mask=rows < seq_q, other=0)
            box_high = gl.load(BoxTable + 2 * seq_k + query_pos, mask=rows < seq_q, other=0) | box_guard
        dq = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(q_bar, 0)
        for step in range(n_steps):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            s_zero = gl.zeros([64, STEP_N], gl.float32, s_layout)
            s_token = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp_token = warpgroup_mma(do, v_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_token,))
            logits = s * qk_scale - lse[:, None]
            if CAUSAL or BOX or not EVEN_K:
                kv_block = gl.load(index_base + step // SUB)
                key_start = kv_block * BLOCK_K + (step % SUB) * STEP_N
                if CAUSAL:
                    if key_start + (STEP_N - 1) > row_start + ROW_OFFSET + (seq_k - seq_q):  # straddles the diagonal
                        visible = (key_start + keys)[None, :] <= query_pos[:, None]
                        logits = gl.where(visible, logits, float("-inf"))
                if BOX:
                    if EVEN_K:
                        code = gl.load(BoxTable + key_start + keys)
                        keep = gl.where(code < 0, 0, box_guard)
                        want = keep
                    else:
                        # The fused test (rule_predicate.box_visible) also hides keys past seq_k.
                        in_range = key_start + keys < seq_k
                        code = gl.load(BoxTable + key_start + keys, mask=in_range, other=0)
                        keep = gl.where(code < 0, 0, box_guard)
                        want = gl.where(in_range, keep, box_guard | 1)
                    visible = _box_visible(
                        code[None, :], keep[None, :], want[None, :], box_low[:, None], box_high[:, None], box_guard
                    )
                    logits = gl.where(visible, logits, float("-inf"))
                elif not EVEN_K:
                    # Keys past seq_k are the next head's (or TMA's zero fill): hidden.
                    if key_start + STEP_N > seq_k:
                        logits = gl.where((key_start + keys < seq_k)[None, :], logits, float("-inf"))
            p = gl.exp2(logits)
            dp = warpgroup_mma_wait(0, deps=(dp_token,))
            ds_op = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), op_layout)
            dq = warpgroup_mma(ds_op, k_smem.index(slot), dq, is_async=True)
            dq, ds_op = warpgroup_mma_wait(0, deps=(dq, ds_op))
            mbarrier.arrive(free.index(slot), count=1)
        out_rows = row_start + ROW_OFFSET + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
        out_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        offsets = (row_base + out_rows)[:, None] * HEAD_DIM + out_cols[None, :]
        if EVEN_Q:
            gl.store(DQ + offsets, (dq * scale).to(dtype))
        else:
            gl.store(DQ + offsets, (dq * scale).to(dtype), mask=(out_rows < seq_q)[:, None])

    @gluon.jit
    def _gluon_dq(
        QDesc, DODesc, KDesc, VDesc, Lse, Delta, DQ, KvCounts, KvIndices,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq,
        num_q_heads, group, pattern_head_divisor, seq_q, seq_k, scale, qk_scale,
        n_blocks, per_wave, WorkOrder, lead_blocks, all_heads, BoxTable, box_guard,
        HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, BOX: gl.constexpr, EVEN_Q: gl.constexpr, EVEN_K: gl.constexpr,
        STEP_N: gl.constexpr,
    ):  # fmt: skip
        """One program per (batch, query head, 128-row query tile), in the Triton dQ pass's order,
        over steps of ``STEP_N`` (64 or 128) keys."""
        TILES: gl.constexpr = BLOCK_Q // 128
        rank, batch_head = lead_wave_item(gl.program_id(0), per_wave, n_blocks * TILES, lead_blocks * TILES, all_heads)
        # The forward's work-item placement with STEP_N-key steps (no full-block counts: KvCounts twice).
        batch, head, kv_head, row_start, n_steps, _, index_base = work_item(
            rank, batch_head, WorkOrder, KvCounts, KvCounts, KvIndices,
            stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
            BLOCK_Q, BLOCK_K, STEP_N,
        )  # fmt: skip
        row_base = batch_head.to(gl.int64) * seq_q
        kv_row0 = (batch * (num_q_heads // group) + kv_head) * seq_k
        dtype: gl.constexpr = DQ.dtype.element_ty
        row_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, HEAD_DIM], dtype)
        key_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([STEP_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], row_layout)
        do_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], row_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, STEP_N, HEAD_DIM], key_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, STEP_N, HEAD_DIM], key_layout)
        q_bar, ready, free = _ring_barriers(STAGES)
        gl.warp_specialize(
            [
                (
                    _dq_consumer,
                    (q_smem, do_smem, k_smem, v_smem, q_bar, ready, free, Lse, Delta, DQ,
                     index_base, n_steps, row_start, row_base, seq_q, seq_k, scale, qk_scale, BoxTable, box_guard,
                     0, HEAD_DIM, BLOCK_K, STAGES, CAUSAL, BOX, EVEN_Q, EVEN_K, STEP_N),
                ),
                (
                    _dq_consumer,
                    (q_smem, do_smem, k_smem, v_smem, q_bar, ready, free, Lse, Delta, DQ,
                     index_base, n_steps, row_start, row_base, seq_q, seq_k, scale, qk_scale, BoxTable, box_guard,
                     64, HEAD_DIM, BLOCK_K, STAGES, CAUSAL, BOX, EVEN_Q, EVEN_K, STEP_N),
                ),
                (
                    _dq_producer,
                    (QDesc, DODesc, KDesc, VDesc, q_smem, do_smem, k_smem, v_smem, q_bar, ready, free,
                     index_base, n_steps, batch_head * seq_q + row_start, kv_row0, BLOCK_K, STAGES, STEP_N),
                ),
            ],
            [4, 1],
            [232, 40],
        )  # fmt: skip


def cannot_run_reason(q, k, v, dout, plan: BlockSparsePlan, *, has_rule: bool, kind: str = "dkdv") -> str | None:
    """Why the Gluon ``kind`` pass (``"dkdv"`` or ``"dq"``) cannot take this case (the Triton
    pass does), or ``None``. ``has_rule``: the pattern has a token rule the kernels would read
    as bitmasks (a box predicate is not one: the passes evaluate it)."""
    pattern = plan.pattern
    if gluon is None:
        return "Gluon is not available in this Triton"
    if interpreting():
        return "Gluon kernels do not run under the Triton interpreter"
    if q.device.type != "cuda" or device_capability(q.device)[0] != 9:
        return "the Gluon backward needs a Hopper GPU (compute capability 9.x)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Gluon backward takes float16/bfloat16, got {q.dtype}"
    if q.shape[-1] not in STAGES:
        return f"the Gluon backward takes head_dim 64 or 128, got {q.shape[-1]}"
    if has_rule:
        return "patterns with a token rule that is not a box predicate take the Triton backward"
    if pattern.block_q % BLOCK_M or pattern.block_k % BLOCK_N:
        return f"the Gluon backward needs block_q % 64 == 0 and block_k % 128 == 0, got {pattern.block_q} x {pattern.block_k}"
    if kind == "dq" and pattern.block_q % 128:
        return f"the Gluon dQ pass needs block_q a multiple of 128, got {pattern.block_q}"
    if not all(x.is_contiguous() for x in (q, k, v, dout)):
        return "the Gluon backward needs contiguous q, k, v and output gradient"
    return None


def wanted(kind: str, *, head_dim: int, by_default: bool) -> str | None:
    """Whether the backward's ``kind`` pass (``"dkdv"`` or ``"dq"``) should try its Gluon kernel:
    ``"asked"`` under ``kernel_configs(gluon_backward=True)`` or ``=kind``; ``"default"`` when no
    override is set, the forward ran the Gluon backend (``by_default``) and ``head_dim`` is one
    where the Gluon passes were measured faster (:data:`DEFAULT_HEAD_DIMS`); else ``None``
    (``gluon_backward=False`` keeps the Triton passes everywhere)."""
    asked = configs.current().gluon_backward
    if asked is None:
        return "default" if by_default and head_dim in DEFAULT_HEAD_DIMS else None
    return "asked" if asked is True or asked == kind else None


def run_passes(q, k, v, dout, lse, delta, gradients: dict, plan: BlockSparsePlan, *, scale, orders: dict, has_rule,
               by_default: bool, predicate: BoxPredicate | None = None):  # fmt: skip
    """Run the backward passes Gluon should take (:func:`wanted`) that can take this case, into
    ``gradients[kind]`` (``{"dkdv": (dk, dv), "dq": (dq,)}``) with the Triton passes' launch
    ``orders[kind]``; returns the kinds run. ``has_rule``: a token rule read as bitmasks (the
    passes decline it); ``predicate``: the pattern's token rule as a box predicate, which they
    evaluate. A pass asked for (``kernel_configs``) that cannot
    run warns (once per reason) and is left to the Triton backward; one chosen by default
    (``by_default``: the forward ran the Gluon backend) that cannot run is left to it quietly."""
    done = set()
    for kind, name, run in (("dkdv", "dK/dV", dkdv), ("dq", "dQ", dq)):
        choice = wanted(kind, head_dim=q.shape[-1], by_default=by_default)
        if not choice or (choice == "default" and predicate is not None and not BOX_BY_DEFAULT):
            continue
        reason = cannot_run_reason(q, k, v, dout, plan, has_rule=has_rule, kind=kind)
        if reason is None:
            run(q, k, v, dout, lse, delta, *gradients[kind], plan, scale=scale, order=orders[kind], predicate=predicate)
            done.add(kind)
        elif choice == "asked":
            warnings.warn(
                f"kernel_configs(gluon_backward=...): the Triton {name} pass runs instead ({reason})", stacklevel=3
            )
    return done


def dkdv(q, k, v, dout, lse, delta, dk, dv, plan: BlockSparsePlan, *, scale: float, order: tuple,
         predicate: BoxPredicate | None = None) -> None:  # fmt: skip
    """Fill ``dk`` and ``dv`` (contiguous, the shapes of k and v) with the Gluon pass.

    ``order``: the Triton pass's launch order, ``(n_blocks, per_wave, work_order, lead_blocks,
    all_heads)``; ``predicate``: the pattern's token rule as a box predicate, or ``None``. Call
    only where :func:`cannot_run_reason` returns ``None``."""
    pattern = plan.pattern
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    q_counts, q_indices = plan.transposed.q_counts, plan.transposed.q_indices
    grid = (batch * kv_heads * pattern.num_kv_blocks * (pattern.block_k // BLOCK_N),)
    step_m = step_rows("dkdv", dim, pattern.block_q, predicate is not None)
    _gluon_dkdv[grid](
        *(
            flat_descriptor(q, step_m),
            flat_descriptor(dout, step_m),
            flat_descriptor(k, BLOCK_N),
            flat_descriptor(v, BLOCK_N),
        ),
        *(lse, delta, dk, dv, q_counts, q_indices),
        *block_list_strides(q_counts, q_indices, pattern.batch),
        *(q_heads, kv_heads, q_heads // kv_heads, q_heads // pattern.num_heads, seq_q, seq_k, scale, scale * LOG2_E),
        *order,
        *_box_arguments(predicate, q_counts),
        HEAD_DIM=dim,
        BLOCK_Q=pattern.block_q,
        BLOCK_K=pattern.block_k,
        STAGES=(WIDE_STAGES if step_m == 128 else STAGES)[dim],
        CAUSAL=bool(plan.causal),
        BOX=predicate is not None,
        EVEN_Q=seq_q % pattern.block_q == 0,
        EVEN_K=seq_k % pattern.block_k == 0,
        STEP_M=step_m,
        num_warps=4,
    )


def dq(q, k, v, dout, lse, delta, dq_out, plan: BlockSparsePlan, *, scale: float, order: tuple,
       predicate: BoxPredicate | None = None) -> None:  # fmt: skip
    """Fill ``dq_out`` (contiguous, q's shape) with the Gluon dQ pass.

    ``order``: the Triton dQ pass's launch order, ``(n_blocks, per_wave, work_order, lead_blocks,
    all_heads)``; ``predicate`` as for :func:`dkdv`. Call only where :func:`cannot_run_reason`
    (``kind="dq"``) returns ``None``."""
    pattern = plan.pattern
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    counts, indices = pattern.kv_counts.contiguous(), pattern.kv_indices.contiguous()
    grid = (batch * q_heads * pattern.num_q_blocks * (pattern.block_q // 128),)
    step_n = step_rows("dq", dim, pattern.block_q, predicate is not None)
    _gluon_dq[grid](
        *(flat_descriptor(q, 128), flat_descriptor(dout, 128), flat_descriptor(k, step_n), flat_descriptor(v, step_n)),
        *(lse, delta, dq_out, counts, indices),
        *block_list_strides(counts, indices, pattern.batch),
        *(q_heads, q_heads // kv_heads, q_heads // pattern.num_heads, seq_q, seq_k, scale, scale * LOG2_E),
        *order,
        *_box_arguments(predicate, counts),
        HEAD_DIM=dim,
        BLOCK_Q=pattern.block_q,
        BLOCK_K=pattern.block_k,
        STAGES=(DQ_WIDE_STAGES if step_n == 128 else DQ_STAGES)[dim],
        CAUSAL=bool(plan.causal),
        BOX=predicate is not None,
        EVEN_Q=seq_q % pattern.block_q == 0,
        EVEN_K=seq_k % pattern.block_k == 0,
        STEP_N=step_n,
        num_warps=4,
    )


def _box_arguments(predicate: BoxPredicate | None, placeholder: torch.Tensor) -> tuple:
    """``(BoxTable, box_guard)`` of the kernels: the predicate's table and guard bits, or an unused
    int32 tensor and 0 without one."""
    return (placeholder, 0) if predicate is None else (predicate.table, predicate.guard)
