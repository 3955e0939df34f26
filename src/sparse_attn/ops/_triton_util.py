"""Triton device functions shared by several operator kernels (imported by ``<op>/triton.py`` only,
so importing :mod:`sparse_attn.ops` never imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_rows", "group_rows", "nsa_gate", "online_softmax_step", "split_key_blocks"]


@triton.jit
def dot_rows(a, b_rows, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b_rows^T`` (``b_rows`` row-major, one row per output column), in float32
    products when ``DOT_FP32``."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b_rows.to(tl.float32)), acc, input_precision=PRECISION)
    return tl.dot(a, tl.trans(b_rows), acc, input_precision=PRECISION)


@triton.jit
def group_rows(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr):
    """``(q, rows, row_ok, heads)``: the ``group`` query heads of KV head ``kv_head`` as the rows of
    one ``[BLOCK_G, HEAD_DIM]`` tile of ``Q`` ``(B, Hq, D)`` (zeros past the group)."""
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    heads = kv_head * group + rows
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + batch.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    return q, rows, row_ok, heads


@triton.jit
def split_key_blocks(Positions, row, valid, n_kv, blocks_per_split, seq_k, BLOCK_N: tl.constexpr,
                     HAS_POSITIONS: tl.constexpr):  # fmt: skip
    """This program's key blocks ``[first, last)`` (split ``tl.program_id(2)`` of ``n_kv`` blocks,
    ``blocks_per_split`` each) for a tile of rows ``row`` (``valid`` ones only), and what its rows
    see of them: ``(first, last, visible_end, full_end, position)``. With ``HAS_POSITIONS`` each
    row sees the keys up to its position (int64 ``Positions[row]``, read as int32): blocks from
    ``visible_end`` on are hidden from every row, and blocks before ``full_end`` are whole (inside
    ``seq_k``) and visible to every valid row, so they need no mask. Without positions every
    block is visible, ``full_end`` is the last whole block, and ``position`` is unused."""
    first = tl.program_id(2) * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_kv)
    full_end = seq_k // BLOCK_N
    if HAS_POSITIONS:
        position = tl.load(Positions + row, mask=valid, other=-1).to(tl.int32)
        reach = tl.max(tl.where(valid, position, -1), axis=0)
        visible_end = tl.minimum(last, tl.maximum(reach // BLOCK_N + 1, first))
        lowest = tl.min(tl.where(valid, position, reach), axis=0)
        full_end = tl.minimum(full_end, (lowest + 1) // BLOCK_N)
    else:
        position = tl.zeros_like(row).to(tl.int32)
        visible_end = last
    return first, last, visible_end, full_end, position


@triton.jit
def online_softmax_step(q, k_pointers, v_pointers, key_ok, m_i, l_i, acc, qk_scale, DOT_FP32: tl.constexpr,
                        PRECISION: tl.constexpr):  # fmt: skip
    """One tile of keys (``key_ok`` masks the rows of the K / V tiles) into a flash-decoding online
    softmax in log2 units: ``(scores, m, l, acc)``, ``scores`` the tile's scaled logits (``-inf``
    where masked). A row without a valid key yet keeps ``m = -inf`` (no ``inf - inf``)."""
    k = tl.load(k_pointers, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_pointers, mask=key_ok[:, None], other=0.0)
    scores = tl.where(key_ok[None, :], dot_rows(q, k, None, DOT_FP32, PRECISION) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return scores, m_new, l_i, acc


@triton.jit
def nsa_gate(q, W, Bias, head, branch, NUM_GATES: tl.constexpr, HEAD_DIM: tl.constexpr):
    """NSA's gate ``sigmoid(q . W[head, :, branch] + bias[head, branch])`` for rows ``q`` ``[M, D]``
    (``W`` ``(H, D, NUM_GATES)`` and ``Bias`` ``(H, NUM_GATES)`` contiguous): ``[M]`` float32, the
    product rounded to q's dtype as ``torch.einsum`` on q and ``W`` cast to it rounds it."""
    offs_d = tl.arange(0, HEAD_DIM)
    w = tl.load(W + head * (HEAD_DIM * NUM_GATES) + offs_d * NUM_GATES + branch)
    product = tl.sum(q.to(tl.float32) * w.to(q.dtype).to(tl.float32)[None, :], 1).to(q.dtype).to(tl.float32)
    return tl.sigmoid(product + tl.load(Bias + head * NUM_GATES + branch).to(tl.float32))
