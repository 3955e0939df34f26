"""Page bounds (Quest): per KV page, the largest ``q · k`` any key of the page can reach, summed over a GQA group.

From the page's per-channel key minimum and maximum (the page summaries of
:class:`sparse_attn.decode.PagedKVCache`): ``sum_d max(q_d min_d, q_d max_d)`` per query head,
summed over the query heads that share the KV head (an upper bound of the group's summed
``q · k`` for any key of the page). Reference:
:mod:`.naive`; kernel: :mod:`.triton` (CUDA, head_dim 16-256), chosen by the dispatch rule of
:mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import page_bounds_reference

__all__ = ["page_bounds"]


def page_bounds(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    page_size: int,
    scale: float = 1.0,
    newest_first: bool = False,
) -> torch.Tensor:
    """Scaled group page bounds, float32 ``(B, Hkv, max_pages)``; ``-inf`` past each sequence's pages.

    ``newest_first``: each sequence's newest page gets ``+inf`` (a selection that always keeps
    it can then take the top-k as is).

    q ``(B, Hq, D)``; key_min / key_max ``(num_pages, Hkv, D)`` per physical page; page_table
    ``(B, max_pages)`` int32 (logical to physical page); seq_lens ``(B,)`` int32. GQA: query
    head ``h`` uses KV head ``h // (Hq / Hkv)``.
    """
    options = dict(page_size=page_size, scale=scale, newest_first=newest_first)
    kernel = kernel_for(q, __package__, head_dim=q.shape[-1])
    if kernel is not None:
        return kernel.page_bounds_triton(q, key_min, key_max, page_table, seq_lens, **options)
    return page_bounds_reference(q, key_min, key_max, page_table, seq_lens, **options)
