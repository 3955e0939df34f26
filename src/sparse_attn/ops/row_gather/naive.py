"""PyTorch reference of :func:`sparse_attn.ops.row_gather.gather_rows`."""

from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(2, index)``."""
    return x.index_select(2, index)
