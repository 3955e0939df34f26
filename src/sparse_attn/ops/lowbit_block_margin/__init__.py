"""Block margins of low-bit logits: per (query block, KV block), how far the best pair's logit clears its row's threshold.

SALE (:mod:`sparse_attn.methods.sale`) keeps a KV block for a query block when some query row
of the block has a key in it whose estimated logit reaches that row's threshold. The
estimated logit of row ``r`` and key ``n`` is ``q_scale[r] * k_scale[n] * (q_codes[r] ·
k_codes[n]) + key_bias[n]`` (per-token quantised queries and keys, low-bit codes), so what the
rule needs is, per block pair, the largest ``logit - row_threshold[r]`` over its pairs: the
block is kept where that margin is ``>= 0``. Reference: :mod:`.naive` (dequantised rows against
the codes in float32 through :func:`sparse_attn.ops.block_max.block_max_logits`, a few query
blocks at a time); kernel: :mod:`.triton` (integer or fp8 tensor-core products of the codes,
the margins reduced in registers, one value written per block pair), chosen by the dispatch
rule of :mod:`sparse_attn.ops._dispatch`. Memory: the output, ``(B, Hq, n_query_blocks,
n_kv_blocks)`` float32, plus the reference's chunk.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import lowbit_block_margin as lowbit_block_margin_reference

__all__ = ["lowbit_block_margin"]


def lowbit_block_margin(
    q_codes: torch.Tensor,
    q_scale: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    row_threshold: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    key_bias: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per (query block, KV block): ``max (q_scale[r] * k_scale[n] * (q_codes[r] · k_codes[n])
    + key_bias[n] - row_threshold[r])`` over the block's rows ``r`` and visible keys ``n``.

    ``q_codes`` ``(B, Hq, R, D)`` and ``k_codes`` ``(B, Hkv, Sk, D)``: int8 (holding int4
    values) or ``float8_e4m3fn`` codes, one format for both (GQA by index); ``q_scale``
    float32 ``(B, Hq, R)`` (the softmax scale folded in as the caller wants), ``k_scale``
    float32 ``(B, Hkv, Sk)``, ``row_threshold`` float32 ``(B, Hq, R)``, ``key_bias`` float32
    ``(B, Hq, Sk)``. Rows are cut into query blocks of ``block_q`` from the first (the last may
    be shorter), keys into blocks of ``block_k``. ``q_positions`` int64 ``(R,)``: keys after a
    row's position are not visible to it (causal). A pair of blocks with no visible pair gives
    ``-inf``. Returns float32 ``(B, Hq, ceil(R / block_q), ceil(Sk / block_k))``.
    """
    options = dict(block_q=block_q, block_k=block_k, key_bias=key_bias, q_positions=q_positions)
    kernel = kernel_for(q_codes, __package__, k_codes=k_codes, block_q=block_q, block_k=block_k)
    if kernel is not None:
        return kernel.lowbit_block_margin_triton(q_codes, q_scale, k_codes, k_scale, row_threshold, **options)
    return lowbit_block_margin_reference(q_codes, q_scale, k_codes, k_scale, row_threshold, **options)
