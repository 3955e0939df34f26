"""Triton backend: the portable block-sparse FlashAttention forward (any NVIDIA GPU).

One program computes one tile of ``BLOCK_M`` query rows of one query head. Programs take the
query blocks in the plan's work order (heaviest first) and walk only the KV blocks their list
names, with the online softmax of FlashAttention-2: first the blocks every row sees in full
(the plan's full counts: no mask work), then the partial ones (diagonal blocks and sequence
tails) with the causal / bounds mask. When the key (query) length is a whole number of pattern
blocks, no bounds masks are built on key (query) loads and stores at all. GQA is resolved by
index (query head ``h`` reads KV head ``h // group``), so K and V are never expanded. Pattern
blocks may be larger than the kernel tiles: a query block is split over several programs and
a KV block over several inner iterations.

Token rules (a :class:`~sparse_attn.masked_pattern.MaskedPattern` with ``token_rule``; constexpr
``HAS_RULE``): the plan packs the rule of every entry it cuts into per-block bitmasks and
reorders each list so the entries every row sees whole lead (:attr:`.plan.BlockSparsePlan.rule_lists`).
The unmasked run is unchanged; in the masked run each slot's bitmask index is loaded beside its
block number and, for an index ``>= 0``, the mask words (:mod:`.rule_bits`) join the causal /
bounds mask. Rows the rule leaves without keys give output 0 and LSE ``-inf``. Without a rule
the kernel is compiled with ``HAS_RULE=False`` and is the whole-block kernel it always was.

Tiles are read through pointers (K either row-wise or column-wise), or through TMA tensor
descriptors (constexpr ``USE_TMA``; an autotune axis for 16-bit inputs on compute capability
>= 9 with 16-byte aligned addresses and strides, see :mod:`.configs`). The descriptors are
made on the device (``tl.make_tensor_descriptor``), one per (batch, head) for Q, K and V with
that head's sequence length as the row bound, so TMA returns zeros for rows past the end and
the masks stay those of the pointer path. Device-side rather than host-side
(``triton.tools.tensor_descriptor.TensorDescriptor``) descriptors because their block shape
follows the autotuned ``BLOCK_M`` / ``BLOCK_N`` inside the kernel (a host descriptor's block
shape is fixed when it is built, so every config would need a pre-hook rewriting the shared
argument), the kernel signature and the pointer path stay as they are (no descriptor arguments
to build, even where descriptors are not allowed), and any (B, H, S, D) strides, including the
(B, S, H, D) storage transformers passes, work with one 2-D descriptor per head. The price:
each program writes its descriptors (128 bytes each) to global scratch from Triton's allocator,
which the launcher installs when none is set (:mod:`.launch`), and fences them before use.

Autotuning: tile candidates and load modes from :mod:`.configs` (overridable there), keyed by
``ceil(log2(seq_k))`` and the plan's work bucket, so long or dense cases do not reuse a
short or sparse tuning. On Hopper ``auto`` prefers the warp-specialized :mod:`.gluon` kernel
where it applies; ``backend="triton"`` always runs this one.

Under ``TRITON_INTERPRET=1`` (CPU tests) one small tile configuration runs instead of the
autotuned set, and bf16 products are taken in float32 because the interpreter's bf16
``dot`` is wrong; the GPU path is tested separately (``pytest -m gpu``).
"""

from __future__ import annotations

import functools

import torch

from ..geometry import num_blocks
from ..pattern import BlockSparsePattern
from ..plan import plan_for
from ..utils import device_capability, interpreting, length_bucket
from . import configs
from .launch import (
    descriptor_compatible,
    ensure_scratch_allocator,
    heads_per_wave,
    launch_arguments,
    lead_blocks,
    mode_constants,
)
from .triton_backward import backward  # noqa: F401  (this backend's backward entry point)

# This backend's backward takes delta= and dq_into= (backends.fusable_backward_module).
BACKWARD_TAKES_DELTA = True

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

name = "triton"


