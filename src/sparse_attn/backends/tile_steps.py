"""Triton helpers shared by the pointer-based block kernels (:mod:`.triton`, :mod:`.triton_blasst`, :mod:`.triton_compensated`).

:func:`block_scores` loads one KV tile through pointers and returns its scores with the causal
and sequence-bound masks applied; :func:`online_update` folds a tile of scores (scaled, log2
units) into the running maximum, sum and accumulator of the online softmax. A row that has
seen no key keeps ``m = -inf`` and takes its exponents against 0, so no ``inf - inf`` arises.
:func:`store_rows` writes a tile's output rows and natural-log LSE. :func:`wave_item` places a
program of a 1D grid in the launch order of :func:`.launch.heads_per_wave`, :func:`lead_wave_item`
the same after a lead of heavy query blocks (:func:`.launch.lead_blocks`); :func:`work_item`
places a query tile of the Gluon forward and dQ kernels (which call these Triton functions as they
are), :func:`dense_tile_item` a taller query tile of the Gluon forward on a dense pattern.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

if triton is not None:

    @triton.jit
    def wave_item(item, per_wave, num_tiles):
        """The ``item``-th program of a 1D grid: ``(tile_rank, batch_head)``. Programs come in waves
        of ``per_wave`` consecutive (batch, head) pairs, a wave's ``num_tiles`` tiles in rank order
        with its heads side by side (:func:`sparse_attn.backends.launch.heads_per_wave`)."""
        wave_items = per_wave * num_tiles
        wave = item // wave_items
        rank = item - wave * wave_items
        return rank // per_wave, wave * per_wave + rank % per_wave

    @triton.jit
    def lead_wave_item(item, per_wave, num_tiles, lead_tiles, all_heads):
        """:func:`wave_item` after a lead: the first ``lead_tiles`` tile ranks (the plan's heavy
        blocks, :func:`sparse_attn.backends.launch.lead_blocks`) of all ``all_heads``
        (batch, head) pairs come first, heads side by side, then the waves over the other ranks.
        ``lead_tiles < num_tiles``; ``lead_tiles = 0`` is :func:`wave_item`."""
        lead_items = lead_tiles * all_heads
        rest_rank, rest_head = wave_item(tl.maximum(item - lead_items, 0), per_wave, num_tiles - lead_tiles)
        in_lead = item < lead_items
        rank = tl.where(in_lead, item // all_heads, lead_tiles + rest_rank)
        batch_head = tl.where(in_lead, item % all_heads, rest_head)
        return rank, batch_head

    @triton.jit
    def work_item(
        tile_rank, batch_head, WorkOrder, KvCounts, KvFullCounts, KvIndices,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Where one work item of the warp-specialized kernels is: the ``tile_rank``-th 128-row query
        tile in the plan's work order (heaviest query blocks first) of head ``batch_head``, walking
        ``BLOCK_N``-key steps. Returns its batch, head, KV head, first row, steps, full steps
        (from ``KvFullCounts``) and block-list base."""
        TILES_PER_BLOCK: tl.constexpr = BLOCK_Q // 128
        SUBTILES: tl.constexpr = BLOCK_K // BLOCK_N
        q_block = tl.load(WorkOrder + tile_rank // TILES_PER_BLOCK)
        tile = q_block * TILES_PER_BLOCK + tile_rank % TILES_PER_BLOCK
        batch = batch_head // num_q_heads
        head = batch_head % num_q_heads
        kv_head = head // group
        pattern_head = head // pattern_head_divisor
        count_offset = batch * stride_cb + pattern_head * stride_ch + q_block
        n_steps = tl.load(KvCounts + count_offset) * SUBTILES
        n_full = tl.load(KvFullCounts + count_offset) * SUBTILES
        index_base = KvIndices + batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + q_block * stride_iq
        return batch, head, kv_head, tile * 128, n_steps, n_full, index_base

    @triton.jit
    def dense_tile_item(
        tile_rank, batch_head, KvCounts, KvFullCounts, KvIndices,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, num_q_heads, group, pattern_head_divisor,
        num_tiles, num_q_blocks,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """:func:`work_item` for query tiles of ``BLOCK_M`` rows that need not match the pattern's
        ``BLOCK_Q``, for patterns whose lists are nested (a later query block's list holds an
        earlier one's, in the same order): dense patterns. The ``tile_rank``-th tile is counted
        from the last (heaviest first under a causal mask); it walks the list of the last pattern
        block it covers, and its full steps are those of the first (full for every row of it)."""
        SUBTILES: tl.constexpr = BLOCK_K // BLOCK_N
        tile = num_tiles - 1 - tile_rank
        row_start = tile * BLOCK_M
        first_block = row_start // BLOCK_Q
        last_block = tl.minimum((row_start + BLOCK_M - 1) // BLOCK_Q, num_q_blocks - 1)
        batch = batch_head // num_q_heads
        head = batch_head % num_q_heads
        kv_head = head // group
        pattern_head = head // pattern_head_divisor
        count_base = batch * stride_cb + pattern_head * stride_ch
        n_steps = tl.load(KvCounts + count_base + last_block) * SUBTILES
        n_full = tl.load(KvFullCounts + count_base + first_block) * SUBTILES
        index_base = KvIndices + batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + last_block * stride_iq
        return batch, head, kv_head, row_start, n_steps, n_full, index_base

    @triton.jit
    def block_scores(
        q, k_base, v_base, key_pos, stride_ks, stride_vs, query_pos, seq_k, offs_d,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):  # fmt: skip
        """``(scores, v)`` of the keys at ``key_pos``: ``q k^T`` unscaled, ``-inf`` where the causal /
        bounds mask hides a key (``MASKED`` tiles only; ``EVEN_K``: no key past ``seq_k``), and the V tile."""
        k_rows = k_base + key_pos[:, None] * stride_ks + offs_d[None, :]
        v_rows = v_base + key_pos[:, None] * stride_vs + offs_d[None, :]
        if MASKED and not EVEN_K:
            in_bounds = key_pos < seq_k
            k_tile = tl.trans(tl.load(k_rows, mask=in_bounds[:, None], other=0.0))
            v = tl.load(v_rows, mask=in_bounds[:, None], other=0.0)
        else:
            k_tile = tl.trans(tl.load(k_rows))
            v = tl.load(v_rows)
        if DOT_FP32:
            scores = tl.dot(q.to(tl.float32), k_tile.to(tl.float32), input_precision=PRECISION)
        else:
            scores = tl.dot(q, k_tile, input_precision=PRECISION)
        if MASKED:
            if EVEN_K:
                visible = key_pos[None, :] <= query_pos[:, None]
            else:
                visible = key_pos[None, :] < seq_k
                if CAUSAL:
                    visible = visible & (key_pos[None, :] <= query_pos[:, None])
            if CAUSAL or not EVEN_K:
                scores = tl.where(visible, scores, float("-inf"))
        return scores, v

    @triton.jit
    def online_update(acc, m_i, l_i, scores, v, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """``(acc, m, l)`` after one tile of ``scores`` (scaled, log2 units) and its ``v``."""
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def store_rows(
        Out, Lse, acc, m_i, l_i, batch, head, batch_head, rows, row_in_range, offs_d,
        stride_ob, stride_oh, stride_os, seq_q,
        EVEN_Q: tl.constexpr, WRITE_LSE: tl.constexpr, EMPTY_ROWS: tl.constexpr,
    ):  # fmt: skip
        """``acc / l`` into ``Out``'s rows (all rows when ``EVEN_Q``, else those in range) and, with
        ``WRITE_LSE``, the LSE (scores were kept in log2 units; it is returned in natural-log units).
        ``EMPTY_ROWS``: a row may have seen no key (a token rule): ``l = 0`` gives output 0, LSE -inf."""
        if EMPTY_ROWS:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        else:
            out = acc / l_i[:, None]
        out_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        out_pointers = out_base + rows[:, None] * stride_os + offs_d[None, :]
        if EVEN_Q:
            tl.store(out_pointers, out.to(Out.dtype.element_ty))
        else:
            tl.store(out_pointers, out.to(Out.dtype.element_ty), mask=row_in_range[:, None])
        if WRITE_LSE:
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
            tl.store(Lse + batch_head.to(tl.int64) * seq_q + rows, lse, mask=row_in_range)
