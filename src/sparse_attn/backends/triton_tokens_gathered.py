"""Key-centric (gathered) path of the token-granular kernel, for large KV blocks (MoBA).

The tile path of :mod:`.triton_tokens` loads each selected KV block once per query tile. With
blocks of hundreds or thousands of keys (MoBA: 512 or 4096) and per-token selections that differ
from token to token, a tile's union approaches every block, and a one-token tile loads a whole
block per token: either way the loads, not the products, set the time. This path turns the walk
around, as MoBA's own implementation does: per KV block, the query rows that selected it.

* Forward: one program per (batch, packed heads, KV block, chunk of ``ENTRIES`` listing query
  blocks): its ``ENTRIES x heads x block_q`` rows are gathered from anywhere in the sequence,
  attend to that one block (online softmax over its keys, token-level causal and bounds masks),
  and write a partial output and log-sum-exp per (row, list slot). A merge kernel then combines
  each row's ``kv_counts`` partials by their log-sum-exp. Work items are equal (``ENTRIES``
  entries of one block), so a block many tokens select is split over many programs.
* Backward: dQ the same way (partial dQ per (row, slot), then a sum), and dK/dV with the tile
  path's transposed-list kernel walking one query block per entry, several entries per step.

Costs beyond the tile path: the partials, one ``D``-row in q's dtype (float32 accumulation,
rounded once per partial) and one float32 log-sum-exp per listed (query row, KV block) pair,
written once and read once. They are packed row after row (:func:`partial_offsets`: row ``r``'s
partials start at the running sum of the earlier rows' list lengths), so their memory is the
pairs the pattern keeps, not ``rows x max_kv``. With VMoBA at the HunyuanVideo shape (layer 1,
2D blocks of 792 keys, 151 blocks) the 256 text queries list every block while a video query
lists 31.6 on average, so the ``(B, Hq, Sq, max_kv, D)`` buffer of the layout before the
twenty-eighth session took 110.5 GB in bf16 at 24 heads against 23.1 GB packed (counted from the
pattern's lists on CPU; the merge's loops likewise run to the longest list among a program's
rows, not the pattern's).
Non-finite values: a row's partial for a block is computed from that block's keys alone, so a
NaN/Inf ``v`` reaches exactly the rows whose list keeps its block (zero-weight keys included,
as in the reference), and a partial whose keys the row cannot see (weight sum 0) carries only
what its zero weights multiplied (0, or NaN from such a ``v``) into the merge with weight 0.
When this path runs (:func:`uses_gathered_path`): blocks of at least :data:`GATHER_MIN_BLOCK_K`
keys (a design choice: the path was timed on the H200, MoBA 512 / top-3 at 128K: 13.6 ms
forward, 52.0 forward + backward, ``benchmarks/results/h200/token_sparse_moba512.json``, but not
against the tile path at that length); and, measured, one-token lists that no two heads of a
tile share (lists per query head, or GQA groups of one) with blocks of at least
:data:`GATHER_PER_HEAD_MIN_BLOCK_K` keys, where the tile path's tiles are 16 tokens of one head
walking the union of 16 lists. There, on one H100 (MoBA, 32 query / 8 KV heads of 128, bf16,
32K, the lists and work rebuilt every step; ``benchmarks/results/h100/moba_paths_s64.json``),
this path took 15.6 ms forward and 28.6 forward + backward against the tile path's 125.1 and
192.7 with blocks of 64 and top 16 on white noise, 15.7 / 28.2 against 34.1 / 52.1 with q and k
correlated along the sequence (0.98), and with blocks of 128 and top 8 10.5 / 20.2 against
91.0 / 154.4 (white noise) and 10.2 / 20.4 against 24.3 / 41.2 (correlated); cuDNN dense took
14.3 / 54.8. (Those times include a work build that waited on the device; without the waits,
:func:`gathered_work`, 64 x 16 took 10.2 / 23.3: ``moba_gathered_work_ab_s64.json``.) Smaller
blocks, and lists shared by packed heads (NSA's groups, MoBA's ``share_in_group``), stay on the
tile path (not measured here). ``kernel_configs(token_path=...)`` forces either path. Memory:
one partial row per listed (row, block) pair (4.3 GB in bf16 for 64 x 16 at 32K with 32 heads),
where the tile path keeps none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..pattern import BlockSparsePattern
from ..utils import device_capability, interpreting
from . import configs, launch
from .launch import LOG2_E, descriptor_compatible, ensure_scratch_allocator
from .triton import tma_offered
from .triton_tokens import (
    _packed_heads,
    kernel_constants,
    list_strides,
    token_lists,
    token_tiling,
    wait_for_lists,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

# Blocks at least this long take the gathered path (see the module docstring).
GATHER_MIN_BLOCK_K = 256
# One-token lists no two heads of a tile share take it from blocks this long (see the module docstring).
GATHER_PER_HEAD_MIN_BLOCK_K = 64
# Gathered rows per program: entries x packed heads x block_q (kernel_configs(token_gather_rows=128)
# takes 128: each block's keys loaded once per 128 listing rows; not yet timed against 64).
GATHER_ROWS = 64
# Query tokens per merge program.
MERGE_ROWS = 64


def uses_gathered_path(pattern: BlockSparsePattern, q_heads: int, kv_heads: int) -> bool:
    """Whether the token kernels take this path for ``pattern`` with these head counts (see the
    module docstring), unless ``kernel_configs(token_path=...)`` says which."""
    forced = configs.current().token_path
    if forced is not None:
        return forced == "gathered"
    if pattern.block_k >= GATHER_MIN_BLOCK_K:
        return True
    return (
        pattern.block_q == 1
        and pattern.block_k >= GATHER_PER_HEAD_MIN_BLOCK_K
        and _packed_heads(q_heads, kv_heads, pattern.num_heads, 1) == 1
    )


@dataclass(frozen=True)
class PartialOffsets:
    """Where each query row's partials start in the packed buffers: ``offsets`` int64
    ``(B * Hq * Sq + 1,)`` (row ``(b * Hq + h) * Sq + t``; the last entry is ``total``, the number
    of listed (row, KV block) pairs)."""

    offsets: torch.Tensor
    total: int


def partial_offsets(pattern: BlockSparsePattern, batch: int, q_heads: int) -> PartialOffsets:
    """The packed partials' row offsets for ``batch`` sequences of ``q_heads`` query heads, from
    the pattern's list lengths (one host sync for the total), built once per pattern."""
    key = ("gathered_partials", batch, q_heads)
    cached = pattern.cached_plan(key)
    if cached is not None:
        return cached
    device = pattern.device
    heads = torch.arange(q_heads, device=device) // (q_heads // pattern.num_heads)
    tokens = torch.arange(pattern.seq_q, device=device) // pattern.block_q
    per_row = pattern.kv_counts[:, heads][:, :, tokens].expand(batch, q_heads, pattern.seq_q)
    offsets = torch.zeros(batch * q_heads * pattern.seq_q + 1, dtype=torch.int64, device=device)
    torch.cumsum(per_row.reshape(-1).to(torch.int64), 0, out=offsets[1:])  # past 2^31 pairs at large batches
    return pattern.store_plan(key, PartialOffsets(offsets=offsets, total=int(offsets[-1])))


