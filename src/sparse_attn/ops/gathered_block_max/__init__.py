"""Gathered block maxima (HiP): per query block, the largest ``q · k`` within each of a few listed KV blocks.

A tree search such as HiP's scores a handful of KV blocks per query block and round, a
different handful per query head; this operator reads exactly those blocks of ``k`` in its own
dtype (no float32 copy of K, no padding). Reference: :mod:`.naive` (the listed blocks gathered
a few query blocks at a time); kernel: :mod:`.triton` (one program per query block and query
head, walking its list), chosen by the dispatch rule of :mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import gathered_block_max as gathered_block_max_reference

__all__ = ["gathered_block_max"]


def gathered_block_max(
    q: torch.Tensor,
    k: torch.Tensor,
    units: torch.Tensor,
    present: torch.Tensor,
    *,
    q_blocks: range | tuple[int, ...],
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """Float32 ``(B, Hq, R, C)``: the largest unscaled ``q · k`` of query block ``q_blocks[r]`` (a range or a tuple of block numbers)
    and KV block ``units[b, h, r, c]``, over real queries and keys; ``-inf`` where ``present`` is False.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` in their own dtype (float32 accumulation; query
    head ``h`` reads KV head ``h // (Hq // Hkv)``), ``units`` int64 and ``present`` bool
    ``(B, Hq, R, C)`` with ``R = len(q_blocks)``; units outside ``[0, n_kv)`` only where not
    present. Rows past ``Sq`` and keys past ``Sk`` of the last blocks do not take part.
    """
    case = dict(k=k, block_q=block_q, block_k=block_k)
    kernel = kernel_for(q, __package__, **case)
    if kernel is not None:
        return kernel.gathered_block_max_triton(
            q, k, units, present, q_blocks=q_blocks, block_q=block_q, block_k=block_k
        )
    return gathered_block_max_reference(q, k, units, present, q_blocks=q_blocks, block_q=block_q, block_k=block_k)
