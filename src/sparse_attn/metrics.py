"""Pattern quality: density, attention recall and output error, all without an S x S tensor.

Recall and error are computed with the reference backend (chunked over query blocks), so
they run anywhere and cost about two attention passes. A pattern over a layout's tile order
(:class:`sparse_attn.masked_pattern.MaskedPattern`) is applied in that order, as the attention
entry points do.
"""

from __future__ import annotations

from functools import partial

import torch

from .backends import reference
from .checks import check_attention_inputs, check_query_key
from .masked_pattern import in_layout_order
from .pattern import BlockSparsePattern, check_pattern_fits, dense_pattern


def density(pattern: BlockSparsePattern, *, causal: bool = True) -> float:
    """Computed blocks over valid blocks (see :meth:`BlockSparsePattern.density`)."""
    return pattern.density(causal=causal)


def _dense_like(pattern: BlockSparsePattern, causal: bool) -> BlockSparsePattern:
    return dense_pattern(
        seq_q=pattern.seq_q,
        seq_k=pattern.seq_k,
        block_q=pattern.block_q,
        block_k=pattern.block_k,
        causal=causal,
        device=pattern.device,
    )


def recall(
    q: torch.Tensor, k: torch.Tensor, pattern: BlockSparsePattern, *, causal: bool = True, scale: float | None = None
) -> float:
    """Fraction of the exact softmax mass that falls inside the kept blocks, averaged over queries.

    Per query it is ``exp(lse_kept - lse_all)``: the log-sum-exp of scores over the kept
    blocks against that over all visible keys.
    """
    check_query_key(q, k)
    scale = check_attention_inputs(q, k, k, scale)
    check_pattern_fits(pattern, q, k)
    pattern.ensure_valid(causal=causal)
    # Values do not affect the LSE; a 1-wide value tensor keeps the extra work small.
    values = k[..., :1]
    options = dict(causal=causal, scale=scale, return_lse=True)
    _, kept = in_layout_order(pattern, partial(reference.forward, pattern=pattern, **options), q, k, values)
    _, full = reference.forward(q, k, values, _dense_like(pattern, causal), causal=causal, scale=scale, return_lse=True)
    return float(torch.exp(kept - full).mean())


def output_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> float:
    """Relative error ``||out_sparse - out_dense|| / ||out_dense||`` (Frobenius, float32)."""
    scale = check_attention_inputs(q, k, v, scale)
    check_pattern_fits(pattern, q, k)
    pattern.ensure_valid(causal=causal)
    sparse = in_layout_order(pattern, partial(reference.forward, pattern=pattern, causal=causal, scale=scale), q, k, v)
    dense = reference.forward(q, k, v, _dense_like(pattern, causal), causal=causal, scale=scale)
    return float(torch.linalg.vector_norm((sparse - dense).float()) / torch.linalg.vector_norm(dense.float()))
