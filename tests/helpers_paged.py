"""Test utilities for paged decode: random paged KV caches with poisoned unused storage, selections, an oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNUSED_PAGE = 2**30  # page-table entry past a sequence's pages: any read of it faults or shows


@dataclass
class PagedCase:
    """A paged KV cache built from contiguous per-sequence keys/values (the oracle's view)."""

    q: torch.Tensor  # (B, Hq, D)
    keys: list[torch.Tensor]  # per sequence (Hkv, S_b, D)
    values: list[torch.Tensor]
    k_pages: torch.Tensor  # (num_pages, Hkv, P, D), NaN where no token lives
    v_pages: torch.Tensor
    page_table: torch.Tensor  # (B, max_pages) int32
    seq_lens: torch.Tensor  # (B,) int32


def paged_case(seq_lens, q_heads, kv_heads, dim, page_size, dtype=torch.float32, seed=0, device="cpu") -> PagedCase:
    """Random q and per-sequence K/V scattered into shuffled physical pages (plus spare NaN pages)."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    pages_per_seq = [-(-length // page_size) for length in seq_lens]
    max_pages = max(pages_per_seq) + 1
    num_pages = sum(pages_per_seq) + 3
    order = torch.randperm(num_pages, generator=generator)
    k_pages = torch.full((num_pages, kv_heads, page_size, dim), float("nan"), dtype=dtype)
    v_pages = torch.full_like(k_pages, float("nan"))
    page_table = torch.full((batch, max_pages), UNUSED_PAGE, dtype=torch.int32)
    keys, values = [], []
    used = 0
    for b, length in enumerate(seq_lens):
        k = torch.randn(kv_heads, length, dim, generator=generator).to(dtype)
        v = torch.randn(kv_heads, length, dim, generator=generator).to(dtype)
        keys.append(k.to(device))
        values.append(v.to(device))
        for i in range(pages_per_seq[b]):
            physical = int(order[used])
            used += 1
            page_table[b, i] = physical
            rows = slice(i * page_size, min(length, (i + 1) * page_size))
            filled = rows.stop - rows.start
            k_pages[physical, :, :filled] = k[:, rows]
            v_pages[physical, :, :filled] = v[:, rows]
    q = torch.randn(batch, q_heads, dim, generator=generator).to(dtype)
    as_device = (x.to(device) for x in (q, k_pages, v_pages, page_table))
    q, k_pages, v_pages, page_table = as_device
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return PagedCase(q, keys, values, k_pages, v_pages, page_table, lengths)


def random_selection(case: PagedCase, kv_heads: int, select_block: int, seed: int, *, past_end: bool = False):
    """Per (sequence, KV head) a random non-empty set of distinct blocks of ``select_block`` tokens,
    padded with garbage past the count. ``past_end``: also select one block wholly past the sequence
    (inside its page table's span), which must contribute nothing."""
    generator = torch.Generator().manual_seed(seed)
    page_size = case.k_pages.shape[2]
    max_blocks = case.page_table.shape[1] * page_size // select_block
    lists = []
    for length in case.seq_lens.tolist():
        n_blocks = -(-length // select_block)
        for _ in range(kv_heads):
            count = int(torch.randint(1, n_blocks + 1, (1,), generator=generator))
            chosen = torch.randperm(n_blocks, generator=generator)[:count]
            if past_end and n_blocks < max_blocks:
                chosen = torch.cat([chosen, torch.tensor([max_blocks - 1])])
            lists.append(chosen)
    max_sel = max(len(x) for x in lists) + 2
    selected = torch.full((len(lists), max_sel), 7_000_000, dtype=torch.int32)
    counts = torch.zeros(len(lists), dtype=torch.int32)
    for row, chosen in enumerate(lists):
        selected[row, : len(chosen)] = chosen.to(torch.int32)
        counts[row] = len(chosen)
    batch = len(case.seq_lens)
    device = case.q.device
    return selected.view(batch, kv_heads, max_sel).to(device), counts.view(batch, kv_heads).to(device)


def dense_selection(case: PagedCase, kv_heads: int):
    """Every page of every sequence: dense decode through the paged path."""
    batch, max_pages = case.page_table.shape
    page_size = case.k_pages.shape[2]
    pages = torch.arange(max_pages, dtype=torch.int32, device=case.q.device)
    selected = pages.expand(batch, kv_heads, max_pages).contiguous()
    counts = ((case.seq_lens + page_size - 1) // page_size)[:, None].expand(batch, kv_heads).contiguous()
    return selected, counts


def oracle(case: PagedCase, selected, counts, select_block: int, scale=None):
    """Float64 attention of each sequence's query over the tokens the selection names, from the
    contiguous per-sequence K/V (independent of the pages). Returns (out (B, Hq, D), lse (B, Hq))."""
    batch, q_heads, dim = case.q.shape
    kv_heads = case.keys[0].shape[0]
    group = q_heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(batch):
        length = int(case.seq_lens[b])
        mask = torch.zeros(kv_heads, length, dtype=torch.bool)
        for h in range(kv_heads):
            units = selected[b, h, : int(counts[b, h])].long().cpu()
            positions = (units[:, None] * select_block + torch.arange(select_block)).reshape(-1)
            mask[h, positions[positions < length]] = True
        k = case.keys[b].double().repeat_interleave(group, 0).cpu()
        v = case.values[b].double().repeat_interleave(group, 0).cpu()
        scores = torch.einsum("hd,hsd->hs", case.q[b].double().cpu(), k) * scale
        scores = scores.masked_fill(~mask.repeat_interleave(group, 0), float("-inf"))
        lse = torch.logsumexp(scores, -1)
        outs.append(torch.einsum("hs,hsd->hd", torch.softmax(scores, -1), v))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)
