"""Streaming decode: attention sinks plus a window of the most recent pages.

Paper: Guangxuan Xiao, Yuandong Tian, Beidi Chen, Song Han, Mike Lewis, "Efficient Streaming
Language Models with Attention Sinks", 2023, arXiv:2309.17453.

Rule: each step reads the first ``sink_tokens`` tokens (the attention sinks) and the most
recent tokens, ``token_budget`` tokens in all, at page granularity: the pages holding the
sinks (``ceil(sink_tokens / P)``) and the newest ``token_budget // P`` minus those pages. The
same pages for every KV head. A sequence within the budget reads all of its pages.

Defaults: ``sink_tokens=4`` (the paper's four initial tokens), ``token_budget=2048``.

Choices where the paper is silent: the paper keeps a rolling cache of recent tokens (it evicts
the rest); here nothing is evicted, the window is what is read. Pages, not tokens: the sink
page also brings the tokens after the sinks in its page, and the window starts at a page
boundary, so up to ``P - 1`` fewer recent tokens are read than a token-level window of the
same budget. Positions are the cache's own (the paper re-assigns positions within its rolling
cache; with RoPE applied before caching, as transformers does, that is not possible here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checks import check_int
from ..registry import register_decode_method
from ..selection import DecodeSelection, budget_in_pages


@dataclass(frozen=True)
class StreamingDecodeConfig:
    token_budget: int = 2048
    sink_tokens: int = 4

    def __post_init__(self):
        check_int("token_budget", self.token_budget)
        check_int("sink_tokens", self.sink_tokens, minimum=0)


@register_decode_method(
    "streaming",
    config=StreamingDecodeConfig,
    paper="StreamingLLM (arXiv:2309.17453)",
    summary="sink pages + the most recent pages, token_budget tokens in all",
)
def select_streaming(q, cache, config: StreamingDecodeConfig, *, layer: int, state: dict) -> DecodeSelection:
    budget = budget_in_pages(config.token_budget, cache.page_size)
    sink_pages = -(-config.sink_tokens // cache.page_size)
    if sink_pages >= budget:
        raise ValueError(
            f"token_budget ({config.token_budget}) must leave room for at least one window page after the "
            f"{sink_pages} sink page(s) of {cache.page_size} tokens"
        )
    pages = cache.page_counts[:, None]  # (B, 1)
    slot = torch.arange(budget, device=cache.device)[None, :]
    # Within the budget: pages 0..n-1. Beyond: the sink pages, then the newest budget - sink pages.
    window = torch.where(slot < sink_pages, slot, pages - budget + slot)
    selected = torch.where(pages <= budget, slot, window).to(torch.int32)
    counts = pages.clamp(max=budget).to(torch.int32)
    batch = selected.shape[0]
    return DecodeSelection(
        selected[:, None].expand(batch, cache.kv_heads, budget), counts.expand(batch, cache.kv_heads), cache.page_size
    )
