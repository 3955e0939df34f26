"""Fused NSA decode step: four Triton kernels, no host synchronisation, no autotuning.

The rule and its choices are :mod:`sparse_attn.ops.nsa_decode`'s (the reference is :mod:`.naive`).
Every kernel packs the ``G`` query heads of one KV head into the rows of one tile (padded to
``BLOCK_G >= 16``, the smallest ``tl.dot``), so each compressed token and each key is read once
per group, as in the paged decode kernel (:mod:`sparse_attn.ops.paged_decode.triton`).

1. ``_compressed_split`` — one program per (sequence, KV head, split of the visible compressed
   tokens): the group's scores (log2 units) for its tokens, written to a float32 scratch
   ``(B * Hkv, G, n_visible)``, and an online softmax over them giving the split's normalised
   output and log-sum-exp (flash-decoding's split-K).
2. ``_score_blocks`` — one program per (sequence, KV head, chunk of selection blocks): each
   head's log-sum-exp from the splits', then per block the group-summed probabilities of the
   compressed tokens overlapping it, weighted by the stride pieces they share
   (``spread_to_blocks``' rule: block ``j`` sums scratch columns ``j l'/d + m - n`` for
   ``m < l'/d``, ``n < l/d``), forced blocks at ``+inf``, blocks past the query's out. Each
   score is packed with its block into one int64 key (``ops.page_select``'s order: ties to the
   lower block, as the reference's stable sort) and the chunk's top ``K_TILE`` keys are
   written. At most ``MAX_CHUNKS`` chunks: a chunk grows (in whole ``SCORE_TILE`` steps, a
   power of two of them) with the sequence.
3. ``_attend_split`` — one program per (sequence, KV head, split of the tiles to attend): the
   chunks' candidates merged (one ``tl.topk``), then the tiles of its range, selected blocks
   first (keys at or past the sequence end masked), then the window's (``[Sk - w, Sk)``), each
   branch with its own online softmax; both partial results written.
4. ``_combine`` — one program per (sequence, KV head): the splits of each branch merged by
   their log-sum-exps, the gates ``sigmoid(q . W + b)`` (the product rounded to q's dtype, as
   the reference's einsum), the gated sum written in q's dtype.

Launch choices are fixed (no autotuning: a generation crosses length buckets, and tuning at each
made steps spike in an earlier version), and depend on shapes only, so a step can be captured in
a CUDA graph. Splits aim at ``PROGRAMS_PER_SM`` programs per SM. Under ``TRITON_INTERPRET=1``
bf16 products are taken in float32 (:func:`sparse_attn.utils.dot_in_float32`).
"""

from __future__ import annotations

import functools

import torch

from ...backends import launch
from ...utils import dot_in_float32, interpreting
from .._dispatch import head_tile_unsupported_reason
from ..compressed_scores.naive import visible_count
from .naive import selection_size

try:
    import triton
    import triton.language as tl

    from .._triton_util import group_rows, nsa_gate, online_softmax_step
    from ..page_select.triton import _key_index, _sort_key
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["launch_plan", "nsa_decode_triton", "selection_triton", "unsupported_reason"]

LOG2_E = 1.4426950408889634
MAX_GROUP = 128
MAX_TOP_N = 128
MAX_CHUNKS = 16  # candidate lists per (sequence, KV head) that the attend kernel merges
SCORE_TILE = 256  # selection blocks scored (and compressed tokens summed) per step of a chunk
SPLIT_TILE = 32  # splits merged per step (fixed, so a growing sequence does not recompile)
PROGRAMS_PER_SM = 2
MIN_TOKENS_PER_SPLIT = 256  # compressed tokens per split of kernel 1, at least


