"""Quest page selection in plain PyTorch: the reference of :mod:`.triton` and the CPU path.

Ranking (shared with the kernels, so the selected sets are equal): a page's score is the
group's summed upper bound of ``q · k``, ``sum_d (sum_h max(q_hd, 0)) M_d + (sum_h min(q_hd,
0)) m_d`` with the page's key maximum ``M`` and minimum ``m`` (equal to summing each head's
``sum_d max(q_hd m_d, q_hd M_d)``), in float32. The newest page scores ``+inf``, pages past the
sequence ``-inf``. Pages are ranked by score, ties by the lower page index (a stable descending
sort), ``-0.0`` counted as ``+0.0``.
"""

from __future__ import annotations

import torch

__all__ = ["group_page_scores", "select_pages_reference", "select_pages_two_level_reference"]


def group_page_scores(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """The group's summed bounds, float32 ``(B, Hkv, N)``, of summaries ``(B, N, Hkv, D)`` (gathered per sequence)."""
    batch, q_heads, dim = q.shape
    kv_heads = key_min.shape[2]
    grouped = q.float().view(batch, kv_heads, q_heads // kv_heads, dim)
    positive, negative = grouped.clamp(min=0).sum(2), grouped.clamp(max=0).sum(2)  # (B, Hkv, D)
    upper = torch.einsum("bhd,bnhd->bhn", positive, key_max.float())
    lower = torch.einsum("bhd,bnhd->bhn", negative, key_min.float())
    return upper + lower + 0.0


def _mark(scores: torch.Tensor, used: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
    """``-inf`` at entries ``>= used``, ``+inf`` at ``newest`` (both ``(B,)`` int64)."""
    index = torch.arange(scores.shape[-1], device=scores.device)
    scores = scores.masked_fill(index >= used[:, None, None], float("-inf"))
    return scores.masked_fill(index == newest[:, None, None], float("inf"))


def _top(scores: torch.Tensor, keep: int, counts: torch.Tensor) -> torch.Tensor:
    """The ``keep`` best entries of each row in rank order (stable: ties to the lower index), int32,
    0 past each row's ``counts``."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    rank = torch.arange(keep, device=scores.device)
    return torch.where(rank < counts[..., None], order, 0).to(torch.int32)


def select_pages_reference(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    page_counts: torch.Tensor,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's one-level selection: the ``budget`` best pages of each (sequence, KV head), the newest always among them.

    q ``(B, Hq, D)``; key_min / key_max ``(num_pages, Hkv, D)`` per physical page; page_table
    ``(B, max_pages)`` int32; page_counts ``(B,)`` int32 (pages each sequence uses, >= 1).
    Returns ``selected`` int32 ``(B, Hkv, min(budget, max_pages))`` (logical pages in rank
    order, 0 past the count) and ``counts`` int32 ``(B, Hkv)`` = ``min(page_counts, budget)``.
    Memory: float32 copies of the gathered summaries, ``(B, max_pages, Hkv, D)`` twice.
    """
    table = page_table.long()
    used = page_counts.long()
    scores = _mark(group_page_scores(q, key_min[table], key_max[table]), used, used - 1)
    keep = min(budget, page_table.shape[1])
    counts = used.clamp(max=keep).to(torch.int32)[:, None].expand(scores.shape[:2]).contiguous()
    return _top(scores, keep, counts), counts


def select_pages_two_level_reference(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    super_min: torch.Tensor,
    super_max: torch.Tensor,
    page_table: torch.Tensor,
    page_counts: torch.Tensor,
    budget: int,
    *,
    super_page: int,
    super_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level selection: the ``super_budget`` best super-pages (of ``super_page`` logical pages,
    ranked by the same bound over their summaries ``super_min`` / ``super_max`` ``(B, max_super,
    Hkv, D)``, the newest always among them), then the ``budget`` best pages inside them.

    Other arguments and results as in :func:`select_pages_reference`. Needs ``(super_budget - 1) *
    super_page >= budget`` so the kept super-pages hold ``min(page_counts, budget)`` pages (the
    newest super-page may be partial). When ``super_budget`` covers every super-page of a
    sequence this is exactly the one-level selection.
    """
    table = page_table.long()
    used = page_counts.long()
    supers = -(-used // super_page)
    coarse = group_page_scores(q, super_min, super_max)[..., : super_min.shape[1]]
    coarse = _mark(coarse, supers, supers - 1)
    kept_supers = torch.sort(coarse, dim=-1, descending=True, stable=True).indices[..., :super_budget]
    kept = torch.zeros_like(coarse, dtype=torch.bool).scatter_(-1, kept_supers, True)
    scores = _mark(group_page_scores(q, key_min[table], key_max[table]), used, used - 1)
    page_super = torch.arange(scores.shape[-1], device=q.device) // super_page
    in_kept = torch.gather(kept, -1, page_super.clamp(max=kept.shape[-1] - 1).expand_as(scores))
    scores = scores.masked_fill(~in_kept, float("-inf"))
    keep = min(budget, page_table.shape[1])
    counts = used.clamp(max=keep).to(torch.int32)[:, None].expand(scores.shape[:2]).contiguous()
    return _top(scores, keep, counts), counts
