"""Token-granular Triton backward: dQ, dK, dV for the patterns :mod:`.triton_tokens` runs.

Three launches, deterministic (no float atomics anywhere):

* delta: per query row ``rowsum(dO * O) - dLSE``, the block backward's own kernel
  (:mod:`.triton_backward`), which knows nothing of blocks.
* dQ: the forward's programs and row packing (query heads of a group x tokens of a query tile),
  walking the tile's union list with the same per-row bitmask, causal and bounds masks. Each
  selected K/V step is loaded once for the packed heads.
* dK/dV: one program per (batch, KV head, step of ``BLOCK_N`` keys of one KV block). It walks the
  transposed union list of its block (the query tiles whose union holds it, with their bitmasks)
  for each set of packed heads of its group in turn, so dK and dV are summed over the whole GQA
  group in registers, without expanding K/V: with lists per KV head or shared, one walk whose
  tiles are the group's heads x tokens; with lists per query head, one walk per head.

Probabilities are recomputed from the forward's log-sum-exp: ``P = exp(S * scale - lse)``,
``dS = P * (dP - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, ``dV = P^T dO``. Steps
wholly after a tile's last query (causal) are skipped: their probabilities are all zero.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..geometry import num_blocks
from ..plan import BlockSparsePlan
from ..utils import interpreting, length_bucket
from . import launch
from . import triton_tokens_gathered as gathered
from .launch import LOG2_E
from .triton_tokens import (
    block_n_candidates,
    kernel_constants,
    launch_geometry,
    list_strides,
    token_lists,
    token_tiling,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

# Rows per dK/dV product: listing tiles x packed heads x tile tokens.
DKDV_ROWS = 64

if triton is not None:
    from .triton_backward import _delta
    from .triton_tokens import dq_step, key_steps, load_keys, load_row_stats, load_rows, packed_rows, store_rows

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
        seq_q, seq_k, scale, qk_scale,
        seq_bucket,  # autotuning key only: ceil(log2(seq_k))
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        HEADS: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        chunks = num_q_heads // HEADS
        tile = tl.program_id(0)
        batch = tl.program_id(1) // chunks
        chunk = tl.program_id(1) % chunks
        head, token, valid, bit = packed_rows(chunk, tile, seq_q, HEADS, TILE_TOKENS, BLOCK_M, BLOCK_Q)
        first_head = chunk * HEADS
        kv_head = first_head // group
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        offset = seq_k - seq_q
        query_pos = token + offset
        last_query = tl.minimum(tile * TILE_TOKENS + TILE_TOKENS, seq_q) - 1 + offset
        q = load_rows(Q, batch, head, token, valid, stride_qb, stride_qh, stride_qs, offs_d, DOT_FP32)
        do = load_rows(DOut, batch, head, token, valid, stride_db, stride_dh, stride_ds, offs_d, DOT_FP32)
        lse, delta = load_row_stats(Lse, Delta, batch, head, token, valid, num_q_heads, seq_q)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

        list_row = batch * list_stride_b + (first_head // pattern_head_divisor) * list_stride_h + tile
        start = tl.load(Offsets + list_row)
        end = tl.load(Offsets + list_row + 1)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for entry in range(start, end):
            kv_block = tl.load(Blocks + entry)
            listed = valid & (((tl.load(Bits + entry) >> bit) & 1) != 0)
            for sub in range(key_steps(kv_block, seq_k, BLOCK_K, BLOCK_N)):
                # Steps wholly after the tile's last query have zero probabilities (causal).
                if (kv_block * BLOCK_K + sub * BLOCK_N) * CAUSAL <= last_query:
                    key_pos, key_ok, k, v = load_keys(
                        k_base, v_base, kv_block, sub, seq_k, stride_ks, stride_vs, offs_n, offs_d,
                        BLOCK_K, BLOCK_N, DOT_FP32,
                    )  # fmt: skip
                    dq = dq_step(
                        dq, q, do, lse, delta, k, v, key_pos, key_ok, listed, query_pos, qk_scale, CAUSAL, PRECISION
                    )
        store_rows(DQ, dq * scale, batch, head, token, valid, stride_gb, stride_gh, stride_gs, offs_d)

    @triton.jit
    def _token_dkdv(
        Q, K, V, DOut, Lse, Delta, DK, DV, TOffsets, TTiles, TBits,
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
    ):  # fmt: skip
        SUBTILES: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
        num_kv_heads = num_q_heads // group
        # Key tiles on the first grid axis: the others are limited to 65535 programs.
        batch = tl.program_id(1) // num_kv_heads
        kv_head = tl.program_id(1) % num_kv_heads
        kv_block = tl.program_id(0) // SUBTILES
        first_key = kv_block * BLOCK_K + (tl.program_id(0) % SUBTILES) * BLOCK_N
        in_block = (tl.program_id(0) % SUBTILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_pos = first_key + tl.arange(0, BLOCK_N)
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

        chunks_per_group = group // HEADS
        rows = tl.arange(0, BLOCK_M)
        entry_in_step = rows // (HEADS * TILE_TOKENS)
        head_in_chunk = rows % (HEADS * TILE_TOKENS) // TILE_TOKENS
        token_in_tile = rows % TILE_TOKENS
        # A key step past the sequence end (the grid covers whole blocks) has nothing to do.
        for chunk_in_group in range(tl.where(first_key < seq_k, chunks_per_group, 0)):
            chunk = kv_head * chunks_per_group + chunk_in_group
            first_head = chunk * HEADS
            head = first_head + head_in_chunk
            list_row = batch * list_stride_b + (first_head // pattern_head_divisor) * list_stride_h + kv_block
            start = tl.load(TOffsets + list_row)
            end = tl.load(TOffsets + list_row + 1)
            # ENTRIES listing tiles per step (ascending), each HEADS heads x TILE_TOKENS tokens.
            for step in range(start, end, ENTRIES):
                last_tile = tl.load(TTiles + tl.minimum(step + ENTRIES, end) - 1)
                last_query = tl.minimum(last_tile * TILE_TOKENS + TILE_TOKENS, seq_q) - 1 + offset
                # In causal mode tiles that end before these keys start see none of them.
                if first_key * CAUSAL <= last_query:
                    entry = step + entry_in_step
                    in_step = (entry < end) & (entry_in_step < ENTRIES)
                    tile = tl.load(TTiles + entry, mask=in_step, other=0)
                    bits = tl.load(TBits + entry, mask=in_step, other=0)
                    token = tile * TILE_TOKENS + token_in_tile
                    valid = in_step & (token < seq_q)
                    listed = valid & (((bits >> (token_in_tile // BLOCK_Q)) & 1) != 0)
                    q = load_rows(Q, batch, head, token, valid, stride_qb, stride_qh, stride_qs, offs_d, DOT_FP32)
                    do = load_rows(DOut, batch, head, token, valid, stride_db, stride_dh, stride_ds, offs_d, DOT_FP32)
                    lse, delta = load_row_stats(Lse, Delta, batch, head, token, valid, num_q_heads, seq_q)
                    scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (N, M)
                    visible = key_ok[:, None] & listed[None, :]
                    if CAUSAL:
                        visible = visible & (key_pos[:, None] <= token[None, :] + offset)
                    p_t = tl.where(visible, tl.math.exp2(scores_t * qk_scale - lse[None, :]), 0.0)
                    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
                    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                    ds_t = p_t * (dp_t - delta[None, :])
                    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)

        # dK and dV are contiguous tensors of one shape: one set of strides.
        gradient = batch.to(tl.int64) * stride_gb + kv_head.to(tl.int64) * stride_gh
        gradient_rows = gradient + key_pos[:, None] * stride_gs + offs_d[None, :]
        tl.store(DK + gradient_rows, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(DV + gradient_rows, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@functools.cache
def _autotuned(kind: str, block_k: int, is_float32: bool):
    """The ``kind`` pass (``"dq"`` or ``"dkdv"``) autotuned over key steps, warps and stages."""
    steps = block_n_candidates(block_k)
    if is_float32:
        steps = tuple(n for n in steps if n <= 64)
    tuning = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n in steps for w in (4, 8) for s in (1, 2)]
    kernel = {"dq": _token_dq, "dkdv": _token_dkdv}[kind]
    return triton.autotune(
        configs=tuning,
        key=["seq_bucket", "HEAD_DIM", "BLOCK_Q", "BLOCK_K", "HEADS", "TILE_TOKENS", "BLOCK_M", "CAUSAL", "PRECISION"],
    )(kernel)


def backward(q, k, v, out, lse, dout, dlse, plan: BlockSparsePlan, *, scale: float):
    """``(dq, dk, dv)`` in the inputs' dtypes and shapes (dK/dV summed over each GQA group).

    ``out`` and ``lse`` are the forward's output and natural-log log-sum-exp (float32
    ``(B, Hq, Sq)``), ``dout`` the output's gradient, ``dlse`` the log-sum-exp's gradient or
    ``None``. Gradients come from :func:`.launch.allocate`.
    """
    pattern, causal = plan.pattern, plan.causal
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    q, k, v, out, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, out, dout))
    dk, dv = (launch.allocate(x.shape, x.dtype, x.device) for x in (k, v))
    lse = lse.contiguous()
    delta = torch.empty((batch, q_heads, seq_q), dtype=torch.float32, device=q.device)
    delta_block = 64
    _delta[(batch * q_heads, num_blocks(seq_q, delta_block))](
        *(out, dout, dlse.contiguous() if dlse is not None else delta, delta),
        *out.stride()[:3],
        *dout.stride()[:3],
        *(q_heads, seq_q),
        HEAD_DIM=dim,
        BLOCK=delta_block,
        HAS_DLSE=dlse is not None,
    )

    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    sizes = (q_heads, q_heads // kv_heads, q_heads // pattern.num_heads, seq_q, seq_k)
    sizes += (scale, scale * LOG2_E, length_bucket(seq_k))
    is_float32 = q.dtype == torch.float32
    if gathered.uses_gathered_path(pattern):
        dq = gathered.dq(q, k, v, dout, lse, delta, pattern, causal=causal, scale=scale)
        # dK/dV walk one query block per entry (the gathered path's lists).
        packing = token_tiling(q_heads, kv_heads, pattern.num_heads, pattern.block_q)
        tiling = dataclasses.replace(packing, tile_blocks=1, tile_tokens=pattern.block_q)
        lists = token_lists(pattern, 1)
    else:
        tiling, lists, grid, shared = launch_geometry(q, k, pattern)
        dq = launch.allocate(q.shape, q.dtype, q.device)
        dq_args = (
            *(q, k, v, dout, lse, delta, dq, lists.offsets, lists.blocks, lists.bits),
            *strides,
            *dq.stride()[:3],
            *shared[:2],
            *sizes,
        )
        constants = kernel_constants(q, pattern, tiling, causal=causal)
        if interpreting():
            _token_dq[grid](*dq_args, BLOCK_N=16, **constants)
        else:
            _autotuned("dq", pattern.block_k, is_float32)[grid](*dq_args, **constants)

    dkdv_args = (
        *(q, k, v, dout, lse, delta, dk, dv, lists.t_offsets, lists.t_tiles, lists.t_bits),
        *strides,
        *dk.stride()[:3],
        *list_strides(pattern, pattern.num_kv_blocks),
        *sizes,
    )
    # Several listing tiles per step: up to DKDV_ROWS rows per product.
    entries = DKDV_ROWS // (tiling.heads * tiling.tile_tokens)
    constants = dict(kernel_constants(q, pattern, tiling, causal=causal), BLOCK_M=DKDV_ROWS, ENTRIES=entries)

    def dkdv_grid(meta):
        return (pattern.num_kv_blocks * num_blocks(pattern.block_k, meta["BLOCK_N"]), batch * kv_heads)

    if interpreting():
        _token_dkdv[dkdv_grid({"BLOCK_N": 16})](*dkdv_args, BLOCK_N=16, **constants)
    else:
        _autotuned("dkdv", pattern.block_k, is_float32)[dkdv_grid](*dkdv_args, **constants)
    return dq, dk, dv
