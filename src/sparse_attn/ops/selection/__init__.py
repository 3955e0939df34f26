"""Selection: per row, the fewest entries reaching a share of the mass, or the top-k by a ranking.

* :func:`cumulative_mass_mask`: the fewest highest entries whose sum reaches ``threshold`` of
  the row's sum, the count clamped by a :class:`Budget` (XAttention, FlexPrefill, ProxyAttn's
  budgets, block top-k's threshold mode);
* :func:`topk_by_rank_mask` / :func:`topk_mask`: per row a given number of the highest entries.

Ties are broken by index, so results are deterministic. Reference: the sort-based rules of
:mod:`.naive`; kernel: the sort-free selection of :mod:`.triton` on CUDA (the dispatch rule of
:mod:`sparse_attn.ops._dispatch`), one program a row for rows of up to ``MAX_ROW`` entries and a
radix select over many programs a row for longer ones.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import Budget, cumulative_mass_mask_reference, topk_by_rank_mask_reference

__all__ = ["Budget", "cumulative_mass_mask", "topk_by_rank_mask", "topk_mask"]


def cumulative_mass_mask(scores: torch.Tensor, threshold: float, budget: Budget | None = None) -> torch.Tensor:
    """Per row (last dim), the fewest highest entries whose sum reaches ``threshold`` of the row's sum.

    ``scores`` are non-negative (probabilities or masses; invalid entries 0). The budget
    clamps the count per row (default ``Budget()``: at least one entry, no cap). Returns bool
    of ``scores``' shape.
    """
    budget = Budget() if budget is None else budget
    kernel = kernel_for(scores, __package__)
    if kernel is not None:
        return kernel.cumulative_mass_mask_triton(scores, threshold, minimum=budget.minimum, maximum=budget.maximum)
    return cumulative_mass_mask_reference(scores, threshold, budget)


def topk_by_rank_mask(ranking: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Per row, the ``keep_count[row]`` entries ranked highest by ``ranking`` (ties: lower index first)."""
    kernel = kernel_for(ranking, __package__)
    if kernel is not None:
        return kernel.topk_by_rank_mask_triton(ranking, keep_count)
    return topk_by_rank_mask_reference(ranking, keep_count)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row (last dim), the ``k`` highest entries (all of them when the row is shorter)."""
    k = min(k, scores.shape[-1])
    return topk_by_rank_mask(scores, torch.full(scores.shape[:-1], k, device=scores.device))
