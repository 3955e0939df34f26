"""Row selection in PyTorch, sort-based: the reference of :mod:`.triton` and the CPU path.

Rows are the last dim. Ties are broken by index (a stable descending sort), so every rule
is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._chunking import CHUNK_ELEMENTS

__all__ = ["Budget", "cumulative_mass_mask_reference", "topk_by_rank_mask_reference"]

# Scan piece of :func:`_row_cumsum` for very long rows.
_SCAN_PIECE = 1024


@dataclass(frozen=True)
class Budget:
    """How many entries a row may keep: at least ``minimum``, at most ``maximum`` (None: no cap)."""

    minimum: int = 1
    maximum: int | None = None


def _rank_mask(order: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Bool mask with True at the first ``keep_count`` entries of each row's ``order``.

    Only the first ``max(keep_count)`` columns of ``order`` are scattered, so a long row (a
    whole head's blocks) needs no table of its length beyond the bool result.
    """
    width = int(keep_count.max()) if keep_count.numel() else 0
    keep_sorted = torch.arange(width, device=order.device) < keep_count[..., None]
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return mask.scatter_(-1, order[..., :width], keep_sorted)


def _row_cumsum(values: torch.Tensor) -> torch.Tensor:
    """``cumsum`` over the last dim of 2-D ``values``; long rows are scanned in pieces.

    A GPU scan over a few very long rows runs on a handful of thread blocks (at 128K
    tokens a whole head's block scores are one row of a million entries); scanning
    ``_SCAN_PIECE``-long pieces and adding each piece's exclusive prefix is parallel.
    """
    rows, length = values.shape
    if length < 64 * _SCAN_PIECE:
        return torch.cumsum(values, dim=-1)
    pieces = -(-length // _SCAN_PIECE)
    padding = pieces * _SCAN_PIECE - length
    padded = F.pad(values, (0, padding)) if padding else values
    within = torch.cumsum(padded.view(rows, pieces, _SCAN_PIECE), dim=-1)
    del padded
    before = torch.cumsum(within[..., -1], dim=-1) - within[..., -1]
    within += before[..., None]
    return within.view(rows, -1)[:, :length]


def _cumulative_mass_rows(scores: torch.Tensor, threshold: float, budget: Budget) -> torch.Tensor:
    values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    cumulative = _row_cumsum(values)
    target = threshold * cumulative[..., -1:]
    # Keep every entry whose preceding mass is still short of the target (the entry that
    # crosses the threshold is kept). In place: rows may be a whole head's blocks.
    preceding = cumulative.sub_(values)
    del values
    keep_count = (preceding < target).sum(-1)
    keep_count = keep_count.clamp(min=budget.minimum)
    if budget.maximum is not None:
        keep_count = keep_count.clamp(max=budget.maximum)
    return _rank_mask(order, keep_count)


def cumulative_mass_mask_reference(
    scores: torch.Tensor, threshold: float, budget: Budget | None = None
) -> torch.Tensor:
    """Per row, the fewest highest entries whose sum reaches ``threshold`` of the row's sum.

    ``scores`` are non-negative (probabilities or masses; invalid entries 0), any shape; the
    budget clamps the count per row (default ``Budget()``: at least one entry, no cap).
    Returns bool of ``scores``' shape. Rows are processed in chunks to bound the sort's memory.
    """
    budget = Budget() if budget is None else budget
    scores = scores.float()
    flat = scores.reshape(-1, scores.shape[-1])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (4 * flat.shape[-1]))
    pieces = [_cumulative_mass_rows(chunk, threshold, budget) for chunk in flat.split(rows_per_chunk)]
    return torch.cat(pieces).view(scores.shape)


def topk_by_rank_mask_reference(ranking: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Per row, the ``keep_count[row]`` entries ranked highest by ``ranking`` (ties: lower index first).

    ``keep_count`` has ``ranking.shape[:-1]``; returns bool of ``ranking``'s shape.
    """
    _, order = torch.sort(ranking.float(), dim=-1, descending=True, stable=True)
    return _rank_mask(order, keep_count)
