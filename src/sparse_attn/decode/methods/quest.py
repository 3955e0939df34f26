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
- Ties are broken by ``torch.topk``'s order.

Operator: :func:`sparse_attn.ops.page_bounds.page_bounds` (one Triton kernel on CUDA).
Cost per step and KV head: the bounds read ``2 * D`` summary values per page (``1/P`` of the
keys and values a dense step reads, with 2-byte keys), plus a top-k over pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...checks import check_int
from ...ops.page_bounds import page_bounds
from ..registry import register_decode_method
from ..selection import (
    DecodeSelection,
    budget_in_pages,
    dense_selection,
    topk_selection,
)


@dataclass(frozen=True)
class QuestConfig:
    token_budget: int = 2048
    dense_layers: int = 2

    def __post_init__(self):
        check_int("token_budget", self.token_budget)
        check_int("dense_layers", self.dense_layers, minimum=0)


@register_decode_method(
    "quest",
    config=QuestConfig,
    paper="Quest (arXiv:2406.10774)",
    summary="top pages by the upper bound of q·k from per-page key min/max; first 2 layers dense",
)
def select_quest(q, cache, config: QuestConfig, *, layer: int, state: dict) -> DecodeSelection:
    if layer < config.dense_layers:
        return dense_selection(cache)
    budget = budget_in_pages(config.token_budget, cache.page_size)
    bounds = page_bounds(
        q, cache.key_min, cache.key_max, cache.page_table, cache.seq_lens, page_size=cache.page_size, newest_first=True
    )
    return topk_selection(bounds, cache.page_counts, budget, cache.page_size, ranked=True)
