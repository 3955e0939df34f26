"""Triton backward of block-sparse attention (FlashAttention-2's backward, block-sparse).

Three launches, all deterministic (no float atomics):

* ``_delta``: per query row, ``delta = rowsum(dO * O) - dLSE`` in float32 (``dLSE`` is the
  gradient of the returned log-sum-exp, zero when it was not returned or not used).
* ``_dkdv``: one program per (batch, KV head, key tile of ``BLOCK_N`` keys). It walks the
  *transposed* lists (per KV block, the query blocks that list it, built once in the plan)
  for every query head of its GQA group in turn, so dK and dV are summed over the group in
  registers, without expanding K/V and without atomics.
* ``_dq``: one program per (batch, query head, query tile), walking the forward lists.

Both grids are 1D, in the forward's launch order (:func:`.launch.heads_per_wave`): waves of a
few (batch, KV head) streams, so the programs in flight read the same heads' tiles from L2,
each wave's blocks heaviest first (dQ: the forward's work order; dK/dV: the transposed lists'),
after a lead of the heavy blocks of every stream (:func:`.launch.lead_blocks`: the query rows
and the key columns of text tokens beside a video).

Probabilities are recomputed from the forward's saved log-sum-exp (never recomputed as a
softmax): ``P = exp(S * scale - lse)``; ``dS = P * (dP - delta)``; ``dQ = scale * dS K``,
``dK = scale * dS^T Q``, ``dV = P^T dO``. Masks are those of the forward: keys past the end,
rows past the end and, in causal mode, keys after the query, and for a pattern with a token
rule (constexpr ``HAS_RULE``) its packed masks: each list entry's bitmask index rides beside
its block number (``dq``: the forward lists and :attr:`.plan.RuleBitmask.entry_index`;
``dkdv``: the transposed lists and their ``rule_index``), and an entry with index ``>= 0``
gets its mask (:mod:`.rule_bits`); a rule that is a box predicate (constexpr ``BOX_RULE``,
:mod:`sparse_attn.rule_predicate`) is evaluated arithmetically instead, and no bitmask is
built. The masks are evaluated only on tile pairs that can hide a pair (a row or key past the
end, a causal tile pair that straddles the diagonal, an entry with a bitmask, an entry the box
rule cuts: :func:`sparse_attn.plan.box_cut_index` rides beside the lists as the bitmask index
would), decided per step by a scalar test: the interior tiles of a causal pattern,
most of its tiles, skip the per-element comparisons and selects (on the H200 the backward at
32K / 128K took 3-10 % less time than with masks on every tile pair, commit 8dc8bd4), and the
loads go unmasked where the lengths fill whole blocks. Rows the rule leaves without keys have
``lse = -inf`` and output 0, so their probabilities, hence their gradients, are 0.
"""

from __future__ import annotations

import functools

import torch

from ..geometry import num_blocks
from ..plan import BlockSparsePlan, box_cut_index, rule_bitmask
from ..rule_predicate import kernel_predicate
from ..utils import dot_in_float32, interpreting, length_bucket
from . import configs, gluon_backward, launch
from .launch import LOG2_E, block_list_strides

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

