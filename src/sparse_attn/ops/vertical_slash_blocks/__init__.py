"""Vertical-slash -> blocks: every block that a selected key column or diagonal crosses.

Counted with prefix sums over the selected lines, ``O(n_q * n_kv)`` per head whatever the
number of lines, for a range of query blocks at a time (a streaming estimator asks for one
chunk's rows). Reference: :mod:`.naive` (prefix counts looked up through index tables, a few
heads and rows at a time); kernel: :mod:`.triton` (one program per head and query block),
chosen by the dispatch rule of :mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import vertical_slash_block_mask as vertical_slash_block_mask_reference

__all__ = ["vertical_slash_block_mask"]


def vertical_slash_block_mask(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    *,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool = True,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """The blocks that selected key columns and diagonals cross, bool ``(B, H, len(q_blocks), n_kv)``.

    ``vertical`` bool ``(B, H, Sk)``: selected key positions. ``slash`` bool ``(B, H, Sk)``:
    selected distances ``o = query position - key position``. Block ``(i, j)`` is covered
    when a selected column in block ``j`` is at or before the block's last query, or (causal)
    when a selected distance joins a query of block ``i`` to a key of block ``j``. Only query
    blocks ``q_blocks`` (default: all) are built.
    """
    geometry = dict(seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, causal=causal, q_blocks=q_blocks)
    kernel = kernel_for(vertical, __package__)
    if kernel is not None:
        return kernel.vertical_slash_block_mask_triton(vertical, slash, **geometry)
    return vertical_slash_block_mask_reference(vertical, slash, **geometry)