def unsupported_reason(q: torch.Tensor, *, head_dim: int, group: int, top_n: int) -> str | None:
    """Why :func:`nsa_decode_triton` cannot run this case, or ``None``."""
    reason = head_tile_unsupported_reason(q, head_dim, triton)
    if reason is not None:
        return reason
    if group > MAX_GROUP:
        return f"takes at most {MAX_GROUP} query heads per KV head, got {group}"
    if top_n > MAX_TOP_N:
        return f"takes select_top_n <= {MAX_TOP_N}, got {top_n}"
    return None


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def launch_plan(
    batch: int, kv_heads: int, seq_k: int, visible: int, *, select_block: int, top_n: int, window: int,
    head_dim: int, multiprocessors: int,
) -> dict:  # fmt: skip
    """The launch choices for one step (from shapes only): splits, tiles and block sizes (cached:
    callers copy before changing it)."""
    programs = PROGRAMS_PER_SM * multiprocessors
    streams = batch * kv_heads
    splits_c = tokens_per_split = 0
    keys_c = 64 if head_dim <= 128 else 32
    if visible:
        splits_c = max(1, min(_cdiv(programs, streams), _cdiv(visible, MIN_TOKENS_PER_SPLIT)))
        tokens_per_split = _cdiv(_cdiv(visible, splits_c), keys_c) * keys_c
        splits_c = _cdiv(visible, tokens_per_split)
    n_blocks = (seq_k - 1) // select_block + 1
    chunk_tiles = _pow2(_cdiv(n_blocks, SCORE_TILE * MAX_CHUNKS))
    chunks = _cdiv(n_blocks, chunk_tiles * SCORE_TILE)
    keys_a = min(64 if head_dim <= 128 else 32, max(16, _pow2(select_block)))
    n_take = selection_size(seq_k, visible, select_block, top_n)
    tiles_per_block = _cdiv(select_block, keys_a)
    window_start = max(0, seq_k - window)
    tiles = n_take * tiles_per_block + (_cdiv(seq_k - window_start, keys_a) if window else 0)
    splits_a = max(1, min(tiles, _cdiv(programs, streams)))
    tiles_per_split = _cdiv(tiles, splits_a)
    return dict(
        splits_c=splits_c, tokens_per_split=tokens_per_split, keys_c=keys_c, chunk_tiles=chunk_tiles,
        chunks=chunks, keys_a=keys_a, n_take=n_take, tiles_per_block=tiles_per_block,
        window_start=window_start, tiles=tiles, splits_a=_cdiv(tiles, tiles_per_split), tiles_per_split=tiles_per_split,
        k_tile=max(2, _pow2(top_n)),
    )  # fmt: skip