@dataclass(frozen=True)
class GatheredWork:
    """The forward / dQ work items and the list slot of each transposed entry.

    ``combos`` int32 and ``starts`` int64 ``(n_items,)``: item ``i`` covers the entries
    ``starts[i]`` up to ``ENTRIES`` further (bounded by its row's end) of the transposed row of
    ``combos[i] = (batch * chunks + chunk) * n_kv + kv_block``. ``slots`` int32, aligned with
    :class:`.triton_tokens.TokenLists`' ``t_tiles`` for one-block tiles: where that entry's KV
    block sits in its query block's list.
    """

    combos: torch.Tensor
    starts: torch.Tensor
    slots: torch.Tensor


def gathered_work(pattern: BlockSparsePattern, batch: int, q_heads: int, heads: int, entries: int) -> GatheredWork:
    """Work items for ``batch`` sequences, ``q_heads // heads`` head chunks, built once per pattern
    without waiting on the device: the item arrays have a length known in advance, an upper
    bound of the items (one per (block, head chunk) plus one per ``entries`` of the padded
    pattern's slots that the chunks walk), the spare items last with ``combo`` -1 (the kernels
    return at once on them). The slots come with the one-block lists (``t_slots``)."""
    key = ("gathered_work", batch, q_heads, heads, entries)
    cached = pattern.cached_plan(key)
    if cached is not None:
        return cached
    lists = wait_for_lists(token_lists(pattern, 1))
    pattern_batch, pattern_heads = pattern.batch, pattern.num_heads
    n_kv, device = pattern.num_kv_blocks, pattern.device
    chunks = q_heads // heads
    n_combos = batch * chunks * n_kv
    combo = torch.arange(n_combos, device=device)
    chunk = (combo // n_kv) % chunks
    pattern_head = chunk * heads // (q_heads // pattern_heads)
    sequence = (combo // (n_kv * chunks)) if pattern_batch > 1 else torch.zeros_like(combo)
    row = (sequence * pattern_heads + pattern_head) * n_kv + combo % n_kv
    first, count = lists.t_offsets[row], lists.t_offsets[row + 1] - lists.t_offsets[row]
    items = (count + entries - 1) // entries
    ends = torch.cumsum(items, 0)
    # Each list row is walked by this many combos of every sequence; sum(ceil(c / e)) <= n + sum(c) // e.
    walks = -(-chunks // pattern_heads) * (batch // pattern_batch)
    bound = n_combos + pattern.kv_indices.numel() * walks // entries
    item = torch.arange(bound, device=device)
    item_combo = torch.searchsorted(ends, item, right=True)  # n_combos: a spare item
    real = item_combo < n_combos
    item_combo = item_combo.clamp_max(max(n_combos - 1, 0))
    starts = first[item_combo] + (item - (ends - items)[item_combo]) * entries
    work = GatheredWork(
        combos=torch.where(real, item_combo, -1).to(torch.int32), starts=torch.where(real, starts, 0),
        slots=lists.t_slots,
    )  # fmt: skip
    return pattern.store_plan(key, work)


if triton is not None:
    from .triton_tokens import attend_step, dq_step, key_steps, load_keys, load_row_stats, load_rows

    @triton.jit
    def gathered_rows(Combos, Starts, TOffsets, TQBlocks, TSlots, K, V, stride_kb, stride_kh, stride_vb, stride_vh,
                      list_stride_b, list_stride_h, num_q_heads, group, pattern_head_divisor, n_kv, seq_q, seq_k,
                      HEADS: tl.constexpr, ENTRIES: tl.constexpr, BLOCK_Q: tl.constexpr,
                      BLOCK_M: tl.constexpr):  # fmt: skip
        """This program's KV block and gathered rows, rows entry-major (``ENTRIES`` x ``HEADS``
        heads x ``BLOCK_Q`` tokens): ``(batch, kv_block, k_base, v_base, head, token, query
        position, slot, valid)``, ``k_base`` / ``v_base`` at the block's KV head."""
        combo = tl.load(Combos + tl.program_id(0))
        start = tl.load(Starts + tl.program_id(0))
        kv_block = combo % n_kv
        chunks = num_q_heads // HEADS
        batch = combo // n_kv // chunks
        first_head = (combo // n_kv % chunks) * HEADS
        list_row = batch * list_stride_b + (first_head // pattern_head_divisor) * list_stride_h + kv_block
        end = tl.load(TOffsets + list_row + 1)
        rows = tl.arange(0, BLOCK_M)
        entry = start + rows // (HEADS * BLOCK_Q)
        in_entry = rows % (HEADS * BLOCK_Q)
        valid = (entry < end) & (rows // (HEADS * BLOCK_Q) < ENTRIES)
        q_block = tl.load(TQBlocks + entry, mask=valid, other=0)
        slot = tl.load(TSlots + entry, mask=valid, other=0)
        token = q_block * BLOCK_Q + in_entry % BLOCK_Q
        valid = valid & (token < seq_q)
        kv_head = (first_head // group).to(tl.int64)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
        head = first_head + in_entry // BLOCK_Q
        return batch, kv_block, k_base, v_base, head, token, token + (seq_k - seq_q), slot, valid

    @triton.jit
    def _gathered_forward(
        Q, K, V, PartOut, PartLse, PartOffsets, Combos, Starts, TOffsets, TQBlocks, TSlots,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        list_stride_b, list_stride_h,
        num_q_heads, group, pattern_head_divisor, n_kv,
        seq_q, seq_k, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEADS: tl.constexpr,
        ENTRIES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    ):  # fmt: skip
        """``USE_TMA``: K and V tiles through tensor descriptors (no per-element addresses), see
        :func:`.triton_tokens.load_keys`."""
        if tl.load(Combos + tl.program_id(0)) < 0:  # a spare item (gathered_work's arrays have a fixed length)
            return
        batch, kv_block, k_base, v_base, head, token, query_pos, slot, valid = gathered_rows(
            Combos, Starts, TOffsets, TQBlocks, TSlots, K, V, stride_kb, stride_kh, stride_vb, stride_vh,
            list_stride_b, list_stride_h, num_q_heads, group, pattern_head_divisor, n_kv, seq_q, seq_k,
            HEADS, ENTRIES, BLOCK_Q, BLOCK_M,
        )  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = load_rows(Q, batch, head, token, valid, stride_qb, stride_qh, stride_qs, offs_d, DOT_FP32)
        if USE_TMA:  # from here on k_base / v_base are descriptors over the KV head's rows
            k_base = tl.make_tensor_descriptor(
                k_base, shape=[seq_k, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM]
            )
            v_base = tl.make_tensor_descriptor(
                v_base, shape=[seq_k, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM]
            )

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for sub in range(key_steps(kv_block, seq_k, BLOCK_K, BLOCK_N)):
            key_pos, key_ok, k, v = load_keys(
                k_base, v_base, kv_block, sub, seq_k, stride_ks, stride_vs, offs_n, offs_d,
                BLOCK_K, BLOCK_N, DOT_FP32, USE_TMA,
            )  # fmt: skip
            # Every gathered row lists this block.
            acc, m_i, l_i = attend_step(
                acc, m_i, l_i, q, k, v, key_pos, key_ok, valid, query_pos, qk_scale, True, CAUSAL, PRECISION
            )

        # A row that sees none of this block's keys keeps what its zero weights multiplied
        # (0, or NaN from a non-finite v) and log-sum-exp -inf: weight 0 in the merge.
        seen = l_i > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], acc)
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        row = (batch.to(tl.int64) * num_q_heads + head) * seq_q + token
        part = tl.load(PartOffsets + row, mask=valid, other=0) + slot
        tl.store(
            PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], out.to(PartOut.dtype.element_ty), mask=valid[:, None]
        )
        tl.store(PartLse + part, lse, mask=valid)

    @triton.jit
    def _merge(
        Parts, PartLse, PartOffsets, Out, Lse,
        stride_ob, stride_oh, stride_os,
        num_q_heads, seq_q, factor,
        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, SOFTMAX: tl.constexpr, WRITE_LSE: tl.constexpr,
    ):  # fmt: skip
        """Per query row, its partials (``PartOffsets[row]`` up to ``PartOffsets[row + 1]``): merged
        by log-sum-exp (``SOFTMAX``: outputs), or summed (dQ); times ``factor``."""
        batch = tl.program_id(1) // num_q_heads
        head = tl.program_id(1) % num_q_heads
        token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = token < seq_q
        offs_d = tl.arange(0, HEAD_DIM)
        row = (batch.to(tl.int64) * num_q_heads + head) * seq_q + token
        first = tl.load(PartOffsets + row, mask=valid, other=0)
        count = tl.load(PartOffsets + row + 1, mask=valid, other=0) - first
        # The longest list among this program's rows, not the pattern's: a few rows that list
        # every block (text tokens beside a video) no longer lengthen every program's loops.
        slots = tl.max(count, 0)
        m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        if SOFTMAX:
            for slot in range(slots):
                lse = tl.load(PartLse + first + slot, mask=slot < count, other=float("-inf"))
                m = tl.maximum(m, lse)
            m = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
        for slot in range(slots):
            listed = slot < count
            part = tl.load(
                Parts + (first + slot)[:, None] * HEAD_DIM + offs_d[None, :], mask=listed[:, None], other=0.0
            )
            if SOFTMAX:
                lse = tl.load(PartLse + first + slot, mask=listed, other=float("-inf"))
                weight = tl.exp(lse - m)
                total += weight
                acc += weight[:, None] * part.to(tl.float32)
            else:
                acc += part.to(tl.float32)
        if SOFTMAX:
            acc = acc / total[:, None]
        out_offset = batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + token.to(tl.int64) * stride_os
        tl.store(
            Out + out_offset[:, None] + offs_d[None, :], (acc * factor).to(Out.dtype.element_ty), mask=valid[:, None]
        )
        if WRITE_LSE:
            tl.store(Lse + row, m + tl.log(total), mask=valid)

    @triton.jit
    def _gathered_dq(
        Q, K, V, DOut, Lse, Delta, PartDQ, PartOffsets, Combos, Starts, TOffsets, TQBlocks, TSlots,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_db, stride_dh, stride_ds,
        list_stride_b, list_stride_h,
        num_q_heads, group, pattern_head_divisor, n_kv,
        seq_q, seq_k, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEADS: tl.constexpr,
        ENTRIES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Partial dQ (unscaled) of the gathered rows over one KV block, per (row, slot)."""
        if tl.load(Combos + tl.program_id(0)) < 0:  # a spare item (gathered_work's arrays have a fixed length)
            return
        batch, kv_block, k_base, v_base, head, token, query_pos, slot, valid = gathered_rows(
            Combos, Starts, TOffsets, TQBlocks, TSlots, K, V, stride_kb, stride_kh, stride_vb, stride_vh,
            list_stride_b, list_stride_h, num_q_heads, group, pattern_head_divisor, n_kv, seq_q, seq_k,
            HEADS, ENTRIES, BLOCK_Q, BLOCK_M,
        )  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = load_rows(Q, batch, head, token, valid, stride_qb, stride_qh, stride_qs, offs_d, DOT_FP32)
        do = load_rows(DOut, batch, head, token, valid, stride_db, stride_dh, stride_ds, offs_d, DOT_FP32)
        lse, delta = load_row_stats(Lse, Delta, batch, head, token, valid, num_q_heads, seq_q)
        last_query = tl.max(tl.where(valid, query_pos, -1), 0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for sub in range(key_steps(kv_block, seq_k, BLOCK_K, BLOCK_N)):
            if (kv_block * BLOCK_K + sub * BLOCK_N) * CAUSAL <= last_query:
                key_pos, key_ok, k, v = load_keys(
                    k_base, v_base, kv_block, sub, seq_k, stride_ks, stride_vs, offs_n, offs_d,
                    BLOCK_K, BLOCK_N, DOT_FP32,
                )  # fmt: skip
                dq = dq_step(
                    dq, q, do, lse, delta, k, v, key_pos, key_ok, valid, query_pos, qk_scale, CAUSAL, PRECISION
                )
        row = (batch.to(tl.int64) * num_q_heads + head) * seq_q + token
        part = tl.load(PartOffsets + row, mask=valid, other=0) + slot
        tl.store(
            PartDQ + part[:, None] * HEAD_DIM + offs_d[None, :], dq.to(PartDQ.dtype.element_ty), mask=valid[:, None]
        )


def _geometry(q: torch.Tensor, k: torch.Tensor, pattern: BlockSparsePattern, causal: bool):
    """``(work, args, constants)``: the work items and the arguments the forward and dQ kernels
    share after their tensors and strides."""
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    tiling = token_tiling(q_heads, kv_heads, pattern.num_heads, pattern.block_q)
    rows = configs.current().token_gather_rows or GATHER_ROWS  # >= heads x block_q (at most 64)
    entries = rows // (tiling.heads * pattern.block_q)
    work = gathered_work(pattern, batch, q_heads, tiling.heads, entries)
    lists = token_lists(pattern, 1)
    args = (
        *list_strides(pattern, pattern.num_kv_blocks),
        *(q_heads, q_heads // kv_heads, q_heads // pattern.num_heads, pattern.num_kv_blocks),
        *(q.shape[2], k.shape[2]),
    )
    constants = kernel_constants(q, pattern, tiling, causal=causal)
    constants.pop("TILE_TOKENS")
    constants.update(ENTRIES=entries, BLOCK_M=rows)
    return work, lists, args, constants


@functools.cache
def _autotuned(kind: str, is_float32: bool, rows: int, tma: tuple[bool, ...] = (False,)):
    """The gathered ``kind`` kernel (``"forward"`` or ``"dq"``) autotuned over key steps, warps and
    stages (float32 tiles take twice the memory: smaller steps), per number of KV blocks (length).
    Programs of 128 rows take 8 or 16 warps (compiled for sm_90 at head_dim 128: 255 registers and
    488 bytes of stack at 8 warps, 128 registers and 264 bytes at 16, 64-key steps).

    The forward also tries K/V loads through tensor descriptors (``USE_TMA``) where
    :func:`_load_choices` offers them (Hopper, 16-bit, aligned tensors). Compiled for sm_90 on a
    CPU (thirty-first session; bf16, head_dim 128, 64 rows, VMoBA's 720-key blocks, 2 stages),
    the pointer loads take 255 registers and spill at every 4-warp configuration (444 bytes of
    spill stores at 64-key steps, 1,276 at 128) and keep one K/V tile in shared memory (48 KiB
    with the queries at 64-key steps: the key loop's loads are not multi-buffered); descriptor
    loads spill 128 and 316 bytes there, none at 8 warps and 64-key steps (232 registers), and
    double-buffer K/V (80 KiB). Their speed on the GPU is not yet measured; the autotuner times
    both kinds and keeps the faster."""
    steps = (32,) if is_float32 else (32, 64, 128)
    warps = (4, 8) if rows <= 64 else (8, 16)
    # The forward also tries K/V through tensor descriptors where they are offered (``tma``).
    loads = tma if kind == "forward" else (None,)
    tuning = [
        triton.Config({"BLOCK_N": n, **({} if use is None else {"USE_TMA": use})}, num_warps=w, num_stages=s)
        for n in steps
        for w in warps
        for s in (1, 2)
        for use in loads
    ]
    kernel = {"forward": _gathered_forward, "dq": _gathered_dq}[kind]
    return triton.autotune(
        configs=tuning, key=["n_kv", "HEAD_DIM", "BLOCK_Q", "BLOCK_K", "HEADS", "ENTRIES", "CAUSAL", "PRECISION"]
    )(kernel)


def _load_choices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, ...]:
    """The forward's K/V load kinds (``USE_TMA`` values), chosen as for the block kernel
    (:func:`.configs.triton_load_modes` / :func:`.configs.interpreter_load_mode`): ``"tma"`` is
    descriptors, the other modes pointer loads; the interpreter runs one."""
    if interpreting():
        allowed = all(descriptor_compatible(x) for x in (q, k, v))
        return (configs.interpreter_load_mode(descriptors_allowed=allowed) == "tma",)
    offered = tma_offered(q, k, v, device_capability(q.device))
    modes = configs.triton_load_modes(is_float32=q.dtype == torch.float32, tma_offered=offered)
    return tuple(dict.fromkeys(mode == "tma" for mode in modes))


def _launch(kind: str, n_items: int, q: torch.Tensor, args: tuple, constants: dict, loads=(False,)) -> None:
    """One launch over the work items: the interpreter's fixed 16-key step, or the autotuned kernel."""
    if kind == "forward" and any(loads):
        ensure_scratch_allocator()
    if interpreting():
        kernel = {"forward": _gathered_forward, "dq": _gathered_dq}[kind]
        extra = {"USE_TMA": loads[0]} if kind == "forward" else {}
        kernel[(n_items,)](*args, BLOCK_N=16, **extra, **constants)
    else:
        _autotuned(kind, q.dtype == torch.float32, constants["BLOCK_M"], loads)[(n_items,)](*args, **constants)


def _merge_launch(parts, part_lse, offsets, out, lse, *, softmax: bool, factor: float) -> None:
    batch, q_heads, seq_q, dim = out.shape
    _merge[(num_blocks(seq_q, MERGE_ROWS), batch * q_heads)](
        *(parts, part_lse if part_lse is not None else parts, offsets.offsets, out, lse if lse is not None else out),
        *out.stride()[:3],
        *(q_heads, seq_q, factor),
        HEAD_DIM=dim,
        BLOCK_T=MERGE_ROWS,
        SOFTMAX=softmax,
        WRITE_LSE=lse is not None,
        num_warps=8 if dim >= 128 else 4,  # a (64, head_dim) float32 accumulator per program
    )


def forward(q, k, v, pattern: BlockSparsePattern, *, causal: bool, scale: float, return_lse: bool):
    """Gathered forward: ``out`` ``(B, Hq, Sq, D)`` and, with ``return_lse``, float32 ``(B, Hq, Sq)``."""
    batch, q_heads, seq_q, dim = q.shape
    work, lists, args, constants = _geometry(q, k, pattern, causal)
    offsets = partial_offsets(pattern, batch, q_heads)
    part_out = torch.empty((offsets.total, dim), dtype=q.dtype, device=q.device)
    part_lse = torch.empty((offsets.total,), dtype=torch.float32, device=q.device)
    out = launch.allocate((batch, q_heads, seq_q, dim), q.dtype, q.device)
    lse = launch.allocate((batch, q_heads, seq_q), torch.float32, q.device) if return_lse else None
    if work.combos.numel():
        forward_args = (
            *(q, k, v, part_out, part_lse, offsets.offsets),
            *(work.combos, work.starts, lists.t_offsets, lists.t_tiles, work.slots),
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *args,
            scale * LOG2_E,
        )
        _launch("forward", work.combos.numel(), q, forward_args, constants, _load_choices(q, k, v))
    _merge_launch(part_out, part_lse, offsets, out, lse, softmax=True, factor=1.0)
    return (out, lse) if return_lse else out


def dq(q, k, v, dout, lse, delta, pattern: BlockSparsePattern, *, causal: bool, scale: float) -> torch.Tensor:
    """Gathered dQ: partial dQ per (row, slot), summed per row (times ``scale``)."""
    batch, q_heads, seq_q, dim = q.shape
    work, lists, args, constants = _geometry(q, k, pattern, causal)
    offsets = partial_offsets(pattern, batch, q_heads)
    parts = torch.empty((offsets.total, dim), dtype=q.dtype, device=q.device)
    if work.combos.numel():
        dq_args = (
            *(q, k, v, dout, lse, delta, parts, offsets.offsets),
            *(work.combos, work.starts, lists.t_offsets, lists.t_tiles, work.slots),
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *dout.stride()[:3],
            *args,
            scale * LOG2_E,
        )
        _launch("dq", work.combos.numel(), q, dq_args, constants)
    grad = launch.allocate(q.shape, q.dtype, q.device)
    _merge_launch(parts, None, offsets, grad, None, softmax=False, factor=scale)
    return grad
