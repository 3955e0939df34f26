"""The last-query probe (vertical-slash, FlexPrefill): exact attention of the last queries, reduced.

The softmax of the last ``num_queries`` queries against every key, summed over those
queries per key (vertical lines), per diagonal distance (slash lines) and per KV block.
Reference: :mod:`.naive` (the probe rows' logits materialised a few heads at a time); kernel:
:mod:`.triton` (the softmax recomputed tile by tile and reduced in registers, never stored),
chosen by the dispatch rule of :mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import ProbeSums, block_sum
from .naive import probe_last_queries as probe_last_queries_reference

__all__ = ["ProbeSums", "block_sum", "probe_last_queries"]


def probe_last_queries(
    q: torch.Tensor, k: torch.Tensor, *, num_queries: int, block_k: int, scale: float, causal: bool
) -> ProbeSums:
    """Softmax of the last ``num_queries`` queries against all keys, reduced to :class:`ProbeSums`.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` (``Hq`` a multiple of ``Hkv``, ``Sq <= Sk``, the
    queries the last ``Sq`` positions); the float32 sums are ``(B, Hq, Sk)`` (vertical, slash;
    slash zeros when not causal) and ``(B, Hq, n_kv)`` (block).
    """
    kernel = kernel_for(q, __package__, k=k, num_queries=num_queries)
    if kernel is not None:
        return kernel.probe_last_queries_triton(
            q, k, num_queries=num_queries, block_k=block_k, scale=scale, causal=causal
        )
    return probe_last_queries_reference(q, k, num_queries=num_queries, block_k=block_k, scale=scale, causal=causal)