if triton is not None:
    from .rule_bits import box_bounds, box_key_terms, box_match, box_visible, rule_allowed
    from .tile_steps import lead_wave_item

    @triton.jit
    def _delta(
        Out, DOut, DLse, Delta,
        stride_ob, stride_oh, stride_os,
        stride_db, stride_dh, stride_ds,
        num_heads, seq_q,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr,
    ):  # fmt: skip
        batch_head = tl.program_id(0)
        batch = batch_head // num_heads
        head = batch_head % num_heads
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        in_range = rows < seq_q
        o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        do_base = DOut + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
        o = tl.load(o_base + rows[:, None] * stride_os + offs_d[None, :], mask=in_range[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_ds + offs_d[None, :], mask=in_range[:, None], other=0.0)
        o, do = o.to(tl.float32), do.to(tl.float32)
        delta = tl.sum(o * do, 1)
        row_offset = batch_head.to(tl.int64) * seq_q + rows
        if HAS_DLSE:
            delta -= tl.load(DLse + row_offset, mask=in_range, other=0.0)
        tl.store(Delta + row_offset, delta, mask=in_range)

    @triton.jit
    def _load(pointers, in_range, UNMASKED: tl.constexpr):
        """``pointers``' values, zero where ``in_range`` is false unless every one is in range."""
        if UNMASKED:
            return tl.load(pointers)
        else:
            return tl.load(pointers, mask=in_range, other=0.0)

    @triton.jit
    def _dkdv(
        Q, K, V, DOut, Lse, Delta, DK, DV, QCounts, QIndices, RuleIndex, RuleWords, box_guard,
        stride_gb, stride_gh, stride_gs,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_db, stride_dh, stride_ds,
        stride_cb, stride_ch,
        stride_ib, stride_ih, stride_ik,
        num_q_heads, num_kv_heads, group, pattern_head_divisor,
        seq_q, seq_k, scale, qk_scale,
        seq_bucket,  # autotuning key only: ceil(log2(seq_k))
        n_blocks, per_wave,  # the launch order (lead_wave_item): KV blocks, (batch, KV head) pairs per wave,
        WorkOrder, lead_blocks, all_heads,  # KV blocks heaviest first, the heavy ones, (batch, KV head) pairs
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SKIP_MASKED: tl.constexpr,
        HAS_RULE: tl.constexpr, BOX_RULE: tl.constexpr,
        EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        TILES_PER_BLOCK: tl.constexpr = BLOCK_K // BLOCK_N
        rank, batch_head = lead_wave_item(
            tl.program_id(0), per_wave, n_blocks * TILES_PER_BLOCK, lead_blocks * TILES_PER_BLOCK, all_heads
        )
        # KV blocks in the transposed lists' work order (heaviest first), each cut into key tiles.
        kv_block = tl.load(WorkOrder + rank // TILES_PER_BLOCK)
        tile = kv_block * TILES_PER_BLOCK + rank % TILES_PER_BLOCK
        batch = batch_head // num_kv_heads
        kv_head = batch_head % num_kv_heads
        key_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_in_range = key_pos < seq_k
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offset = seq_k - seq_q

        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        k = _load(k_base + key_pos[:, None] * stride_ks + offs_d[None, :], key_in_range[:, None], EVEN_K)
        v = _load(v_base + key_pos[:, None] * stride_vs + offs_d[None, :], key_in_range[:, None], EVEN_K)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        first_key = tile * BLOCK_N
        block_keys = (tile % TILES_PER_BLOCK) * BLOCK_N + tl.arange(0, BLOCK_N)  # inside the KV block
        key_code = 0
        key_keep = 0
        key_want = 0
        if BOX_RULE:
            key_code, key_keep, key_want = box_key_terms(RuleWords, seq_k, key_pos, box_guard)

        for member in range(group):
            head = kv_head * group + member
            pattern_head = head // pattern_head_divisor
            count = tl.load(QCounts + batch * stride_cb + pattern_head * stride_ch + kv_block)
            list_offset = batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + kv_block * stride_ik
            index_base = QIndices + list_offset
            rule_base = RuleIndex + list_offset  # same shape and strides as QIndices
            q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
            do_base = DOut + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
            row_base = (batch.to(tl.int64) * num_q_heads + head) * seq_q
            for step in range(0, count * (BLOCK_Q // BLOCK_M)):
                q_block = tl.load(index_base + step // (BLOCK_Q // BLOCK_M))
                first_row = q_block * BLOCK_Q + (step % (BLOCK_Q // BLOCK_M)) * BLOCK_M
                # In causal mode a query tile that ends before this key tile starts sees none of it:
                # SKIP_MASKED skips it, at the price of a branch around the loads (which keeps
                # Triton from software-pipelining the loop); otherwise its masked products add zeros.
                if (not SKIP_MASKED) or (first_row + BLOCK_M - 1 + offset >= first_key * CAUSAL):
                    rows = first_row + offs_m
                    row_in_range = rows < seq_q
                    q = _load(q_base + rows[:, None] * stride_qs + offs_d[None, :], row_in_range[:, None], EVEN_Q)
                    do = _load(do_base + rows[:, None] * stride_ds + offs_d[None, :], row_in_range[:, None], EVEN_Q)
                    lse = _load(Lse + row_base + rows, row_in_range, EVEN_Q) * 1.4426950408889634
                    delta = _load(Delta + row_base + rows, row_in_range, EVEN_Q)
                    if DOT_FP32:
                        q = q.to(tl.float32)
                        do = do.to(tl.float32)
                    scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (N, M)
                    logits = scores_t * qk_scale - lse[None, :]
                    # Masks only where a pair may be hidden (see the module docstring).
                    needs_mask = (first_row + BLOCK_M > seq_q) | (first_key + BLOCK_N > seq_k)
                    if CAUSAL:
                        needs_mask = needs_mask | (first_key + BLOCK_N - 1 > first_row + offset)
                    if HAS_RULE or BOX_RULE:  # a bitmask row, or (box) whether the rule cuts the entry
                        entry = tl.load(rule_base + step // (BLOCK_Q // BLOCK_M))
                        needs_mask = needs_mask | (entry >= 0)
                    if needs_mask:
                        if BOX_RULE:
                            # The fused test (keys past seq_k included), transposed: keys are rows here.
                            low, high = box_bounds(RuleWords, seq_k, rows + offset, row_in_range)
                            visible = box_match(
                                key_code[:, None], key_keep[:, None], key_want[:, None], low[None, :], high[None, :],
                                box_guard,
                            )  # fmt: skip
                            visible = visible & row_in_range[None, :]
                        else:
                            visible = key_in_range[:, None] & row_in_range[None, :]
                        if CAUSAL:
                            visible = visible & (key_pos[:, None] <= rows[None, :] + offset)
                        if HAS_RULE:
                            block_rows = first_row - q_block * BLOCK_Q + offs_m
                            visible = visible & rule_allowed(
                                RuleWords, entry, block_rows[None, :], block_keys[:, None], BLOCK_Q, BLOCK_K
                            )
                        logits = tl.where(visible, logits, float("-inf"))
                    p_t = tl.math.exp2(logits)
                    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
                    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                    ds_t = p_t * (dp_t - delta[None, :])
                    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)

        # dK and dV are contiguous tensors of one shape: one set of strides.
        gradient_offset = batch.to(tl.int64) * stride_gb + kv_head.to(tl.int64) * stride_gh
        gradient_rows = key_pos[:, None] * stride_gs + offs_d[None, :]
        tl.store(DK + gradient_offset + gradient_rows, (dk * scale).to(DK.dtype.element_ty), mask=key_in_range[:, None])
        tl.store(DV + gradient_offset + gradient_rows, dv.to(DV.dtype.element_ty), mask=key_in_range[:, None])

    @triton.jit
    def _dq(
        Q, K, V, DOut, Lse, Delta, DQ, KvCounts, KvIndices, RuleIndex, RuleWords, box_guard,
        stride_gb, stride_gh, stride_gs,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_db, stride_dh, stride_ds,
        stride_cb, stride_ch,
        stride_ib, stride_ih, stride_iq,
        num_q_heads, group, pattern_head_divisor,
        seq_q, seq_k, scale, qk_scale,
        seq_bucket,  # autotuning key only: ceil(log2(seq_k))
        n_blocks, per_wave,  # the launch order (lead_wave_item): query blocks, (batch, head) pairs per wave,
        WorkOrder, lead_blocks, all_heads,  # the forward's work order, its heavy blocks, (batch, head) pairs
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SKIP_MASKED: tl.constexpr,
        HAS_RULE: tl.constexpr, BOX_RULE: tl.constexpr,
        EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, ACCUMULATE: tl.constexpr = False,
    ):  # fmt: skip
        """``ACCUMULATE``: add this pass's dQ to the values ``DQ`` holds instead of storing it (one
        program per query tile: no other program writes its rows)."""
        TILES_PER_BLOCK: tl.constexpr = BLOCK_Q // BLOCK_M
        rank, batch_head = lead_wave_item(
            tl.program_id(0), per_wave, n_blocks * TILES_PER_BLOCK, lead_blocks * TILES_PER_BLOCK, all_heads
        )
        # Query blocks in the forward's work order (heaviest first), each cut into query tiles.
        q_block = tl.load(WorkOrder + rank // TILES_PER_BLOCK)
        tile = q_block * TILES_PER_BLOCK + rank % TILES_PER_BLOCK
        batch = batch_head // num_q_heads
        head = batch_head % num_q_heads
        kv_head = head // group
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in_range = rows < seq_q
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        offset = seq_k - seq_q

        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DOut + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_in_range[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_ds + offs_d[None, :], mask=row_in_range[:, None], other=0.0)
        row_offset = batch_head.to(tl.int64) * seq_q + rows
        lse = tl.load(Lse + row_offset, mask=row_in_range, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + row_offset, mask=row_in_range, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

        pattern_head = head // pattern_head_divisor
        count = tl.load(KvCounts + batch * stride_cb + pattern_head * stride_ch + q_block)
        list_offset = batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + q_block * stride_iq
        index_base = KvIndices + list_offset
        rule_base = RuleIndex + list_offset  # same shape and strides as KvIndices
        block_rows = (tile % (BLOCK_Q // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)  # inside the query block
        last_query = tile * BLOCK_M + BLOCK_M - 1 + offset
        first_query = tile * BLOCK_M + offset  # the key position the tile's first row sees last
        rows_past_end = tile * BLOCK_M + BLOCK_M > seq_q
        box_low = 0
        box_high = 0
        if BOX_RULE:
            box_low, box_high = box_bounds(RuleWords, seq_k, rows + offset, row_in_range)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        SUBTILES: tl.constexpr = BLOCK_K // BLOCK_N
        for step in range(0, count * SUBTILES):
            kv_block = tl.load(index_base + step // SUBTILES)
            first_key = kv_block * BLOCK_K + (step % SUBTILES) * BLOCK_N
            if (not SKIP_MASKED) or (first_key * CAUSAL <= last_query):
                key_pos = first_key + offs_n
                key_in_range = key_pos < seq_k
                k = _load(k_base + key_pos[:, None] * stride_ks + offs_d[None, :], key_in_range[:, None], EVEN_K)
                v = _load(v_base + key_pos[:, None] * stride_vs + offs_d[None, :], key_in_range[:, None], EVEN_K)
                if DOT_FP32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (M, N)
                logits = scores * qk_scale - lse[:, None]
                needs_mask = rows_past_end | (first_key + BLOCK_N > seq_k)
                if CAUSAL:
                    needs_mask = needs_mask | (first_key + BLOCK_N - 1 > first_query)
                if HAS_RULE or BOX_RULE:  # a bitmask row, or (box) whether the rule cuts the entry
                    entry = tl.load(rule_base + step // SUBTILES)
                    needs_mask = needs_mask | (entry >= 0)
                if needs_mask:
                    if BOX_RULE:  # the fused test hides keys past seq_k too
                        visible = box_visible(RuleWords, seq_k, key_pos, box_low, box_high, box_guard)
                        visible = visible & row_in_range[:, None]
                    else:
                        visible = key_in_range[None, :] & row_in_range[:, None]
                    if CAUSAL:
                        visible = visible & (key_pos[None, :] <= rows[:, None] + offset)
                    if HAS_RULE:
                        block_keys = (step % SUBTILES) * BLOCK_N + offs_n
                        visible = visible & rule_allowed(
                            RuleWords, entry, block_rows[:, None], block_keys[None, :], BLOCK_Q, BLOCK_K
                        )
                    logits = tl.where(visible, logits, float("-inf"))
                p = tl.math.exp2(logits)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

        dq_base = DQ + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
        dq_rows = dq_base + rows[:, None] * stride_gs + offs_d[None, :]
        dq = dq * scale
        if ACCUMULATE:
            dq += tl.load(dq_rows, mask=row_in_range[:, None], other=0.0).to(tl.float32)
        tl.store(dq_rows, dq.to(DQ.dtype.element_ty), mask=row_in_range[:, None])


_KERNELS = {"dkdv": _dkdv, "dq": _dq} if triton is not None else {}


@functools.cache
def _autotuned(kind: str, tiles: tuple):
    """The ``kind`` pass (``"dkdv"`` or ``"dq"``) autotuned over ``tiles`` (see :func:`.configs.backward_tiles`)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    kernel = _KERNELS[kind]
    return triton.autotune(
        configs=configs,
        # Tuning runs the pass several times: dQ accumulated into a caller's buffer is restored.
        restore_value=["DQ"] if kind == "dq" else None,
        key=[
            "seq_bucket",
            "HEAD_DIM",
            "BLOCK_Q",
            "BLOCK_K",
            "CAUSAL",
            "PRECISION",
            "SKIP_MASKED",
            "HAS_RULE",
            "BOX_RULE",
            "EVEN_Q",
            "EVEN_K",
        ],
    )(kernel)


def backward(q, k, v, out, lse, dout, dlse, plan: BlockSparsePlan, *, scale: float, gluon_by_default: bool = False,
             delta: torch.Tensor | None = None, dq_into: torch.Tensor | None = None):  # fmt: skip
    """``(dq, dk, dv)`` of block-sparse attention over ``plan``'s pattern, in the inputs' dtypes
    and shapes (dK/dV summed over each GQA group).

    ``out`` and ``lse`` are the forward's output and natural-log log-sum-exp (float32
    ``(B, Hq, Sq)``), ``dout`` the output's gradient, ``dlse`` the log-sum-exp's gradient or
    ``None``. Gradients come from :func:`.launch.allocate`. ``gluon_by_default``: the forward ran
    the Gluon backend, so the Gluon passes run where they are the default
    (:func:`.gluon_backward.wanted`); ``kernel_configs(gluon_backward=...)`` overrides it.

    For a caller that fuses several attentions' backward (:mod:`sparse_attn.nn.nsa_fused`):
    ``delta``, float32 ``(B, Hq, Sq)`` contiguous, is ``rowsum(dout * out) - dlse`` computed
    already (``out`` and ``dlse`` are then not read); ``dq_into``, a tensor of q's shape and dtype,
    receives q's gradient added to what it holds (the Triton dQ pass adds it in its store), and is
    returned as ``dq``.
    """
    pattern, causal = plan.pattern, plan.causal
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q, k, v, out, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, out, dout))
    # Through the module, so tests that poison launch.allocate poison the gradient buffers too.
    dq, dk, dv = (launch.allocate(x.shape, x.dtype, x.device) for x in (q, k, v))
    lse = lse.contiguous()
    check_fused_arguments(q, delta, dq_into)
    if delta is None:
        delta = row_delta(out, dout, dlse)

    is_float32 = q.dtype == torch.float32
    use_float32_dot = dot_in_float32(q.dtype)
    # A token rule: as a box predicate where it offers one (no bitmask built), else as bitmasks.
    predicate = kernel_predicate(pattern)
    bitmask = None if predicate is not None else rule_bitmask(pattern)
    constants = dict(
        HEAD_DIM=dim,
        BLOCK_Q=pattern.block_q,
        BLOCK_K=pattern.block_k,
        CAUSAL=bool(causal),
        DOT_FP32=use_float32_dot,
        PRECISION="ieee" if use_float32_dot else "tf32",
        SKIP_MASKED=configs.backward_skips_masked_tiles(),
        HAS_RULE=bitmask is not None,
        BOX_RULE=predicate is not None,
        # Lengths that fill whole blocks: no tile runs past an end, so the loads go unmasked.
        EVEN_Q=seq_q % pattern.block_q == 0,
        EVEN_K=seq_k % pattern.block_k == 0,
    )
    # (batch, head, sequence) strides of q, k, v and dout, in the kernels' argument order.
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    q_counts, q_indices = plan.transposed.q_counts, plan.transposed.q_indices
    counts, indices = pattern.kv_counts.contiguous(), pattern.kv_indices.contiguous()
    guard = 0
    if predicate is not None:  # evaluated on the entries the rule cuts only
        q_rule_index, rule_index = plan.transposed.rule_index, box_cut_index(pattern)
        words, guard = predicate.table, predicate.guard
    elif bitmask is None:
        q_rule_index = rule_index = words = q_counts  # unused without a rule
    else:
        q_rule_index, rule_index, words = plan.transposed.rule_index, bitmask.entry_index, bitmask.words
    sizes = (seq_q, seq_k, scale, scale * LOG2_E, length_bucket(seq_k))
    per_wave = launch.heads_per_wave(q, k)  # (batch, query head) pairs; dK/dV takes their streams
    dkdv_args = (
        *(q, k, v, dout, lse, delta, dk, dv, q_counts, q_indices, q_rule_index, words, guard),
        *dk.stride()[:3],
        *strides,
        *block_list_strides(q_counts, q_indices, pattern.batch),
        *(q_heads, kv_heads, group, q_heads // pattern.num_heads),
        *sizes,
        *(pattern.num_kv_blocks, per_wave // group),
        *(plan.transposed.work_order, launch.lead_blocks(plan, keys=True), batch * kv_heads),
    )
    dq_args = (
        *(q, k, v, dout, lse, delta, dq, counts, indices, rule_index, words, guard),
        *dq.stride()[:3],
        *strides,
        *block_list_strides(counts, indices, pattern.batch),
        *(q_heads, group, q_heads // pattern.num_heads),
        *sizes,
        *(pattern.num_q_blocks, per_wave),
        *(plan.work_order, launch.lead_blocks(plan), batch * q_heads),
    )

    def dkdv_grid(meta):
        return (batch * kv_heads * pattern.num_kv_blocks * (pattern.block_k // meta["BLOCK_N"]),)

    def dq_grid(meta):
        return (batch * q_heads * pattern.num_q_blocks * (pattern.block_q // meta["BLOCK_M"]),)

    # Passes the Gluon kernels should take (asked through kernel_configs, or by default) run there.
    in_gluon = gluon_backward.run_passes(
        *(q, k, v, dout, lse, delta, {"dkdv": (dk, dv), "dq": (dq,)}, plan),
        scale=scale,
        orders={  # the launch orders of the Triton passes: the last three arguments of each
            "dkdv": (pattern.num_kv_blocks, per_wave // group, *dkdv_args[-3:]),
            "dq": (pattern.num_q_blocks, per_wave, *dq_args[-3:]),
        },
        has_rule=bitmask is not None,
        by_default=gluon_by_default,
        predicate=predicate,
    )
    passes = [entry for entry in (("dkdv", dkdv_grid, dkdv_args), ("dq", dq_grid, dq_args)) if entry[0] not in in_gluon]
    if dq_into is not None and "dq" not in in_gluon:  # the Triton dQ pass adds into the caller's buffer
        dq_args = (*dq_args[:6], dq_into, *dq_args[7:])
        passes = [(kind, grid, dq_args if kind == "dq" else args) for kind, grid, args in passes]
    extra = {"dq": {"ACCUMULATE": dq_into is not None}, "dkdv": {}}
    if interpreting():
        tiles = dict(BLOCK_M=min(pattern.block_q, 32), BLOCK_N=min(pattern.block_k, 16))
        for kind, grid, args in passes:
            _KERNELS[kind][grid(tiles)](*args, **tiles, **constants, **extra[kind])
    else:
        small = is_float32 or dim > 128
        for kind, grid, args in passes:
            tiles = configs.backward_tiles(kind, dim, pattern.block_q, pattern.block_k, small=small)
            _autotuned(kind, tiles)[grid](*args, **constants, **extra[kind])
    if dq_into is not None:
        if "dq" in in_gluon:
            dq_into.add_(dq)
        dq = dq_into
    return dq, dk, dv


def check_fused_arguments(q: torch.Tensor, delta: torch.Tensor | None, dq_into: torch.Tensor | None) -> None:
    """``delta`` and ``dq_into`` of a fused backward (see :func:`backward`): contiguous, of the
    shapes and dtypes the kernels index them by."""
    rows = (*q.shape[:3],)
    if delta is not None and (delta.shape != rows or delta.dtype != torch.float32 or not delta.is_contiguous()):
        raise ValueError(f"delta must be a contiguous float32 tensor of shape {rows}, got {delta.dtype} "
                         f"{tuple(delta.shape)}")  # fmt: skip
    if dq_into is not None and (dq_into.shape != q.shape or dq_into.dtype != q.dtype or not dq_into.is_contiguous()):
        raise ValueError(f"dq_into must be a contiguous {q.dtype} tensor of q's shape {tuple(q.shape)}, got "
                         f"{dq_into.dtype} {tuple(dq_into.shape)}")  # fmt: skip


def row_delta(out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """float32 ``(B, H, Sq)``: ``rowsum(dout * out) - dlse`` per query row (``dlse`` ``None``: no term),
    by the ``_delta`` kernel."""
    batch, heads, seq_q, dim = out.shape
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=out.device)
    dlse = dlse.contiguous() if dlse is not None else None
    delta_block = 64
    _delta[(batch * heads, num_blocks(seq_q, delta_block))](
        *(out, dout, dlse if dlse is not None else delta, delta),
        *out.stride()[:3],
        *dout.stride()[:3],
        *(heads, seq_q),
        HEAD_DIM=dim,
        BLOCK=delta_block,
        HAS_DLSE=dlse is not None,
    )
    return delta
