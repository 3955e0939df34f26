"""Page selection (Quest): per (sequence, KV head), the pages with the highest group bounds of ``q · k``, fused.

One level: the ``budget`` best pages by Quest's bound from each page's key minimum and maximum
(the page summaries of :class:`sparse_attn.decode.PagedKVCache`), the newest page always kept.
Two levels: the best super-pages (``super_page`` consecutive pages) by the same bound over
their coarse summaries first, then the best pages inside them. Ranking and tie-breaking
(higher bound first, then the lower page index) are documented in :mod:`.naive`, the
reference; kernels: :mod:`.triton` (CUDA, head_dim 16-256), chosen by the dispatch rule of
:mod:`sparse_attn.ops._dispatch`. Results never depend on a host read of device values.
"""

from __future__ import annotations

import torch

from ...checks import check_int
from .._dispatch import kernel_for, reference_fallback
from .naive import select_pages_reference, select_pages_two_level_reference

__all__ = ["select_pages", "select_pages_two_level"]


def _check(q, key_min, key_max, page_table, page_counts, budget) -> None:
    check_int("budget", budget)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a (batch, q_heads, head_dim) tensor, got {getattr(q, 'shape', type(q).__name__)}")
    batch, q_heads, dim = q.shape
    for name, x in (("key_min", key_min), ("key_max", key_max)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != dim:
            raise ValueError(f"{name} must be (num_pages, kv_heads, {dim}), got {getattr(x, 'shape', None)}")
    if key_max.shape != key_min.shape:
        raise ValueError(f"key_max must have key_min's shape {tuple(key_min.shape)}, got {tuple(key_max.shape)}")
    kv_heads = key_min.shape[1]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q's {q_heads} heads must be a positive multiple of the {kv_heads} KV heads")
    for name, x, shape in (("page_table", page_table, 2), ("page_counts", page_counts, 1)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.dim() != shape or x.shape[0] != batch:
            raise ValueError(f"{name} must be an int32 tensor with {shape} dimension(s) and {batch} rows")


def select_pages(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    page_counts: torch.Tensor,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected, counts)``: per (sequence, KV head), the ``budget`` pages with the highest group bounds.

    q ``(B, Hq, D)``; key_min / key_max ``(num_pages, Hkv, D)`` per physical page; page_table
    ``(B, max_pages)`` int32; page_counts ``(B,)`` int32 (pages each sequence uses, >= 1).
    ``selected`` int32 ``(B, Hkv, min(budget, max_pages))``: logical pages in rank order, the
    newest first, 0 past the count; ``counts`` int32 ``(B, Hkv)`` = ``min(page_counts, budget)``.
    """
    _check(q, key_min, key_max, page_table, page_counts, budget)
    kernel = kernel_for(q, __package__, head_dim=q.shape[-1])
    if kernel is not None:
        return kernel.select_pages_triton(q, key_min, key_max, page_table, page_counts, budget)
    return select_pages_reference(q, key_min, key_max, page_table, page_counts, budget)


def select_pages_two_level(
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
    """:func:`select_pages` restricted to the pages of the ``super_budget`` best super-pages.

    super_min / super_max ``(B, max_super, Hkv, D)``: the key minimum and maximum of each
    sequence's super-pages of ``super_page`` logical pages (``max_super >= ceil(max_pages /
    super_page)``). ``(super_budget - 1) * super_page`` must be at least ``min(budget,
    max_pages)`` so the kept super-pages hold the budget (the newest one may be partial).
    Exact (equal to :func:`select_pages`) when ``super_budget`` covers every super-page; see
    :mod:`sparse_attn.decode.methods.quest` for the approximation otherwise.
    """
    _check(q, key_min, key_max, page_table, page_counts, budget)
    check_int("super_page", super_page)
    check_int("super_budget", super_budget)
    batch, _, dim = q.shape
    expected = (batch, key_min.shape[1], dim)
    for name, x in (("super_min", super_min), ("super_max", super_max)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or (x.shape[0], *x.shape[2:]) != expected:
            raise ValueError(f"{name} must be (batch, max_super, kv_heads, head_dim) matching {expected}")
    max_pages = page_table.shape[1]
    if super_min.shape[1] * super_page < max_pages:
        raise ValueError(f"super_min must cover the table's {max_pages} pages ({super_min.shape[1]} super-pages)")
    if super_budget < -(-max_pages // super_page) and (super_budget - 1) * super_page < min(budget, max_pages):
        raise ValueError(
            f"super_budget ({super_budget}) super-pages of {super_page} pages cannot hold the budget of "
            f"{min(budget, max_pages)} pages: need (super_budget - 1) * super_page >= budget"
        )
    options = dict(super_page=super_page, super_budget=super_budget)
    kernel = kernel_for(q, __package__, head_dim=q.shape[-1])
    if kernel is not None and super_page & (super_page - 1):
        reference_fallback(__package__, f"takes a power-of-two super_page, not {super_page}")
        kernel = None
    if kernel is not None:
        return kernel.select_pages_two_level_triton(
            q, key_min, key_max, super_min, super_max, page_table, page_counts, budget, **options
        )
    return select_pages_two_level_reference(
        q, key_min, key_max, super_min, super_max, page_table, page_counts, budget, **options
    )