if triton is not None:
    MIN_KEY = tl.constexpr(-(2**63))

    @triton.jit
    def _store_partial(PartOut, PartLse, row_index, m_i, l_i, acc, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr):
        """A split's normalised output and log-sum-exp (log2; ``-inf`` and 0 without keys) at
        ``row_index`` (in units of ``BLOCK_G`` rows)."""
        rows = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        has_keys = l_i > 0.0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        base = row_index.to(tl.int64) * BLOCK_G + rows
        tl.store(PartOut + base[:, None] * HEAD_DIM + offs_d[None, :], out)
        tl.store(PartLse + base, lse)

    @triton.jit(do_not_specialize=["visible", "tokens_per_split"])
    def _compressed_split(
        Q, KC, VC, Scores, PartOut, PartLse,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        num_kv_heads, group, visible, tokens_per_split, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Kernel 1: one (sequence, KV head, split of the visible compressed tokens)."""
        stream = tl.program_id(0)
        batch = stream // num_kv_heads
        kv_head = stream % num_kv_heads
        split = tl.program_id(1)
        q, rows, row_ok, heads = group_rows(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        k_base = KC + batch.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = VC + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
        score_rows = Scores + stream.to(tl.int64) * group * visible + rows[:, None] * visible
        first = split * tokens_per_split
        last = tl.minimum(visible, first + tokens_per_split)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        for start in range(first, last, BLOCK_N):
            cols = start + offs_n
            ok = cols < last
            k_pointers = k_base + cols[:, None] * stride_kn + offs_d[None, :]
            v_pointers = v_base + cols[:, None] * stride_vn + offs_d[None, :]
            scores, m_i, l_i, acc = online_softmax_step(q, k_pointers, v_pointers, ok, m_i, l_i, acc, qk_scale, DOT_FP32,
                                                  PRECISION)  # fmt: skip
            tl.store(score_rows + cols[None, :], scores, mask=row_ok[:, None] & ok[None, :])
        _store_partial(PartOut, PartLse, stream * tl.num_programs(1) + split, m_i, l_i, acc, HEAD_DIM, BLOCK_G)

    @triton.jit
    def _head_lse(PartLse, stream, num_splits, group, BLOCK_G: tl.constexpr, SPLIT_TILE: tl.constexpr):
        """``(lse, seen)``: each row's log-sum-exp (log2) over every visible compressed token, from
        the splits' (``SPLIT_TILE`` splits at a time), and whether the row sees any."""
        rows = tl.arange(0, BLOCK_G)
        splits = tl.arange(0, SPLIT_TILE)
        top = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_G], dtype=tl.float32)
        for first in range(0, num_splits, SPLIT_TILE):
            parts = tl.load(
                PartLse + (stream.to(tl.int64) * num_splits + first + splits[None, :]) * BLOCK_G + rows[:, None],
                mask=(first + splits < num_splits)[None, :],
                other=float("-inf"),
            )
            new_top = tl.maximum(top, tl.max(parts, 1))
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            total = total * tl.math.exp2(top - safe) + tl.sum(tl.math.exp2(parts - safe[:, None]), 1)
            top = new_top
        seen = (rows < group) & (total > 0.0)
        return tl.where(seen, top + tl.math.log2(tl.where(seen, total, 1.0)), 0.0), seen

    @triton.jit(do_not_specialize=["visible", "own"])
    def _score_blocks(
        Scores, PartLse, TokenSums, Candidates, num_splits, group, visible, own,
        BLOCK_G: tl.constexpr, SPLIT_TILE: tl.constexpr, SCORE_TILE: tl.constexpr, CHUNK_TILES: tl.constexpr,
        PIECES_PER_KEY: tl.constexpr, PIECES_PER_BLOCK: tl.constexpr, K_TILE: tl.constexpr,
        MAX_CHUNKS: tl.constexpr,
    ):  # fmt: skip
        """Kernel 2: one (sequence, KV head, chunk of selection blocks): the chunk's top keys.

        First each compressed token the chunk's blocks touch gets its group-summed probability
        (the scores read once, ``[BLOCK_G, SCORE_TILE]`` at a time), written to this program's own
        scratch row; after a barrier the blocks sum their tokens' from there (their pieces
        overlap, so each token serves up to ``l / d + l' / d - 1`` block terms)."""
        stream = tl.program_id(0)
        chunk = tl.program_id(1)
        rows = tl.arange(0, BLOCK_G)
        lse, seen = _head_lse(PartLse, stream, num_splits, group, BLOCK_G, SPLIT_TILE)
        score_rows = Scores + stream.to(tl.int64) * group * visible + rows[:, None] * visible
        # This chunk's tokens, from PIECES_PER_KEY - 1 before its first block's first piece.
        first_token = chunk * CHUNK_TILES * SCORE_TILE * PIECES_PER_BLOCK - (PIECES_PER_KEY - 1)
        span: tl.constexpr = CHUNK_TILES * SCORE_TILE * PIECES_PER_BLOCK + PIECES_PER_KEY - 1
        sums = TokenSums + (stream.to(tl.int64) * tl.num_programs(1) + chunk) * span
        for start in range(0, span, SCORE_TILE):
            local = start + tl.arange(0, SCORE_TILE)
            token = first_token + local
            ok = seen[:, None] & ((token >= 0) & (token < visible) & (local < span))[None, :]
            logit = tl.load(score_rows + token[None, :], mask=ok, other=0.0)
            total = tl.sum(tl.where(ok, tl.math.exp2(logit - lse[:, None]), 0.0), 0)
            tl.store(sums + local, total, mask=local < span)
        tl.debug_barrier()  # the sums are read back by other threads of this program
        tiles = tl.arange(0, CHUNK_TILES)
        keys = tl.full([CHUNK_TILES, SCORE_TILE], MIN_KEY, tl.int64)
        for t in tl.static_range(CHUNK_TILES):
            within = t * SCORE_TILE + tl.arange(0, SCORE_TILE)
            blocks = chunk * CHUNK_TILES * SCORE_TILE + within
            score = tl.zeros([SCORE_TILE], dtype=tl.float32)
            for m in tl.static_range(PIECES_PER_BLOCK):
                for n in tl.static_range(PIECES_PER_KEY):
                    # token blocks * l'/d + m - n, at scratch index within * l'/d + m - n + (l/d - 1)
                    score += tl.load(sums + within * PIECES_PER_BLOCK + (m - n + PIECES_PER_KEY - 1))
            score = tl.where((blocks == 0) | (blocks >= own - 1), float("inf"), score)
            key = tl.where(blocks <= own, _sort_key(score, blocks), MIN_KEY)
            keys = tl.where(tiles[:, None] == t, key[None, :], keys)
        best = tl.topk(tl.reshape(keys, [CHUNK_TILES * SCORE_TILE]), K_TILE)
        tl.store(Candidates + (stream.to(tl.int64) * MAX_CHUNKS + chunk) * K_TILE + tl.arange(0, K_TILE), best)

    @triton.jit(do_not_specialize=["seq_k", "n_take", "window_start", "num_tiles", "tiles_per_split"])
    def _attend_split(
        Q, K, V, Candidates, PartOut, PartLse,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        num_kv_heads, group, seq_k, num_chunks, n_take, window_start, num_tiles, tiles_per_split, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SELECT_BLOCK: tl.constexpr,
        TILES_PER_BLOCK: tl.constexpr, K_TILE: tl.constexpr, MAX_CHUNKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Kernel 3: one (sequence, KV head, split of the tiles): both branches' partial results."""
        stream = tl.program_id(0)
        batch = stream // num_kv_heads
        kv_head = stream % num_kv_heads
        split = tl.program_id(1)
        q, rows, row_ok, heads = group_rows(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM, BLOCK_G)
        offs_c = tl.arange(0, MAX_CHUNKS * K_TILE)
        candidates = tl.load(
            Candidates + stream.to(tl.int64) * MAX_CHUNKS * K_TILE + offs_c,
            mask=offs_c < num_chunks * K_TILE,
            other=MIN_KEY,
        )
        chosen = _key_index(tl.topk(candidates, K_TILE))  # best first
        rank = tl.arange(0, K_TILE)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
        selected_tiles = n_take * TILES_PER_BLOCK
        first = split * tiles_per_split
        last = tl.minimum(num_tiles, first + tiles_per_split)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        for t in range(first, tl.minimum(last, selected_tiles)):
            block = tl.sum(tl.where(rank == t // TILES_PER_BLOCK, chosen, 0))
            within = (t % TILES_PER_BLOCK) * BLOCK_N + offs_n
            cols = block.to(tl.int64) * SELECT_BLOCK + within
            ok = (within < SELECT_BLOCK) & (cols < seq_k)
            k_pointers = k_base + cols[:, None] * stride_kn + offs_d[None, :]
            v_pointers = v_base + cols[:, None] * stride_vn + offs_d[None, :]
            _, m_i, l_i, acc = online_softmax_step(q, k_pointers, v_pointers, ok, m_i, l_i, acc, qk_scale, DOT_FP32,
                                             PRECISION)  # fmt: skip
        _store_partial(PartOut, PartLse, (stream * tl.num_programs(1) + split) * 2, m_i, l_i, acc, HEAD_DIM, BLOCK_G)
        if HAS_WINDOW:
            m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
            for t in range(tl.maximum(first, selected_tiles), last):
                cols = window_start + (t - selected_tiles).to(tl.int64) * BLOCK_N + offs_n
                ok = cols < seq_k
                k_pointers = k_base + cols[:, None] * stride_kn + offs_d[None, :]
                v_pointers = v_base + cols[:, None] * stride_vn + offs_d[None, :]
                _, m_i, l_i, acc = online_softmax_step(q, k_pointers, v_pointers, ok, m_i, l_i, acc, qk_scale, DOT_FP32,
                                                 PRECISION)  # fmt: skip
            _store_partial(PartOut, PartLse, (stream * tl.num_programs(1) + split) * 2 + 1, m_i, l_i, acc, HEAD_DIM,
                           BLOCK_G)  # fmt: skip

    @triton.jit
    def _merge(PartOut, PartLse, first_row, num_splits, row_step, row, HEAD_DIM: tl.constexpr,
               BLOCK_G: tl.constexpr, SPLIT_TILE: tl.constexpr):  # fmt: skip
        """Row ``row`` of the splits' partial results (split ``s`` at row ``first_row + s * row_step``
        of ``BLOCK_G``-row tiles) merged: ``[D]`` float32 (0 without keys)."""
        splits = tl.arange(0, SPLIT_TILE)
        offs_d = tl.arange(0, HEAD_DIM)
        top = tl.full([1], float("-inf"), dtype=tl.float32)
        weight = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for first in range(0, num_splits, SPLIT_TILE):
            ok = first + splits < num_splits
            base = (first_row + (first + splits) * row_step).to(tl.int64) * BLOCK_G + row
            lse = tl.load(PartLse + base, mask=ok, other=float("-inf"))
            part = tl.load(PartOut + base[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
            new_top = tl.maximum(top, tl.max(lse, 0))
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            alpha = tl.math.exp2(top - safe)
            beta = tl.math.exp2(lse - safe)
            acc = acc * alpha + tl.sum(part * beta[:, None], 0)
            weight = weight * alpha + tl.sum(beta, 0)
            top = new_top
        return tl.where(weight > 0.0, acc / tl.where(weight > 0.0, weight, 1.0), 0.0)

    @triton.jit(do_not_specialize=["splits_c", "splits_a"])
    def _combine(
        Q, W, Bias, PartC, LseC, PartA, LseA, Out,
        stride_qb, stride_qh, stride_ob, stride_oh, q_heads, group, splits_c, splits_a,
        HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_TILE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):  # fmt: skip
        """Kernel 4: one (sequence, query head): the gated sum of the three branches."""
        batch = tl.program_id(0) // q_heads
        head = tl.program_id(0) % q_heads
        stream = tl.program_id(0) // group  # (batch, KV head)
        row = head % group
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + batch.to(tl.int64) * stride_qb + head * stride_qh + offs_d)[None, :]
        out = _merge(PartC, LseC, stream * splits_c, splits_c, 1, row, HEAD_DIM, BLOCK_G, SPLIT_TILE)
        out = out * nsa_gate(q, W, Bias, head, 0, 3, HEAD_DIM)
        selected = _merge(PartA, LseA, stream * splits_a * 2, splits_a, 2, row, HEAD_DIM, BLOCK_G, SPLIT_TILE)
        out += selected * nsa_gate(q, W, Bias, head, 1, 3, HEAD_DIM)
        if HAS_WINDOW:
            window = _merge(PartA, LseA, stream * splits_a * 2 + 1, splits_a, 2, row, HEAD_DIM, BLOCK_G, SPLIT_TILE)
            out += window * nsa_gate(q, W, Bias, head, 2, 3, HEAD_DIM)
        tl.store(Out + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def _scored(q, k_cmp, v_cmp, *, scale, compress_block, compress_stride, select_block, top_n, window, seq_k):
    """Kernels 1 and 2: ``(plan, rows, part_c, lse_c, candidates, dots)``."""
    batch, q_heads, _, dim = q.shape
    kv_heads = k_cmp.shape[1]
    group = q_heads // kv_heads
    reason = unsupported_reason(q, head_dim=dim, group=group, top_n=top_n)
    if reason is not None:
        raise ValueError(f"the NSA decode kernels cannot run this case: {reason}")
    visible = visible_count(seq_k - 1, compress_block, compress_stride, k_cmp.shape[2])
    multiprocessors = 4 if interpreting() else _multiprocessors(q.device)
    plan = dict(
        launch_plan(
            batch, kv_heads, seq_k, visible, select_block=select_block, top_n=top_n, window=window, head_dim=dim,
            multiprocessors=multiprocessors,
        )
    )  # fmt: skip
    plan.update(block_g=max(16, triton.next_power_of_2(group)), group=group, visible=visible)
    rows = q[:, :, 0]
    rows, k_cmp, v_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (rows, k_cmp, v_cmp))
    block_g, streams, device = plan["block_g"], batch * kv_heads, q.device
    use_float32_dot = dot_in_float32(q.dtype)
    dots = dict(DOT_FP32=use_float32_dot, PRECISION="ieee" if use_float32_dot else "tf32")
    splits_c = plan["splits_c"]
    part_c = launch.allocate((streams, max(splits_c, 1), block_g, dim), torch.float32, device)
    lse_c = launch.allocate((streams, max(splits_c, 1), block_g), torch.float32, device)
    scores = launch.allocate((max(streams * group * visible, 1),), torch.float32, device)
    if splits_c:
        _compressed_split[(streams, splits_c)](
            rows, k_cmp, v_cmp, scores, part_c, lse_c, *rows.stride()[:2], *k_cmp.stride()[:3],
            *v_cmp.stride()[:3], kv_heads, group, visible, plan["tokens_per_split"], scale * LOG2_E,
            HEAD_DIM=dim, BLOCK_G=block_g, BLOCK_N=plan["keys_c"], num_warps=4, num_stages=2, **dots,
        )  # fmt: skip
    k_tile = plan["k_tile"]
    # Every chunk the attend kernel reads is written whole (the rest are masked there).
    candidates = torch.empty((streams, MAX_CHUNKS, k_tile), dtype=torch.int64, device=device)
    pieces_per_key, pieces_per_block = compress_block // compress_stride, select_block // compress_stride
    span = plan["chunk_tiles"] * SCORE_TILE * pieces_per_block + pieces_per_key - 1
    token_sums = torch.empty((streams * plan["chunks"] * span,), dtype=torch.float32, device=device)  # scratch
    _score_blocks[(streams, plan["chunks"])](
        scores, lse_c, token_sums, candidates, splits_c, group, visible, (seq_k - 1) // select_block,
        BLOCK_G=block_g, SPLIT_TILE=SPLIT_TILE, SCORE_TILE=SCORE_TILE,
        CHUNK_TILES=plan["chunk_tiles"], PIECES_PER_KEY=pieces_per_key, PIECES_PER_BLOCK=pieces_per_block,
        K_TILE=k_tile, MAX_CHUNKS=MAX_CHUNKS, num_warps=4,
    )  # fmt: skip
    return plan, rows, part_c, lse_c, candidates, dots


def selection_triton(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, seq_k: int, scale: float, compress_block: int,
    compress_stride: int, select_block: int, top_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Kernels 1 and 2 alone, for inspection and tests: ``(blocks, scores)``, int64 and float32
    ``(B, Hkv, n)``: the ``n`` blocks the step keeps, best first, and their selection scores
    (``inf`` for forced blocks), as the attend kernel merges them from the chunks' candidates."""
    plan, *_, candidates, _ = _scored(
        q, k_cmp, v_cmp, scale=scale, compress_block=compress_block, compress_stride=compress_stride,
        select_block=select_block, top_n=top_n, window=0, seq_k=seq_k,
    )  # fmt: skip
    batch, kv_heads = q.shape[0], k_cmp.shape[1]
    keys = candidates[:, : plan["chunks"]].reshape(batch, kv_heads, -1)
    keys = keys.topk(plan["n_take"], dim=-1).values
    blocks = 0x7FFFFFFF - (keys & 0x7FFFFFFF)
    bits = (keys >> 32).to(torch.int32)  # non-negative scores: their float32 bits as they are
    return blocks, bits.view(torch.float32)


def nsa_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *,
    scale: float,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    top_n: int,
    window: int,
) -> torch.Tensor:
    """:func:`.naive.nsa_decode_step_reference` in the four kernels: same arguments, same result
    ``(B, Hq, 1, D)`` in q's dtype (no gradient)."""
    batch, q_heads, _, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    plan, rows, part_c, lse_c, candidates, dots = _scored(
        q, k_cmp, v_cmp, scale=scale, compress_block=compress_block, compress_stride=compress_stride,
        select_block=select_block, top_n=top_n, window=window, seq_k=seq_k,
    )  # fmt: skip
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    gate_weight, gate_bias = gate_weight.contiguous(), gate_bias.contiguous()
    block_g, group, splits_c, k_tile = plan["block_g"], plan["group"], plan["splits_c"], plan["k_tile"]
    streams, device = batch * kv_heads, q.device
    splits_a = plan["splits_a"]
    part_a = launch.allocate((streams, splits_a, 2, block_g, dim), torch.float32, device)
    lse_a = launch.allocate((streams, splits_a, 2, block_g), torch.float32, device)
    _attend_split[(streams, splits_a)](
        rows, k, v, candidates, part_a, lse_a, *rows.stride()[:2], *k.stride()[:3], *v.stride()[:3],
        kv_heads, group, seq_k, plan["chunks"], plan["n_take"], plan["window_start"], plan["tiles"],
        plan["tiles_per_split"],
        scale * LOG2_E, HEAD_DIM=dim, BLOCK_G=block_g, BLOCK_N=plan["keys_a"], SELECT_BLOCK=select_block,
        TILES_PER_BLOCK=plan["tiles_per_block"], K_TILE=k_tile, MAX_CHUNKS=MAX_CHUNKS, HAS_WINDOW=bool(window),
        num_warps=4, num_stages=2, **dots,
    )  # fmt: skip
    out = launch.allocate((batch, q_heads, 1, dim), q.dtype, device)
    _combine[(batch * q_heads,)](
        rows, gate_weight, gate_bias, part_c, lse_c, part_a, lse_a, out, *rows.stride()[:2],
        out.stride(0), out.stride(1), q_heads, group, splits_c, splits_a,
        HEAD_DIM=dim, BLOCK_G=block_g, SPLIT_TILE=SPLIT_TILE, HAS_WINDOW=bool(window), num_warps=4,
    )  # fmt: skip
    return out
