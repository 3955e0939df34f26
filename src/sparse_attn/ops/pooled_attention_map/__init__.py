"""SeerAttention's training target: the block max-pooled, row-normalised attention map of the exact attention.

Per head, query block ``I`` and KV block ``J``: the largest softmax probability
``p_it = softmax_t(scale * q_i · k_t)`` over the block's query rows ``i`` and keys ``t``
(2D max pooling of the attention map), each row then divided by its sum over the KV blocks so
that it is a distribution over KV blocks, the target of the gate's softmax (Gao et al.,
SeerAttention, arXiv:2410.13276). Probabilities are those of the full causal softmax of each
query row (normalised by the row's log-sum-exp over all its visible keys), not of a block.

Reference: :mod:`.naive`, chunked over query blocks so that memory is ``O(rows * Sk)`` per
chunk within ``CHUNK_ELEMENTS`` and the result ``O(n_q * n_kv)``; it is also the
implementation: there is no fused Triton kernel yet (the paper's kernel returns this map from
inside the FlashAttention forward; here it costs a separate pass of ``q · k``).
"""

from .naive import pooled_attention_map

__all__ = ["pooled_attention_map"]
