"""Strided antidiagonal scoring (XAttention): per query block, a distribution over KV blocks.

Queries and keys are cut into cells of ``stride`` positions; a cell pair scores the sum of
the ``stride`` products on its antidiagonal, scaled by ``scale / stride``; each query cell's
scores are softmax-normalized over its visible key cells, summed per KV block and averaged
over the query cells of the query block. Reference: :mod:`.naive`; kernel: :mod:`.triton`
(one pass, no per-cell score matrix in memory), chosen by the dispatch rule of
:mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import antidiagonal_block_probs_reference

__all__ = ["antidiagonal_block_probs"]


def antidiagonal_block_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """Per query block of ``q_blocks`` (default: all), the distribution over KV blocks, float32 ``(B, Hq, len(q_blocks), n_kv)``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` (GQA: K is not expanded; queries are the last
    ``Sq`` positions). ``block_q`` and ``block_k`` must be multiples of ``stride``. Causally
    invalid blocks get 0. Only the cells of ``q_blocks`` are scored, so a caller streaming
    over chunks of query blocks never holds the whole ``(n_q, n_kv)`` table.
    """
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block % stride != 0:
            raise ValueError(f"antidiagonal scoring needs {name} ({block}) to be a multiple of stride ({stride})")
    options = dict(stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal, q_blocks=q_blocks)
    kernel = kernel_for(q, __package__, stride=stride, block_q=block_q, block_k=block_k)
    if kernel is not None:
        return kernel.antidiagonal_block_probs_triton(q, k, **options)
    return antidiagonal_block_probs_reference(q, k, **options)
