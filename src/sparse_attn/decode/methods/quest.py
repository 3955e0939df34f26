"""Quest: query-aware page selection from per-page key bounds.

Paper: Jiaming Tang, Yilong Zhao, Kan Zhu, Guangxuan Xiao, Baris Kasikci, Song Han, "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024, arXiv:2406.10774.

Rule: every KV page keeps the element-wise minimum ``m`` and maximum ``M`` of its keys
(:class:`~sparse_attn.decode.cache.PagedKVCache` updates them on append). A query ``q`` bounds
its dot product with any key of the page by ``U = sum_d max(q_d m_d, q_d M_d)`` (the page's
criticality), and the step reads the top ``token_budget / P`` pages by ``U``. Here
``max(q_d m_d, q_d M_d) = max(q_d, 0) M_d + min(q_d, 0) m_d``, so the bounds of all pages are
two matrix products with the page summaries.

Defaults: ``token_budget=2048`` (the paper sweeps 256-4096), page size 16 (the cache's
``page_size``; the paper's pages are 16 tokens), ``dense_layers=2``: the paper does not apply
Quest to the first two layers, whose attention it finds far less sparse; they read every page.
(The page size and the two dense layers are from the paper as remembered: the stored copies
reachable when this was written held its abstract and summaries, which confirm the min/max
bound and the top-K pages but not these two numbers. Check them against the PDF.)

Choices where the paper is silent (it evaluates multi-head models, one selection per head):

- GQA: one selection per KV head, shared by its query heads, so the kernel reads a page once
  per group (as NSA shares its selection per group, arXiv:2502.11089). Pages are ranked by
  the sum of the group's per-head bounds, an upper bound of the group's summed ``q · k`` for
  any key of the page (the same group rule as ``moba``'s ``share_in_group``); with one query
  head per KV head this is exactly Quest's ranking. Summing per-head softmaxes of the bounds
  instead would even out heads whose queries differ in norm, but needs a second pass over
  every page (the maximum and sum of each head first): not done, to keep selection one kernel.
- The page holding the newest token (the step's own key) is always read, whatever its bound.
- A budget under one page is an error; ``token_budget // P`` pages are read (the paper's budgets
  are multiples of the page size).
- Ties: the higher bound first, then the lower page index (deterministic; the selection
  operator's packed sort keys, :mod:`sparse_attn.ops.page_select`). Selected pages are listed
  in rank order.

Two-level selection (``levels=2``; not in the paper, which reads every page's summaries): the
one-level bounds read ``2 * D`` summary values per page, ``1/P`` of what a dense step reads,
which at long context is more than the budget's own keys and values (at 128K tokens, ``P =
16``, budget 2048: 8192 pages' summaries, 4 MB per sequence and KV head, against 1 MB of keys
and values). With ``levels=2`` the cache's coarse summaries (min/max over super-pages of ``G
= cache.super_page`` pages, default 16) are ranked first by the same bound, the
``ceil(oversample * budget_pages / G) + 1`` best super-pages are kept (the newest always among
them; the ``+ 1`` makes room for it, as it may be partial), and Quest's top ``budget_pages``
pages are taken among their pages. Reads: ``1/G`` of the one-level summaries plus the kept
super-pages' (``oversample`` times the budget's pages). A super-page's bound is at least the
bound of each of its pages, so the result is exactly one-level Quest whenever the
``budget_pages``-th best kept page's bound is at least the best bound of a super-page left out
(always when the kept super-pages cover the sequence); otherwise a page whose own bound ranks
in the top ``budget_pages`` can be missed because its super-page ranked low (its neighbours'
keys made the coarse box no tighter, but other boxes were larger). ``oversample`` (default 2)
trades reads for that exactness.

Selection reuse (``reselect_every``; not in Quest, which selects at every step): LServe (Yang et
al., "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention", MLSys 2025,
arXiv:2502.14866) keeps one page selection for several consecutive decode steps, since
consecutive queries pick nearly the same pages; its released evaluation scripts set the
selector's update interval to 4 steps. With ``reselect_every=R`` a layer selects at one step
and reuses that selection for the next ``R - 1`` (counted per sequence by tokens appended since,
read from the cache's host-side lengths); the pages opened since the selection (``ceil((R - 1) /
P)`` at most) are read too, so no new token is skipped, and a step may read that many pages
over the budget. Any cache change other than an append (``crop``) drops the remembered
selection. A reuse step launches one small kernel (the counts of pages now read) instead of the
selection. Default 1: Quest's per-step selection. Measured on the H200 at 128K, batch 8, budget
2048, two levels with ``oversample=4``: the selection's share of the step's GPU time is 53 %
per step, 25 % with ``reselect_every=4`` and 17 % with 8; on Gemma 3 270M at 16K (9 cases)
both intervals answered as dense decode (``benchmarks/results/h200/decode_reselect8_s43.json``,
``benchmarks/results/cpu/decode_accuracy_gemma16k_reselect.json``).

Operator: :mod:`sparse_attn.ops.page_select` (bounds and top-k fused in Triton kernels on
CUDA: two launches for one level, one for two levels; PyTorch elsewhere). No host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checks import check_int
from ...ops.page_select import select_pages, select_pages_two_level
from ..registry import register_decode_method
from ..selection import DecodeSelection, budget_in_pages, dense_selection, reuse_window_covers


@dataclass(frozen=True)
class QuestConfig:
    token_budget: int = 2048
    dense_layers: int = 2
    levels: int = 1
    oversample: int = 2
    reselect_every: int = 1

    def __post_init__(self):
        check_int("token_budget", self.token_budget)
        check_int("dense_layers", self.dense_layers, minimum=0)
        check_int("levels", self.levels)
        check_int("oversample", self.oversample)
        check_int("reselect_every", self.reselect_every)
        if self.levels > 2:
            raise ValueError(f"levels must be 1 or 2, got {self.levels}")


def super_budget(config: QuestConfig, budget_pages: int, super_page: int) -> int:
    """Super-pages the coarse level keeps: ``ceil(oversample * budget_pages / G) + 1``."""
    return -(-config.oversample * budget_pages // super_page) + 1


@register_decode_method(
    "quest",
    config=QuestConfig,
    paper="Quest (arXiv:2406.10774)",
    summary="top pages by the upper bound of q·k from per-page key min/max; first 2 layers dense; levels=2: "
    "super-pages first; reselect_every=R: one selection per R steps (LServe)",
)
def select_quest(q, cache, config: QuestConfig, *, layer: int, state: dict) -> DecodeSelection:
    if layer < config.dense_layers:
        return dense_selection(cache)
    if config.reselect_every == 1:
        return quest_pages(q, cache, config)
    key = ("quest", config)
    memo = cache.selection_memo.get(key)
    if memo is None or not memo.covers(cache):
        memo = cache.selection_memo[key] = SelectionMemo.remember(
            quest_pages(q, cache, config), cache, config.reselect_every
        )
    return memo.reuse(cache)


@dataclass(frozen=True)
class SelectionMemo:
    """A selection kept for reuse over the next steps (``reselect_every``, module docstring).

    ``selection``: the selected pages with room for the pages opened later: entry
    ``counts[b, h] + j`` holds page ``page_counts[b] + j`` (``j`` < the extra slots), so a later
    step reads the first ``counts + (page_counts now - page_counts then)`` entries. ``lengths``:
    the sequences' host-side lengths when it was made."""

    selection: DecodeSelection
    page_counts: torch.Tensor
    lengths: tuple[int, ...]
    steps: int

    @staticmethod
    def remember(selection: DecodeSelection, cache, steps: int) -> SelectionMemo:
        extra = -(-(steps - 1) // cache.page_size)  # pages the next steps - 1 tokens can open
        selected, counts = selection.selected, selection.counts
        batch, heads, width = selected.shape
        wide = torch.zeros((batch, heads, width + extra), dtype=selected.dtype, device=selected.device)
        wide[..., :width] = selected
        slots = counts[..., None].long() + torch.arange(extra, device=selected.device)
        pages = cache.page_counts[:, None, None] + torch.arange(extra, dtype=selected.dtype, device=selected.device)
        wide.scatter_(2, slots, pages.expand(batch, heads, extra))
        return SelectionMemo(
            DecodeSelection(wide, counts, selection.select_block),
            cache.page_counts.clone(),
            tuple(cache.lengths),
            steps,
        )

    def covers(self, cache) -> bool:
        """Whether this selection may serve the cache's current step: every sequence has taken
        fewer than ``steps`` tokens since (and none fewer than at the selection)."""
        return reuse_window_covers(self.lengths, cache.lengths, self.steps)

    def reuse(self, cache) -> DecodeSelection:
        opened = cache.page_counts - self.page_counts
        counts = self.selection.counts + opened[:, None]
        return DecodeSelection(self.selection.selected, counts, self.selection.select_block)


def quest_pages(q, cache, config: QuestConfig) -> DecodeSelection:
    """Quest's selection of this step (one or two levels), without reuse."""
    budget = budget_in_pages(config.token_budget, cache.page_size)
    pages = (q, cache.key_min, cache.key_max)
    if config.levels == 1:
        selected, counts = select_pages(*pages, cache.page_table, cache.page_counts, budget)
    else:
        selected, counts = select_pages_two_level(
            *pages, cache.super_min, cache.super_max, cache.page_table, cache.page_counts, budget,
            super_page=cache.super_page, super_budget=super_budget(config, budget, cache.super_page),
        )  # fmt: skip
    return DecodeSelection(selected, counts, cache.page_size)
