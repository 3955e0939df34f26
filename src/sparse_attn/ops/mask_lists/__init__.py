"""Rows of a block mask as sorted column lists: ``(counts, columns)``, the pattern builder's conversion.

Each row's kept columns in increasing order, padded with 0 to ``width`` (at least the largest
count). Reference: :mod:`.naive` (a prefix count and a binary search per slot); kernel:
:mod:`.triton` (one pass per row writing each kept column at its prefix count), chosen by the
dispatch rule of :mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import mask_rows_to_lists_reference

__all__ = ["mask_rows_to_lists"]


def mask_rows_to_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``mask`` ``(..., n)``: int32 ``counts`` ``(...)`` and ``columns`` ``(..., width)``.

    ``width`` is the largest count (0 for an all-empty mask); a row's columns are its kept
    indices in increasing order, then zeros.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    kernel = kernel_for(mask, __package__)
    if kernel is not None:
        return kernel.mask_rows_to_lists_triton(mask)
    return mask_rows_to_lists_reference(mask)