def input_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why no Triton kernel of this package (block or token-granular) can take these inputs
    (Triton, device, dtype, head_dim), or ``None``."""
    if triton is None:
        return "triton is not installed (pip install 'sparse-attn[triton]')"
    if q.device.type != "cuda" and not interpreting():
        return f"the Triton kernel needs a CUDA device (got {q.device.type}; set TRITON_INTERPRET=1 to interpret it on CPU)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel takes float16, bfloat16 or float32, not {q.dtype}"
    dim = q.shape[-1]
    if dim not in (16, 32, 64, 128, 256):
        return f"the Triton kernel takes head_dim 16, 32, 64, 128 or 256, not {dim}"
    return None


def block_tile_unsupported_reason(q: torch.Tensor, pattern, kind: type, kernel: str, blocks: tuple) -> str | None:
    """Why a kernel whose tile is the pattern block (``kernel``, e.g. "the skipping kernel") cannot
    run ``pattern``: not a ``kind`` pattern, inputs no Triton kernel takes, or a block size outside
    ``blocks``; ``None`` when it can."""
    if not isinstance(pattern, kind):
        return f"{kernel} runs {kind.__name__} lists only"
    reason = input_unsupported_reason(q)
    if reason is not None:
        return reason
    for block_name in ("block_q", "block_k"):
        block = getattr(pattern, block_name)
        if block not in blocks:
            return f"{kernel} takes {block_name} in {blocks} (its tile is the pattern block), got {block}"
    return None


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str | None:
    """Why the Triton kernel cannot run this case, or ``None`` when it can."""
    reason = input_unsupported_reason(q)
    if reason is not None:
        return reason
    for block_name in ("block_q", "block_k"):
        block = getattr(pattern, block_name)
        if block < 16 or block & (block - 1):
            return f"the Triton kernel needs {block_name} to be a power of two >= 16, got {block}"
    return None


if triton is not None:
    from .rule_bits import box_bounds, box_visible, rule_allowed
    from .tile_steps import lead_wave_item, store_rows

    @triton.jit
    def _attend_blocks(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        index_base,
        first_slot,
        last_slot,
        stride_ks,
        stride_vs,
        query_pos,
        seq_k,
        qk_scale,
        offs_n,
        offs_d,
        RuleWords,
        rule_base,
        block_rows,
        box_low,
        box_high,
        box_guard,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        K_TRANSPOSED: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_TMA: tl.constexpr,
        HAS_RULE: tl.constexpr,
        BOX_RULE: tl.constexpr,
    ):
        """Online-softmax update over the KV blocks in slots ``[first_slot, last_slot)``.

        ``EVEN_K``: the key length is a multiple of the pattern's KV block, so no listed key
        lies past the end and masked blocks need only the causal mask.

        ``HAS_RULE`` (masked slots only): the pattern has a token rule; ``rule_base`` points at
        the slots' bitmask indices (:mod:`.rule_bits`), ``block_rows`` are the tile's rows
        inside the query block. Rule-cut entries are never in the unmasked run (the plan puts
        them after the whole ones).

        ``BOX_RULE`` (masked slots only): the rule is a box predicate; ``RuleWords`` is then its
        ``(3, seq_k)`` table and ``box_low`` / ``box_high`` the rows' packed bounds (:mod:`.rule_bits`);
        it applies to every masked slot (the plan puts the entries it does not cut first).

        ``USE_TMA``: ``k_base`` and ``v_base`` are tensor descriptors (``tl.make_tensor_descriptor``
        over this KV head's ``(seq_k, HEAD_DIM)`` rows) instead of pointers; ``stride_ks``,
        ``stride_vs``, ``offs_d`` and ``K_TRANSPOSED`` are then unused.
        """
        SUBTILES: tl.constexpr = BLOCK_K // BLOCK_N
        for step in range(first_slot * SUBTILES, last_slot * SUBTILES):
            kv_block = tl.load(index_base + step // SUBTILES)
            key_start = kv_block * BLOCK_K + (step % SUBTILES) * BLOCK_N
            key_pos = key_start + offs_n
            if USE_TMA:
                # k_base / v_base are (seq_k, HEAD_DIM) tensor descriptors: rows at or past
                # seq_k come back as zeros, and the score mask below hides those keys.
                if MASKED and not EVEN_K:
                    in_bounds = key_pos < seq_k
                k_tile = tl.trans(k_base.load([key_start, 0]))
                v = v_base.load([key_start, 0])
            else:
                # K is read either as (N, D) rows and transposed in registers, or directly as a
                # (D, N) tile; which one is faster depends on the tile shape (autotuned).
                k_rows = k_base + key_pos[:, None] * stride_ks + offs_d[None, :]
                k_columns = k_base + key_pos[None, :] * stride_ks + offs_d[:, None]
                v_rows = v_base + key_pos[:, None] * stride_vs + offs_d[None, :]
                if MASKED and not EVEN_K:
                    in_bounds = key_pos < seq_k
                    if K_TRANSPOSED:
                        k_tile = tl.load(k_columns, mask=in_bounds[None, :], other=0.0)
                    else:
                        k_tile = tl.trans(tl.load(k_rows, mask=in_bounds[:, None], other=0.0))
                    v = tl.load(v_rows, mask=in_bounds[:, None], other=0.0)
                else:
                    if K_TRANSPOSED:
                        k_tile = tl.load(k_columns)
                    else:
                        k_tile = tl.trans(tl.load(k_rows))
                    v = tl.load(v_rows)
            if DOT_FP32:
                scores = tl.dot(q.to(tl.float32), k_tile.to(tl.float32), input_precision=PRECISION)
            else:
                scores = tl.dot(q, k_tile, input_precision=PRECISION)
            if MASKED:
                if BOX_RULE:
                    # The predicate's fused test hides keys past seq_k too: no bounds mask.
                    visible = box_visible(RuleWords, seq_k, key_pos, box_low, box_high, box_guard)
                    if CAUSAL:
                        visible = visible & (key_pos[None, :] <= query_pos[:, None])
                else:
                    if EVEN_K:
                        visible = key_pos[None, :] <= query_pos[:, None]
                    else:
                        visible = in_bounds[None, :]
                        if CAUSAL:
                            visible = visible & (key_pos[None, :] <= query_pos[:, None])
                    if HAS_RULE:
                        entry = tl.load(rule_base + step // SUBTILES)
                        block_keys = (step % SUBTILES) * BLOCK_N + offs_n
                        allowed = rule_allowed(
                            RuleWords, entry, block_rows[:, None], block_keys[None, :], BLOCK_Q, BLOCK_K
                        )
                        if CAUSAL or not EVEN_K:
                            visible = visible & allowed
                        else:
                            visible = allowed
                if CAUSAL or not EVEN_K or HAS_RULE or BOX_RULE:
                    scores = tl.where(visible, scores, float("-inf"))
            # m is kept in scaled (log2) units; the scale is folded into one FMA per score.
            m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
            if MASKED:
                # A row with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(scores * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DOT_FP32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _block_sparse_forward(
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
        seq_bucket,  # autotuning keys only: ceil(log2(seq_k)) and ceil(log2(mean kept blocks
        work_bucket,  # per query block)), so long or dense cases do not reuse a short/sparse tuning
        RuleIndex,  # with HAS_RULE: per list entry its bitmask index (KvIndices' shape), and the
        RuleWords,  # packed masks (:mod:`.rule_bits`); with BOX_RULE the predicate's (3, seq_k) table
        box_guard,  # with BOX_RULE: the predicate's guard bits; unused otherwise
        n_q_blocks,  # the launch order (tile_steps.wave_item): query blocks per head and
        heads_per_wave,  # (batch, head) pairs per wave (launch.heads_per_wave), after a lead of
        lead_blocks,  # heavy query blocks (launch.lead_blocks) of all
        all_heads,  # (batch, head) pairs
        HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        WRITE_LSE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        K_TRANSPOSED: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_Q: tl.constexpr,
        USE_TMA: tl.constexpr,
        HAS_RULE: tl.constexpr,
        BOX_RULE: tl.constexpr,
    ):
        TILES_PER_BLOCK: tl.constexpr = BLOCK_Q // BLOCK_M
        # A 1D grid: the heavy query blocks' tiles of every head, then waves of heads_per_wave
        # (batch, head) pairs, a wave's query tiles in work order, its heads side by side.
        tile_rank, batch_head = lead_wave_item(
            tl.program_id(0), heads_per_wave, n_q_blocks * TILES_PER_BLOCK, lead_blocks * TILES_PER_BLOCK, all_heads
        )
        # Query blocks in the plan's work order (heaviest first), each cut into tiles of BLOCK_M rows.
        q_block = tl.load(WorkOrder + tile_rank // TILES_PER_BLOCK)
        tile = q_block * TILES_PER_BLOCK + tile_rank % TILES_PER_BLOCK
        batch = batch_head // num_q_heads
        head = batch_head % num_q_heads
        kv_head = head // group
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        row_in_range = rows < seq_q
        if USE_TMA:
            # Descriptors over this (batch, head)'s rows, bounded by its sequence length, so rows
            # past the end read as zeros (their outputs are not stored; keys past seq_k are
            # masked out of the scores). From here on k_base / v_base are descriptors.
            q_desc = tl.make_tensor_descriptor(
                q_base, shape=[seq_q, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM]
            )
            q = q_desc.load([tile * BLOCK_M, 0])
            k_base = tl.make_tensor_descriptor(
                k_base, shape=[seq_k, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM]
            )
            v_base = tl.make_tensor_descriptor(
                v_base, shape=[seq_k, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM]
            )
        else:
            q_pointers = q_base + rows[:, None] * stride_qs + offs_d[None, :]
            if EVEN_Q:  # the query length is a multiple of the pattern's query block: no row past the end
                q = tl.load(q_pointers)
            else:
                q = tl.load(q_pointers, mask=row_in_range[:, None], other=0.0)

        pattern_head = head // pattern_head_divisor
        count_offset = batch * stride_cb + pattern_head * stride_ch + q_block
        count = tl.load(KvCounts + count_offset)
        full_count = tl.load(KvFullCounts + count_offset)
        list_offset = batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + q_block * stride_iq
        index_base = KvIndices + list_offset
        rule_base = RuleIndex + list_offset  # same shape and strides as KvIndices
        block_rows = (tile % TILES_PER_BLOCK) * BLOCK_M + tl.arange(0, BLOCK_M)
        query_pos = rows + (seq_k - seq_q)
        box_low = 0
        box_high = 0
        if BOX_RULE:
            box_low, box_high = box_bounds(RuleWords, seq_k, query_pos, row_in_range)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k_base, v_base, index_base, 0, full_count, stride_ks, stride_vs,
            query_pos, seq_k, qk_scale, offs_n, offs_d, RuleWords, rule_base, block_rows, box_low, box_high,
            box_guard, BLOCK_Q, BLOCK_K, BLOCK_N, False, CAUSAL, DOT_FP32, PRECISION, K_TRANSPOSED, EVEN_K, USE_TMA,
            False, False,
        )  # fmt: skip
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k_base, v_base, index_base, full_count, count, stride_ks, stride_vs,
            query_pos, seq_k, qk_scale, offs_n, offs_d, RuleWords, rule_base, block_rows, box_low, box_high,
            box_guard, BLOCK_Q, BLOCK_K, BLOCK_N, True, CAUSAL, DOT_FP32, PRECISION, K_TRANSPOSED, EVEN_K, USE_TMA,
            HAS_RULE, BOX_RULE,
        )  # fmt: skip

        # A row a token rule leaves without any key: output 0 and LSE -inf, as FlexAttention gives.
        store_rows(
            Out, Lse, acc, m_i, l_i, batch, head, batch_head, rows, row_in_range, offs_d,
            stride_ob, stride_oh, stride_os, seq_q, EVEN_Q, WRITE_LSE, HAS_RULE or BOX_RULE,
        )  # fmt: skip


def tma_offered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, capability: tuple[int, int] | None) -> bool:
    """Whether TMA loads join the autotuned set: 16-bit inputs, compute capability >= 9
    (Hopper or newer; ``capability`` is ``None`` off CUDA) and descriptor-compatible tensors."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if capability is None or capability[0] < 9:
        return False
    return all(descriptor_compatible(x) for x in (q, k, v))


def candidates(head_dim: int, block_q: int, block_k: int, *, is_float32: bool, tma: bool) -> tuple:
    """The autotuner's candidates, ``(BLOCK_M, BLOCK_N, num_warps, num_stages, K_TRANSPOSED, USE_TMA)``
    tuples (tiles x load modes, from :mod:`.configs` under the overrides in force)."""
    tiles = configs.fitting_tiles(head_dim, block_q, block_k, is_float32=is_float32)
    modes = configs.triton_load_modes(is_float32=is_float32, tma_offered=tma)
    return tuple((*tile, mode == "columns", mode == "tma") for tile in tiles for mode in modes)


@functools.cache
def autotuned_kernel(candidate_set: tuple):
    """One autotuner per candidate set (an override makes a new set, hence a new autotuner)."""
    tuning_configs = [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "K_TRANSPOSED": transposed, "USE_TMA": use_tma}, num_warps=w, num_stages=s
        )
        for m, n, w, s, transposed, use_tma in candidate_set
    ]
    return triton.autotune(
        configs=tuning_configs,
        key=[
            "seq_bucket",
            "work_bucket",
            "HEAD_DIM",
            "BLOCK_Q",
            "BLOCK_K",
            "CAUSAL",
            "PRECISION",
            "HAS_RULE",
            "BOX_RULE",
        ],
    )(_block_sparse_forward)


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
    """Block-sparse attention with the Triton kernel. Shapes as in :func:`sparse_attn.block_sparse_attention`."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    plan = plan_for(pattern, causal=causal)
    batch, q_heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    # A token rule: as a box predicate where it offers one, else as per-block bitmasks.
    predicate_lists = plan.predicate_lists
    rule_lists = None if predicate_lists is not None else plan.rule_lists
    if predicate_lists is not None:
        lists = (predicate_lists.full_counts, predicate_lists.kv_indices)
        out, lse, args = launch_arguments(q, k, v, plan, scale=scale, return_lse=return_lse, lists=lists)
        predicate = predicate_lists.predicate
        rule_args = (plan.full_counts, predicate.table, predicate.guard)
    elif rule_lists is not None:
        lists = (rule_lists.full_counts, rule_lists.kv_indices)
        out, lse, args = launch_arguments(q, k, v, plan, scale=scale, return_lse=return_lse, lists=lists)
        rule_args = (rule_lists.rule_index, rule_lists.words, 0)
    else:
        out, lse, args = launch_arguments(q, k, v, plan, scale=scale, return_lse=return_lse)
        rule_args = (plan.full_counts, plan.full_counts, 0)  # unused without a rule
    args += (length_bucket(seq_k), plan.work_bucket)  # the autotuning keys
    args += rule_args
    n_q_blocks = num_blocks(seq_q, pattern.block_q)
    args += (n_q_blocks, heads_per_wave(q, k), lead_blocks(plan), batch * q_heads)
    is_float32 = q.dtype == torch.float32
    constants = dict(
        **mode_constants(q, k, pattern, causal=causal, return_lse=return_lse),
        BLOCK_Q=pattern.block_q,
        BLOCK_K=pattern.block_k,
        HAS_RULE=rule_lists is not None,
        BOX_RULE=predicate_lists is not None,
    )
    if interpreting():
        block_m, block_n = min(pattern.block_q, 32), min(pattern.block_k, 16)
        grid = (batch * q_heads * n_q_blocks * (pattern.block_q // block_m),)
        mode = configs.interpreter_load_mode(descriptors_allowed=all(descriptor_compatible(x) for x in (q, k, v)))
        _block_sparse_forward[grid](
            *args,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            K_TRANSPOSED=mode == "columns",
            USE_TMA=mode == "tma",
            **constants,
        )
    else:
        tma = tma_offered(q, k, v, device_capability(q.device))
        candidate_set = candidates(dim, pattern.block_q, pattern.block_k, is_float32=is_float32, tma=tma)
        if any(use_tma for *_, use_tma in candidate_set):
            ensure_scratch_allocator()

        def grid(meta):
            return (batch * q_heads * n_q_blocks * (pattern.block_q // meta["BLOCK_M"]),)

        autotuned_kernel(candidate_set)[grid](*args, **constants)
    if return_lse:
        return out, lse
    return out


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend cannot differentiate this case, or ``None``: its backward kernels
    (:mod:`.triton_backward`) take every case its forward takes."""
    return None
