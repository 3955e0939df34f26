"""Reference conversion of mask rows to column lists: a prefix count, then a binary search per slot."""

from __future__ import annotations

import torch

__all__ = ["mask_rows_to_lists_reference"]


def mask_rows_to_lists_reference(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`sparse_attn.ops.mask_lists.mask_rows_to_lists`.

    The s-th kept column of a row is the first column where the row's running count reaches s.
    """
    if mask.shape[-1] == 0:
        raise ValueError("mask rows need at least one column")
    running = mask.cumsum(-1, dtype=torch.int32)
    counts = running[..., -1].contiguous()
    width = int(counts.max()) if counts.numel() else 0
    slots = torch.arange(1, width + 1, dtype=torch.int32, device=mask.device).expand(*counts.shape, width)
    columns = torch.searchsorted(running, slots.contiguous(), out_int32=True)
    columns.masked_fill_(slots > counts[..., None], 0)
    return counts, columns
