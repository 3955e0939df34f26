"""Strided antidiagonal scoring (XAttention): per query block, a distribution over KV blocks.

Queries and keys are cut into cells of ``stride`` positions; a cell pair scores the sum of
the ``stride`` products on its antidiagonal, scaled by ``scale / stride``; each query cell's
scores are softmax-normalized over its visible key cells, summed per KV block and averaged
over the query cells of the query block. Reference: :mod:`.naive`; kernel: :mod:`.triton`
(one pass, no per-cell score matrix in memory), chosen by the dispatch rule of
:mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import warnings

import torch

from .._dispatch import kernel_for
from .naive import SCORE_PRECISIONS, Fp8Keys, antidiagonal_block_probs_reference, fp8_keys

__all__ = ["SCORE_PRECISIONS", "Fp8Keys", "antidiagonal_block_probs", "fp8_keys"]


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
    score_precision: str = "input",
    keys_fp8: Fp8Keys | None = None,
) -> torch.Tensor:
    """Per query block of ``q_blocks`` (default: all), the distribution over KV blocks, float32 ``(B, Hq, len(q_blocks), n_kv)``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` (GQA: K is not expanded; queries are the last
    ``Sq`` positions). ``block_q`` and ``block_k`` must be multiples of ``stride``. Causally
    invalid blocks get 0. Only the cells of ``q_blocks`` are scored, so a caller streaming
    over chunks of query blocks never holds the whole ``(n_q, n_kv)`` table.

    ``score_precision="fp8"``: the products from e4m3 codes, one scale per head, keys centred
    first (:func:`fp8_keys`; pass ``keys_fp8=fp8_keys(k)`` made once when streaming over many
    ranges); twice the tensor-core rate of 16-bit products on Hopper. The PyTorch reference
    emulates the same codes where the kernel does not run.
    """
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block % stride != 0:
            raise ValueError(f"antidiagonal scoring needs {name} ({block}) to be a multiple of stride ({stride})")
    options = dict(stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal, q_blocks=q_blocks)
    options.update(score_precision=score_precision, keys_fp8=keys_fp8)
    kernel = kernel_for(
        q, __package__, stride=stride, block_q=block_q, block_k=block_k, score_precision=score_precision
    )  # fmt: skip
    if kernel is not None:
        return kernel.antidiagonal_block_probs_triton(q, k, **options)
    if score_precision == "fp8" and q.device.type == "cuda":
        warnings.warn(
            "fp8 antidiagonal scoring has no kernel for this case (fp8 tensor cores need compute capability 8.9+, "
            "or the shape is unsupported): emulating the fp8 codes in PyTorch, slower",
            stacklevel=2,
        )
    return antidiagonal_block_probs_reference(q, k, **options)
