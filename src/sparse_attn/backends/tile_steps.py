"""Triton helpers shared by the pointer-based block kernels (:mod:`.triton_blasst`, :mod:`.triton_compensated`).

:func:`block_scores` loads one KV tile through pointers and returns its scores with the causal
and sequence-bound masks applied; :func:`online_update` folds a tile of scores (scaled, log2
units) into the running maximum, sum and accumulator of the online softmax. A row that has
seen no key keeps ``m = -inf`` and takes its exponents against 0, so no ``inf - inf`` arises.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

if triton is not None:

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
