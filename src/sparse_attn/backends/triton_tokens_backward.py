"""Token-granular Triton backward: dQ, dK, dV for the patterns :mod:`.triton_tokens` runs.

Three launches, deterministic (no float atomics anywhere):

* delta: per query row ``rowsum(dO * O) - dLSE``, the block backward's own kernel
  (:mod:`.triton_backward`), which knows nothing of blocks.
* dQ: the forward's programs and row packing (query heads of a group x tokens of a query tile),
  walking the tile's union list with the same per-row bitmask, causal and bounds masks. Each
  selected K/V step is loaded once for the packed heads.
* dK/dV: one program per (work item, step of ``BLOCK_N`` keys of its KV block). An item is a
  segment of the transposed union list of one (batch, KV head, KV block) for one set of packed
  heads (the query tiles whose union holds the block, with their bitmasks, several tiles per
  product), so dK and dV are summed over the GQA group without expanding K/V: with lists per
  KV head or shared, the tiles are the group's heads x tokens; with lists per query head, each
  head is its own set. A block with several items (a long list, or several head sets) sums
  their float32 partials in a last pass, in item order (:func:`dkdv_work`).

Probabilities are recomputed from the forward's log-sum-exp: ``P = exp(S * scale - lse)``,
``dS = P * (dP - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, ``dV = P^T dO``. Steps
wholly after a tile's last query (causal) are skipped: their probabilities are all zero.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..plan import BlockSparsePlan
from ..utils import HostCopy, interpreting, length_bucket
from . import launch
from . import triton_tokens_gathered as gathered
from .launch import LOG2_E
from .triton_tokens import (
    block_n_candidates,
    kernel_constants,
    launch_geometry,
    list_strides,
    rows_fit_int32,
    token_lists,
    token_tiling,
    wait_for_lists,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

# Rows per dK/dV product: listing tiles x packed heads x tile tokens.
DKDV_ROWS = 64
# dK/dV work items (dkdv_work): a transposed list longer than SEGMENT_FACTOR x the mean list
# length, and than MIN_SEGMENT entries, is split into segments of that length.
MIN_SEGMENT = 256
SEGMENT_FACTOR = 4
# Causal dK/dV: skip listing steps that end before the key tile by a runtime branch (True), or
# run them fully masked so the loop's loads pipeline (False: NSA's selected branch at 64K,
# forward + backward 50.67 vs 53.08 ms on the H200, token_sparse_nsa_select_skip_*.json).
DKDV_SKIP_EARLY = False
# dK/dV's gathered query and dO rows addressed by int32 offsets within the batch entry where they
# fit (triton_tokens.rows_fit_int32): int64 ones took more registers. NSA's selected branch at its
# defaults, compiled for sm_90a with a launch's alignment hints (64 rows, 64 keys, 8 warps, 2
# stages): 8 / 40 bytes of spills (one- / four-token tiles) with int64 offsets, none with int32
# (ptxas -v). Timed in the 41st session on one H100 (with the stage sets of the time): see STAGES.
NARROW_ROW_OFFSETS = True
# dK/dV walk one-query-block tiles (each transposed-list entry one query block's rows, ENTRIES of
# them per product) even where the forward and dQ take wider tiles (token_rows="overlap" or a
# number): a wide tile's entry loads all its tokens' Q/dO rows for every block in the union of
# their lists, a one-block entry only the rows of a block that lists it. The pass streams those
# rows from memory (they are the large operand: Hq x Sq x D twice), so its traffic follows the
# union: at NSA's 64K with four-token tiles, a union ratio of 1.35 is 35 % more rows read. Timed on
# one H100 (42nd session, NSA module at 64K on text-like inputs, same process): forward + backward
# 115.11 ms against 116.62 with the forward's tiles; this pass 15.25 ms in the profile (19.94 before).
# Only where one query block's packed rows (heads x block_q) fill at least DKDV_ONE_BLOCK_MIN_ROWS
# rows (NSA's group of 16 heads of one token): with lists per query head (MoBA: one row per
# token) an entry per token would make the lists block_m times longer and its rows' loads scatter,
# where neighbouring tokens share their blocks anyway (MoBA's blocks of 512-4096 keys); not timed.
DKDV_ONE_BLOCK_TILES = True
DKDV_ONE_BLOCK_MIN_ROWS = 16

if triton is not None:
    from .triton_backward import check_fused_arguments, row_delta
    from .triton_tokens import dq_step, load_keys, load_row_stats, load_rows, store_rows, tile_program

    @triton.jit
    def _token_dq(
        Q, K, V, DOut, Lse, Delta, DQ, Offsets, Blocks, Bits,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_db, stride_dh, stride_ds,
        stride_gb, stride_gh, stride_gs,
        list_stride_b, list_stride_h,
        num_q_heads, group, pattern_head_divisor,
        seq_q, seq_k, max_kv, scale, qk_scale,
        seq_bucket,  # autotuning key only: ceil(log2(seq_k))
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        HEADS: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr = False,
    ):  # fmt: skip
        """``ACCUMULATE``: add this pass's dQ to the values ``DQ`` holds (each (head, token) row is
        one program's)."""
        batch, tile, head, token, query_pos, valid, bit, k_base, v_base, start, end = tile_program(
            K, V, Offsets, stride_kb, stride_kh, stride_vb, stride_vh, list_stride_b, list_stride_h,
            num_q_heads, group, pattern_head_divisor, seq_q, seq_k, max_kv, HEADS, TILE_TOKENS, BLOCK_M, BLOCK_Q,
        )  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        last_query = tl.minimum(tile * TILE_TOKENS + TILE_TOKENS, seq_q) - 1 + (seq_k - seq_q)
        q = load_rows(Q, batch, head, token, valid, stride_qb, stride_qh, stride_qs, offs_d, DOT_FP32)
        do = load_rows(DOut, batch, head, token, valid, stride_db, stride_dh, stride_ds, offs_d, DOT_FP32)
        lse, delta = load_row_stats(Lse, Delta, batch, head, token, valid, num_q_heads, seq_q)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # One flat loop over (entry, key step), as in the forward. Lists are ascending, so in
        # causal mode the steps wholly after the tile's last query (zero probabilities) are the
        # last entry's trailing steps: the loop ends before them.
        SUBS: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
        stop = end * SUBS
        if CAUSAL:
            if end > start:
                last_block = tl.load(Blocks + end - 1)
                ahead = last_query + 1 - last_block * BLOCK_K  # keys of the last block up to the last query
                needed = tl.minimum(tl.maximum(ahead + BLOCK_N - 1, 0) // BLOCK_N, SUBS)
                stop = (end - 1) * SUBS + needed
        for step in range(start * SUBS, stop):
            entry = step // SUBS
            kv_block = tl.load(Blocks + entry)
            if TILE_TOKENS == BLOCK_Q:  # the block's own list (program_lists): every row lists the entry
                listed = valid
            else:
                listed = valid & (((tl.load(Bits + entry) >> bit) & 1) != 0)
            key_pos, key_ok, k, v = load_keys(
                k_base, v_base, kv_block, step % SUBS, seq_k, stride_ks, stride_vs, offs_n, offs_d,
                BLOCK_K, BLOCK_N, DOT_FP32,
            )  # fmt: skip
            dq = dq_step(dq, q, do, lse, delta, k, v, key_pos, key_ok, listed, query_pos, qk_scale, CAUSAL, PRECISION)
        dq = dq * scale
        if ACCUMULATE:
            dq += load_rows(DQ, batch, head, token, valid, stride_gb, stride_gh, stride_gs, offs_d, DOT_FP32=True)
        store_rows(DQ, dq, batch, head, token, valid, stride_gb, stride_gh, stride_gs, offs_d)

    @triton.jit
    def _dkdv_walk(
        dk, dv, k, v, Q, DOut, Lse, Delta, TTiles, TBits, start, end,
        batch, head, first_key, key_pos, key_ok, entry_in_step, token_in_tile, offs_d,
        stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds,
        num_q_heads, seq_q, offset, qk_scale,
        BLOCK_Q: tl.constexpr, TILE_TOKENS: tl.constexpr, ENTRIES: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SKIP_EARLY: tl.constexpr,
        NARROW: tl.constexpr,
    ):  # fmt: skip
        """dK/dV of one key tile over transposed-list entries ``[start, end)``: ``ENTRIES`` listing
        tiles per step (ascending), each a set of packed heads x ``TILE_TOKENS`` tokens.

        ``SKIP_EARLY`` (causal only): steps whose tiles all end before these keys start are
        skipped by a runtime branch. Without it they run fully masked (exact either way: their
        probabilities are zero); the branch keeps the loop's loads out of the software pipeline."""
        for step in range(start, end, ENTRIES):
            if CAUSAL and SKIP_EARLY:
                last_tile = tl.load(TTiles + tl.minimum(step + ENTRIES, end) - 1)
                last_query = tl.minimum(last_tile * TILE_TOKENS + TILE_TOKENS, seq_q) - 1 + offset
                # Tiles that end before these keys start see none of them.
                run = first_key <= last_query
            else:
                run = True
            if run:
                entry = step + entry_in_step
                in_step = (entry < end) & (entry_in_step < ENTRIES)
                tile = tl.load(TTiles + entry, mask=in_step, other=0)
                bits = tl.load(TBits + entry, mask=in_step, other=0)
                token = tile * TILE_TOKENS + token_in_tile
                valid = in_step & (token < seq_q)
                listed = valid & (((bits >> (token_in_tile // BLOCK_Q)) & 1) != 0)
                q = load_rows(Q, batch, head, token, valid, stride_qb, stride_qh, stride_qs, offs_d, DOT_FP32, NARROW)
                do = load_rows(
                    DOut, batch, head, token, valid, stride_db, stride_dh, stride_ds, offs_d, DOT_FP32, NARROW
                )
                lse, delta = load_row_stats(Lse, Delta, batch, head, token, valid, num_q_heads, seq_q, NARROW)
                scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (N, M)
                visible = key_ok[:, None] & listed[None, :]
                if CAUSAL:
                    visible = visible & (key_pos[:, None] <= token[None, :] + offset)
                p_t = tl.where(visible, tl.math.exp2(scores_t * qk_scale - lse[None, :]), 0.0)
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _token_dkdv(
        Q, K, V, DOut, Lse, Delta, DK, DV, PartDK, PartDV, TOffsets, TTiles, TBits,
        ItemCombo, ItemChunk, ItemStart, ItemEnd, ItemPartial,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_db, stride_dh, stride_ds,
        stride_gb, stride_gh, stride_gs,
        list_stride_b, list_stride_h,
        num_q_heads, group, pattern_head_divisor,
        seq_q, seq_k, scale, qk_scale,
        seq_bucket,  # autotuning key only: ceil(log2(seq_k))
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        HEADS: tl.constexpr, TILE_TOKENS: tl.constexpr, ENTRIES: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        SKIP_EARLY: tl.constexpr, NARROW: tl.constexpr,
    ):  # fmt: skip
        """One work item x one key step of its KV block: the item's head sets (all of the group's,
        or one) walk their transposed lists within ``[start, end)``; dK/dV go straight to the
        output, or to the item's partial slot."""
        SUBTILES: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
        item = tl.program_id(0) // SUBTILES
        sub = tl.program_id(0) % SUBTILES
        combo = tl.load(ItemCombo + item)
        if combo < 0:  # a spare item (dkdv_work's arrays have a length fixed in advance)
            return
        start = tl.load(ItemStart + item)
        end = tl.load(ItemEnd + item)
        partial = tl.load(ItemPartial + item)
        num_kv_heads = num_q_heads // group
        n_kv = tl.cdiv(seq_k, BLOCK_K)
        kv_block = combo % n_kv
        batch = combo // n_kv // num_kv_heads
        kv_head = combo // n_kv % num_kv_heads
        in_block = sub * BLOCK_N + tl.arange(0, BLOCK_N)
        first_key = kv_block * BLOCK_K + sub * BLOCK_N
        key_pos = kv_block * BLOCK_K + in_block
        key_ok = (key_pos < seq_k) & (in_block < BLOCK_K)
        offs_d = tl.arange(0, HEAD_DIM)
        offset = seq_k - seq_q

        k_offset = batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_offset = batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        k = tl.load(K + k_offset + key_pos[:, None] * stride_ks + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(V + v_offset + key_pos[:, None] * stride_vs + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        rows = tl.arange(0, BLOCK_M)
        entry_in_step = rows // (HEADS * TILE_TOKENS)
        token_in_tile = rows % TILE_TOKENS
        head_in_chunk = rows % (HEADS * TILE_TOKENS) // TILE_TOKENS
        # ItemChunk: one head set, or -1 for all of the group's; a key step past the sequence
        # end (the grid covers whole blocks) has nothing to do.
        chunks_per_group = group // HEADS
        only = tl.load(ItemChunk + item)
        first_chunk = tl.where(only < 0, 0, only)
        last_chunk = tl.where(first_key < seq_k, tl.where(only < 0, chunks_per_group, only + 1), first_chunk)
        for chunk_in_group in range(first_chunk, last_chunk):
            first_head = (kv_head * chunks_per_group + chunk_in_group) * HEADS
            list_row = batch * list_stride_b + (first_head // pattern_head_divisor) * list_stride_h + kv_block
            dk, dv = _dkdv_walk(
                dk, dv, k, v, Q, DOut, Lse, Delta, TTiles, TBits,
                tl.maximum(tl.load(TOffsets + list_row), start), tl.minimum(tl.load(TOffsets + list_row + 1), end),
                batch, first_head + head_in_chunk, first_key, key_pos, key_ok, entry_in_step, token_in_tile, offs_d,
                stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds,
                num_q_heads, seq_q, offset, qk_scale,
                BLOCK_Q, TILE_TOKENS, ENTRIES, CAUSAL, DOT_FP32, PRECISION, SKIP_EARLY, NARROW,
            )  # fmt: skip

        if partial < 0:  # the block's only item: the gradient itself
            # dK and dV are contiguous tensors of one shape: one set of strides.
            gradient = batch.to(tl.int64) * stride_gb + kv_head.to(tl.int64) * stride_gh
            gradient_rows = gradient + key_pos[:, None] * stride_gs + offs_d[None, :]
            tl.store(DK + gradient_rows, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
            tl.store(DV + gradient_rows, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])
        else:
            part_rows = (partial.to(tl.int64) * BLOCK_K + in_block)[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(PartDK + part_rows, dk, mask=key_ok[:, None])
            tl.store(PartDV + part_rows, dv, mask=key_ok[:, None])

    @triton.jit
    def _dkdv_sum(
        PartDK, PartDV, DK, DV, Combos, FirstPartial, Counts,
        stride_gb, stride_gh, stride_gs,
        num_kv_heads, seq_k, scale,
        HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """The partial dK/dV of a block split over several work items, summed in item order."""
        STEPS: tl.constexpr = (BLOCK_K + BLOCK_R - 1) // BLOCK_R
        index = tl.program_id(0) // STEPS
        in_block = (tl.program_id(0) % STEPS) * BLOCK_R + tl.arange(0, BLOCK_R)
        combo = tl.load(Combos + index)
        if combo < 0:  # a spare slot
            return
        first = tl.load(FirstPartial + index)
        n_kv = tl.cdiv(seq_k, BLOCK_K)
        kv_block = combo % n_kv
        batch = combo // n_kv // num_kv_heads
        kv_head = combo // n_kv % num_kv_heads
        key_pos = kv_block * BLOCK_K + in_block
        key_ok = (key_pos < seq_k) & (in_block < BLOCK_K)
        offs_d = tl.arange(0, HEAD_DIM)
        dk = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
        for i in range(tl.load(Counts + index)):
            part_rows = ((first.to(tl.int64) + i) * BLOCK_K + in_block)[:, None] * HEAD_DIM + offs_d[None, :]
            dk += tl.load(PartDK + part_rows, mask=key_ok[:, None], other=0.0)
            dv += tl.load(PartDV + part_rows, mask=key_ok[:, None], other=0.0)
        gradient = batch.to(tl.int64) * stride_gb + kv_head.to(tl.int64) * stride_gh
        gradient_rows = gradient + key_pos[:, None] * stride_gs + offs_d[None, :]
        tl.store(DK + gradient_rows, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(DV + gradient_rows, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@dataclass(frozen=True)
class DkdvWork:
    """The dK/dV work items of one pattern at one head packing (see :func:`dkdv_work`).

    Per item: ``combo`` int32 ``(batch * Hkv + kv_head) * n_kv + kv_block``, or -1 for a spare
    item (nothing to do); ``chunk`` int32, the one set of packed heads it walks, or -1 for all of
    the group's; ``start`` / ``end`` int64, bounds on the transposed-list entries it takes;
    ``partial`` int32, its partial slot, or -1 when it is its block's only item. Items of one
    block are adjacent, spare ones last. Per block split over several items (spare slots: -1):
    ``sum_combos``, ``sum_first`` (its first partial slot), ``sum_counts``. ``partial_count``:
    the number of partial slots on its way to the host: read it through :attr:`partials`.
    """

    combo: torch.Tensor
    chunk: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    partial: torch.Tensor
    sum_combos: torch.Tensor
    sum_first: torch.Tensor
    sum_counts: torch.Tensor
    partial_count: HostCopy

    @property
    def partials(self) -> int:
        """The number of partial slots (waits for its copy, not for the device's queue)."""
        return int(self.partial_count.get())


def dkdv_work(pattern, t_offsets: torch.Tensor, *, batch: int, q_heads: int, kv_heads: int, heads: int, entries: int):
    """Work items for the dK/dV pass, built once per pattern and packing.

    A KV block's program walks the transposed lists of every set of packed heads of its group,
    summing dK/dV in registers. A block that many query tiles list (NSA's first block is listed
    by every token) would leave that program walking the whole sequence while the others have
    finished: a block whose lists hold more than :data:`SEGMENT_FACTOR` x the mean list length
    (and more than :data:`MIN_SEGMENT` entries) is cut into items of that many entries of one
    head set each, with float32 partial dK/dV summed afterwards in item order (deterministic).
    The factor is a design choice, not a measurement.

    Nothing here waits on the device (the lists' lengths are data): the mean is taken over the
    padded pattern's slots (every slot used: an upper bound of the mean, equal to it where every
    list is full, as NSA's and MoBA's top-k lists nearly are), and the item arrays have a length
    known in advance, an upper bound of the items (one per pair of block and head set, plus one
    per segment of the lists' total), the spare ones last with ``combo`` -1. Only the number of
    partial slots (the backward's buffers) is read on the host, from a copy taken without
    waiting (:attr:`DkdvWork.partials`).
    """
    key = ("token_dkdv_work", batch, q_heads, kv_heads, heads, entries)
    cached = pattern.cached_plan(key)
    if cached is not None:
        return cached
    device, n_kv = pattern.device, pattern.num_kv_blocks
    chunks = q_heads // kv_heads // heads
    n_combos = batch * kv_heads * n_kv
    n_pairs = n_combos * chunks
    # Per (block, head set): its transposed list.
    pair = torch.arange(n_pairs, device=device)
    pair_combo, pair_chunk = pair // chunks, pair % chunks
    sequence = pair_combo // (n_kv * kv_heads) if pattern.batch > 1 else torch.zeros_like(pair_combo)
    first_head = ((pair_combo // n_kv % kv_heads) * chunks + pair_chunk) * heads
    row = (sequence * pattern.num_heads + first_head // (q_heads // pattern.num_heads)) * n_kv + pair_combo % n_kv
    first, count = t_offsets[row], t_offsets[row + 1] - t_offsets[row]
    # Bounds from the padded pattern: its slots per transposed row, and the entries all pairs walk
    # (each list row is walked by this many pairs of every sequence).
    slots = pattern.kv_indices.numel()
    mean = slots / max(1, t_offsets.numel() - 1)
    segment = -(-max(MIN_SEGMENT, int(SEGMENT_FACTOR * mean)) // entries) * entries
    walks = -(-(kv_heads * chunks) // pattern.num_heads) * (batch // pattern.batch)
    longest = slots * walks // segment  # at most this many segments of `segment` entries (and split blocks)
    split = count.view(n_combos, chunks).sum(1) > segment
    # Items per pair: a whole block one item (on its first pair) over all head sets and whole
    # lists; a split block's head sets the segments of their lists.
    per_pair = torch.where(split[pair_combo], (count + segment - 1) // segment, (pair_chunk == 0).long())
    ends = torch.cumsum(per_pair, 0)
    item = torch.arange(n_pairs + longest, device=device)
    item_pair = torch.searchsorted(ends, item, right=True)  # n_pairs: a spare item
    real = item_pair < n_pairs
    item_pair = item_pair.clamp_max(n_pairs - 1)
    is_part = real & split[pair_combo[item_pair]]
    start = first[item_pair] + (item - (ends - per_pair)[item_pair]) * segment
    # (A whole block's item is bounded by its lists alone: `end` past every entry.)
    end = torch.where(is_part, torch.minimum(start + segment, (first + count)[item_pair]), t_offsets[-1])
    # Per split block (ascending, as their items): its first partial slot and item count.
    n_sums = min(n_combos, longest)
    block_items = per_pair.view(n_combos, chunks).sum(1)
    block_parts = torch.where(split, block_items, 0)
    spare = torch.where(split, torch.cumsum(split, 0) - 1, n_sums)
    sums = torch.full((3, n_sums + 1), -1, dtype=torch.int64, device=device)
    sums.index_put_(
        (torch.arange(3, device=device)[:, None], spare[None, :]),
        torch.stack([torch.arange(n_combos, device=device), torch.cumsum(block_parts, 0) - block_parts, block_items]),
    )
    work = DkdvWork(
        combo=torch.where(real, pair_combo[item_pair], -1).to(torch.int32),
        chunk=torch.where(is_part, pair_chunk[item_pair], -1).to(torch.int32),
        start=torch.where(is_part, start, 0),
        end=end,
        partial=torch.where(is_part, torch.cumsum(is_part, 0) - 1, -1).to(torch.int32),
        sum_combos=sums[0, :n_sums].to(torch.int32),
        sum_first=sums[1, :n_sums].to(torch.int32),
        sum_counts=sums[2, :n_sums].to(torch.int32),
        partial_count=HostCopy.of(is_part.sum()),  # read when the backward allocates
    )
    return pattern.store_plan(key, work)


# Software-pipelining depths the backward passes autotune over. Compiled for sm_90a at NSA's shape
# (16 heads of 128, 64-key blocks; with a launch's alignment hints), the loops' tile loads depend
# on list entries loaded in the loop, and Triton overlaps them with the previous step only from
# some depth on: the dQ pass's K/V copies from 3 stages (at 2 every step waits for all its copies),
# the dK/dV pass's gathered Q/dO copies from 5 (at 2 the entries are even loaded synchronously,
# then the copies waited for at once; 5 keeps copies in flight across steps, 133 KB of shared
# memory at 64 rows x 64 keys, 252 registers at 8 warps, no spills). The 40th session offered
# 1/2/3/4 (dQ) and 1/2/3/5 (dK/dV); on one H100 in the 41st (NSA's selected branch at 64K, one-
# and four-token tiles) the autotuner never took a depth past 2 (dQ 2, dK/dV 1 or 2), so the
# sets are back to 1/2, which hold every winner, and the first call per shape tunes 12
# configurations per pass instead of 24. The gain that run measured (41.22 -> 39.09 and 54.52 ->
# 51.86 ms forward + backward) came with the int32 row offsets (NARROW_ROW_OFFSETS).
STAGES = {"dq": (1, 2), "dkdv": (1, 2)}


@functools.cache
def _autotuned(kind: str, block_k: int, is_float32: bool):
    """The ``kind`` pass (``"dq"`` or ``"dkdv"``) autotuned over key steps, warps and stages."""
    steps = block_n_candidates(block_k)
    if is_float32:
        steps = tuple(n for n in steps if n <= 64)
    tuning = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n in steps for w in (4, 8) for s in STAGES[kind]
    ]
    kernel = {"dq": _token_dq, "dkdv": _token_dkdv}[kind]
    keys = ["seq_bucket", "HEAD_DIM", "BLOCK_Q", "BLOCK_K", "HEADS", "TILE_TOKENS", "BLOCK_M", "CAUSAL", "PRECISION"]
    return triton.autotune(
        configs=tuning,
        key=keys + (["SKIP_EARLY"] if kind == "dkdv" else []),
        # Tuning runs the pass several times: dQ accumulated into a caller's buffer is restored.
        restore_value=["DQ"] if kind == "dq" else None,
    )(kernel)


def dkdv_plan(q: torch.Tensor, k: torch.Tensor, pattern):
    """``(tiling, lists, entries, work)`` of the dK/dV pass: the row packing, the transposed union
    lists (:func:`.triton_tokens.token_lists`), the listing tiles per product and the work items
    (:func:`dkdv_work`); the lists and items are cached on the pattern. Building them does not
    wait on the device (only the partial-slot count is read, behind an event); :func:`prepare_backward`
    builds them during the forward, off the default stream."""
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    tiling, gathered_path = None, gathered.uses_gathered_path(pattern, q_heads, kv_heads)
    if gathered_path or DKDV_ONE_BLOCK_TILES:  # (the forward's tiling is asked for only where it is used)
        packing = token_tiling(q_heads, kv_heads, pattern.num_heads, pattern.block_q)
        if gathered_path or packing.heads * pattern.block_q >= DKDV_ONE_BLOCK_MIN_ROWS:
            # dK/dV walk one query block per entry (the gathered path's lists; DKDV_ONE_BLOCK_TILES).
            tiling = dataclasses.replace(packing, tile_blocks=1, tile_tokens=pattern.block_q)
    if tiling is None:
        tiling = token_tiling(q_heads, kv_heads, pattern.num_heads, pattern.block_q, pattern)
    # (Lists the forward built, on the default stream, may still be in the making when this runs
    # on prepare_backward's side stream.)
    lists = wait_for_lists(token_lists(pattern, tiling.tile_blocks))
    # Several listing tiles per step: up to DKDV_ROWS rows per product.
    entries = DKDV_ROWS // (tiling.heads * tiling.tile_tokens)
    work = dkdv_work(
        pattern, lists.t_offsets, batch=batch, q_heads=q_heads, kv_heads=kv_heads, heads=tiling.heads, entries=entries
    )
    return tiling, lists, entries, work


_side_streams: dict = {}


def prepare_backward(q: torch.Tensor, k: torch.Tensor, plan: BlockSparsePlan, pattern_ready) -> None:
    """Build the dK/dV pass's lists and work items (:func:`dkdv_plan`) now, while the forward's
    kernels run, instead of in the backward. When the build waited on the device (about ten
    waits at NSA's 64K until the 43rd session) each wait drained the queue of backward kernels
    already launched; it no longer waits (the partial-slot count is read behind an event), and
    the side stream still overlaps its small kernels with the forward's (not timed apart).

    On CUDA they are built on a side stream that starts at ``pattern_ready`` (an event recorded
    on the current stream once the pattern's tensors were written, before the forward's
    kernels), so the host waits for the pattern, not for the forward; the current stream then
    waits for the side stream before its next work, and the built tensors are marked as used
    by it (``record_stream``) for the caching allocator. Elsewhere nothing is done here: the
    backward builds them as before. Measured gain: NSA's 64K forward + backward 0.3-0.8 ms faster
    on an H100 (``benchmarks/results/h100/nsa_box_prep_ab_s54.json``), of the 4.8 ms the lists
    cost to build on the H200."""
    if q.device.type != "cuda" or pattern_ready is None:
        return
    main = torch.cuda.current_stream(q.device)
    side = _side_streams.get(q.device)
    if side is None:
        side = _side_streams[q.device] = torch.cuda.Stream(q.device)
    side.wait_event(pattern_ready)
    with torch.cuda.stream(side):
        _, lists, _, work = dkdv_plan(q, k, plan.pattern)
    main.wait_stream(side)
    for built in (lists, work):
        for field in dataclasses.fields(built):
            value = getattr(built, field.name)
            if isinstance(value, torch.Tensor):
                value.record_stream(main)


def backward(q, k, v, out, lse, dout, dlse, plan: BlockSparsePlan, *, scale: float, delta=None, dq_into=None):
    """``(dq, dk, dv)`` in the inputs' dtypes and shapes (dK/dV summed over each GQA group).

    ``out`` and ``lse`` are the forward's output and natural-log log-sum-exp (float32
    ``(B, Hq, Sq)``), ``dout`` the output's gradient, ``dlse`` the log-sum-exp's gradient or
    ``None``. Gradients come from :func:`.launch.allocate`. ``delta`` (precomputed
    ``rowsum(dout * out) - dlse``) and ``dq_into`` (q's gradient added into it): as
    :func:`.triton_backward.backward`'s.
    """
    pattern, causal = plan.pattern, plan.causal
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    q, k, v, out, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, out, dout))
    dk, dv = (launch.allocate(x.shape, x.dtype, x.device) for x in (k, v))
    lse = lse.contiguous()
    check_fused_arguments(q, delta, dq_into)
    if delta is None:
        delta = row_delta(out, dout, dlse)

    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    sizes = (q_heads, q_heads // kv_heads, q_heads // pattern.num_heads, seq_q, seq_k)
    sizes += (scale, scale * LOG2_E, length_bucket(seq_k))
    is_float32 = q.dtype == torch.float32
    if gathered.uses_gathered_path(pattern, q_heads, kv_heads):
        dq = gathered.dq(q, k, v, dout, lse, delta, pattern, causal=causal, scale=scale)
        if dq_into is not None:
            dq = dq_into.add_(dq)
    else:
        tiling, program, grid, shared = launch_geometry(q, k, pattern)
        dq = dq_into if dq_into is not None else launch.allocate(q.shape, q.dtype, q.device)
        dq_args = (
            *(q, k, v, dout, lse, delta, dq, *program),
            *strides,
            *dq.stride()[:3],
            *shared,  # list strides, head counts, lengths and the lists' width
            *sizes[5:],  # the scales and the autotuning bucket
        )
        constants = dict(kernel_constants(q, pattern, tiling, causal=causal), ACCUMULATE=dq_into is not None)
        if interpreting():
            _token_dq[grid](*dq_args, BLOCK_N=16, **constants)
        else:
            _autotuned("dq", pattern.block_k, is_float32)[grid](*dq_args, **constants)

    tiling, lists, entries, work = dkdv_plan(q, k, pattern)
    part_dk, part_dv = (
        torch.empty((max(work.partials, 1), pattern.block_k, dim), dtype=torch.float32, device=q.device)
        for _ in range(2)
    )
    dkdv_args = (
        *(q, k, v, dout, lse, delta, dk, dv, part_dk, part_dv, lists.t_offsets, lists.t_tiles, lists.t_bits),
        *(work.combo, work.chunk, work.start, work.end, work.partial),
        *strides,
        *dk.stride()[:3],
        *list_strides(pattern, pattern.num_kv_blocks),
        *sizes,
    )
    constants = dict(
        kernel_constants(q, pattern, tiling, causal=causal),
        BLOCK_M=DKDV_ROWS,
        ENTRIES=entries,
        SKIP_EARLY=DKDV_SKIP_EARLY,
        NARROW=NARROW_ROW_OFFSETS and rows_fit_int32(q, dout),
    )

    def dkdv_grid(meta):
        return (work.combo.numel() * num_blocks(pattern.block_k, meta["BLOCK_N"]),)

    if interpreting():
        _token_dkdv[dkdv_grid({"BLOCK_N": 16})](*dkdv_args, BLOCK_N=16, **constants)
    else:
        _autotuned("dkdv", pattern.block_k, is_float32)[dkdv_grid](*dkdv_args, **constants)
    if work.sum_combos.numel():
        block_r = 32
        _dkdv_sum[(work.sum_combos.numel() * num_blocks(pattern.block_k, block_r),)](
            *(part_dk, part_dv, dk, dv, work.sum_combos, work.sum_first, work.sum_counts),
            *dk.stride()[:3],
            *(kv_heads, seq_k, scale),
            HEAD_DIM=dim,
            BLOCK_K=pattern.block_k,
            BLOCK_R=block_r,
        )
    return dq, dk, dv
