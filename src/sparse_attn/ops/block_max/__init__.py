"""Block maxima of logits: per query row, the largest ``q · k`` over the keys of each KV block.

The fine-grained scores of SALE (every query row against every key, at low precision) and
AnchorAttention (every pooled query against every key) are only ever compared with a per-row
threshold, so what an estimator needs of them is each row's maximum per KV block: a block is
kept when some row's maximum in it clears that row's threshold. Reference: :mod:`.naive` (the
``(rows, Sk)`` logits in float32, a chunk of key blocks at a time, reduced at once);
kernel: :mod:`.triton` (the logits of a tile of rows against one key block in registers, only
the maxima written), chosen by the dispatch rule of :mod:`sparse_attn.ops._dispatch`. Both
are ``O(rows * n_kv)`` in memory.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import block_max_logits as block_max_logits_reference

__all__ = ["block_max_logits"]


def block_max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_k: int,
    q_positions: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per query row and KV block, the largest logit ``(q · k) * key_scale + key_bias`` over the block's keys.

    q ``(B, Hq, R, D)`` (rows: query tokens or pooled queries, already scaled as the caller
    wants), k ``(B, Hkv, Sk, D)`` (GQA by index; low-bit codes accepted: int8 holding int4
    values, or fp8). ``key_scale`` float32 ``(B, Hkv, Sk)`` multiplies each key's logits,
    ``key_bias`` float32 ``(B, Hq, Sk)`` is added to them, ``q_positions`` int64 ``(R,)`` masks
    keys after each row's position (a block with no visible key gives ``-inf``). Returns
    float32 ``(B, Hq, R, n_kv)``; see :func:`.naive.block_max_logits`.
    """
    options = dict(block_k=block_k, q_positions=q_positions, key_scale=key_scale, key_bias=key_bias)
    kernel = kernel_for(q, __package__, k=k, block_k=block_k)
    if kernel is not None:
        return kernel.block_max_logits_triton(q, k, **options)
    return block_max_logits_reference(q, k, **options)
