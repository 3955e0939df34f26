"""What a decode method returns, and the selection steps the methods share.

A :class:`DecodeSelection` is the per (sequence, KV head) list the paged decode kernel walks
(:func:`sparse_attn.ops.paged_decode.paged_decode`): entries of ``select_block`` tokens (a page
when ``select_block`` is the page size, a token when 1). Every helper here works on whole
batches on the device, with sequence lengths from ``cache.seq_lens``: no host sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import PagedKVCache

__all__ = [
    "DecodeSelection",
    "budget_in_pages",
    "dense_selection",
    "group_probabilities",
    "reuse_window_covers",
    "topk_selection",
]


@dataclass(frozen=True)
class DecodeSelection:
    """``selected`` int32 ``(B, Hkv, max_sel)``: the first ``counts[b, h]`` entries (int32 ``(B, Hkv)``)
    name distinct blocks of ``select_block`` tokens of sequence ``b`` for KV head ``h``."""

    selected: torch.Tensor
    counts: torch.Tensor
    select_block: int

    def tokens_read(self) -> torch.Tensor:
        """Per (sequence, KV head), the tokens named (a partial last page counted whole), int64 ``(B, Hkv)``."""
        return self.counts.long() * self.select_block


def budget_in_pages(token_budget: int, page_size: int) -> int:
    """Whole pages within ``token_budget`` tokens; a budget under one page is refused."""
    if token_budget < page_size:
        raise ValueError(f"token_budget ({token_budget}) must hold at least one page of {page_size} tokens")
    return token_budget // page_size


def reuse_window_covers(then, now, steps: int) -> bool:
    """Whether a selection made at host lengths ``then`` may serve a step at lengths ``now`` under
    ``reselect_every=steps``: every sequence has taken fewer than ``steps`` tokens since (and none
    fewer than at the selection)."""
    return len(then) == len(now) and all(0 <= n - t < steps for n, t in zip(now, then, strict=True))


def dense_selection(cache: PagedKVCache) -> DecodeSelection:
    """Every page of every sequence, for every KV head."""
    batch, max_pages = cache.page_table.shape
    pages = torch.arange(max_pages, dtype=torch.int32, device=cache.device)
    selected = pages.expand(batch, cache.kv_heads, max_pages)
    counts = cache.page_counts[:, None].expand(batch, cache.kv_heads)
    return DecodeSelection(selected, counts, cache.page_size)


def group_probabilities(logits: torch.Tensor, valid: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per query head a softmax over the valid entries, summed over each GQA group.

    ``logits`` float ``(B, Hq, N)`` (already scaled), ``valid`` bool broadcastable to it.
    Returns float32 ``(B, Hkv, N)``: the share of the group's attention each entry would get,
    which ranks entries for the group as a whole (NSA's group-consistent selection, arXiv:2502.11089).
    """
    batch, q_heads, entries = logits.shape
    probabilities = torch.softmax(logits.float().masked_fill(~valid, float("-inf")), dim=-1)
    return probabilities.view(batch, kv_heads, q_heads // kv_heads, entries).sum(2)


def topk_selection(
    scores: torch.Tensor, lengths: torch.Tensor, budget: int, select_block: int, *, ranked: bool = False
) -> DecodeSelection:
    """The ``budget`` highest-scoring of each row's first ``lengths[b]`` entries, the newest entry always among them.

    ``scores`` float ``(B, Hkv, N)``, ``lengths`` int32 ``(B,)`` (valid entries per sequence,
    >= 1). The newest entry (``lengths[b] - 1``: the page or token holding the step's own key)
    is kept whatever its score. ``ranked``: ``scores`` already hold ``-inf`` past each
    sequence's entries and ``+inf`` at its newest (the page bounds kernel writes them so), which
    saves two passes. Ties are broken by ``torch.topk``'s order.
    """
    entries = scores.shape[-1]
    keep = min(budget, entries)
    if not ranked:
        index = torch.arange(entries, device=scores.device)
        last = lengths.long()[:, None, None]
        scores = scores.float().masked_fill(index >= last, float("-inf")).masked_fill(index == last - 1, float("inf"))
    selected = scores.topk(keep, dim=-1).indices.to(torch.int32)
    counts = lengths.clamp(max=keep).to(torch.int32)[:, None].expand(scores.shape[:2])
    return DecodeSelection(selected, counts, select_block)
