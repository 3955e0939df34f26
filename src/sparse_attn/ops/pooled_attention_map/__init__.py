"""SeerAttention's training target: the block max-pooled, row-normalised attention map of the exact attention.

Per head, query block ``I`` and KV block ``J``: the largest softmax probability
``p_it = softmax_t(scale * q_i · k_t)`` over the block's query rows ``i`` and keys ``t``
(2D max pooling of the attention map), each row then divided by its sum over the KV blocks so
that it is a distribution over KV blocks, the target of the gate's softmax (Gao et al.,
SeerAttention, arXiv:2410.13276; the released kernel divides each pooled row by its sum, as
here). Probabilities are those of each query row's full softmax (normalised by the row's
log-sum-exp over all its visible keys), not of a block.

Reference: :mod:`.naive`, chunked over query blocks (float32 logits of a chunk, within
``CHUNK_ELEMENTS``). Kernel: :mod:`.triton`, two passes over the visible keys per query block
(row log-sum-exp, then each tile's largest probability), writing only the ``(n_q, n_kv)``
map; chosen on CUDA for block sizes 16-128 and head_dim <= 256 by the dispatch rule of
:mod:`sparse_attn.ops._dispatch`. Unlike the paper's kernel it does not also return the
attention output (the frozen model's forward computes that; the map costs a separate pass).
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import pooled_attention_map as pooled_attention_map_reference

__all__ = ["pooled_attention_map", "pooled_attention_map_reference"]


def pooled_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool = True,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """The block max-pooled, row-normalised attention map, float32 ``(B, Hq, len(q_blocks), n_kv)``.

    q ``(B, Hq, Sq, D)`` (the last ``Sq`` of ``Sk`` positions), k ``(B, Hkv, Sk, D)`` (GQA by
    index) of one dtype; see :func:`.naive.pooled_attention_map` for the rule.
    """
    options = dict(block_q=block_q, block_k=block_k, scale=scale, causal=causal, q_blocks=q_blocks)
    kernel = kernel_for(q, __package__, block_q=block_q, block_k=block_k)
    if kernel is not None:
        return kernel.pooled_attention_map_triton(q, k, **options)
    return pooled_attention_map_reference(q, k, **options)
