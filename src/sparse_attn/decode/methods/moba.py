"""MoBA at decode: the newest key block plus the best earlier blocks by the gate ``q · mean(K[block])``.

Paper: Enzhe Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", 2025,
arXiv:2502.13189 (the prefill rule is :mod:`sparse_attn.methods.moba`).

Rule (the paper's gate, one query token): keys are cut into blocks of ``block_size`` tokens;
the gate of block ``i`` is ``q · mean(K[block i])``; the query attends to its own (newest, possibly
partial) block and to the ``top_k - 1`` earlier blocks with the highest gates. MoBA's own decode
(its released code) falls back to dense attention; this method applies the same rule to each
decode step, so a model patched with ``moba`` for prefill keeps its block selection when it
generates (``sa.patch(model, method="moba", decode_method="moba")``).

Options: ``block_size`` (default 512, the paper's setting for its scaling runs; its long-context
setting is 4096 with top-k 12) and ``token_budget`` in tokens, as every decode method takes it:
``top_k = token_budget // block_size`` blocks (default 1536 = 3 blocks of 512: the paper's top-3).
``dense_layers`` (default 0) makes the first layers read every page. ``sink_blocks`` (default 0;
not in the paper) keeps the first blocks whatever their gate, within the ``top_k``.

Choices where the paper is silent or where decode differs from prefill:

- GQA: one list per KV head, ranked by the gates summed over the group's query heads (as
  ``moba``'s ``share_in_group=True`` at prefill), so the paged kernel reads each block once per
  group. The paper gates each query head on its own; per-head lists at decode would read up to
  ``group`` times more blocks.
- Block means come from the cache's running key sums (float32): per super-page when
  ``block_size`` is a multiple of the super-page span ``G · P`` (``PagedKVCache.super_sum``, no
  pass over the pages), else per page through the page table. ``block_size`` must be a multiple
  of the page size (blocks are read as whole pages).
- The newest block is always kept whatever its gate; a sequence with at most ``top_k`` blocks
  reads all of them. Ties go to the lower block index (the prefill rule's tie-break).
- Blocks are listed in ascending order, their pages in order, the newest block's pages up to the
  sequence's last page.

Accuracy on a model not trained with the gate (Gemma 3 270M, CPU, ``benchmarks/results/cpu/
decode_accuracy_moba_*.json``): well below Quest at equal budgets (0.33-0.40 vs 0.57 at 1024
of 4K tokens; 0 of 3 at 4096 of 16K, with degenerate answers, still 0 of 3 but no longer
degenerate with ``sink_blocks=1``): use it with MoBA-trained models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checks import check_int
from ..registry import register_decode_method
from ..selection import DecodeSelection, dense_selection


@dataclass(frozen=True)
class MobaDecodeConfig:
    token_budget: int = 1536
    block_size: int = 512
    dense_layers: int = 0
    sink_blocks: int = 0  # not in the paper: the first blocks kept whatever their gate

    def __post_init__(self):
        check_int("token_budget", self.token_budget)
        check_int("block_size", self.block_size)
        check_int("dense_layers", self.dense_layers, minimum=0)
        check_int("sink_blocks", self.sink_blocks, minimum=0)
        if self.token_budget < self.block_size:
            raise ValueError(
                f"token_budget ({self.token_budget}) must hold at least one block of block_size ({self.block_size}) tokens"
            )
        if self.token_budget // self.block_size <= self.sink_blocks:
            raise ValueError(
                f"token_budget ({self.token_budget}) must hold the {self.sink_blocks} sink block(s) and the newest "
                f"block of block_size ({self.block_size}) tokens"
            )


def block_key_sums(cache, block_size: int) -> torch.Tensor:
    """Sum of the keys of each ``block_size``-token block of each sequence, float32 ``(B, n_blocks, Hkv, D)``."""
    span = cache.page_size * cache.super_page
    if block_size % span == 0:
        per_block = block_size // span
        sums = cache.super_sum
    else:
        per_block = block_size // cache.page_size
        sums = cache.key_sum[cache.page_table.long()]  # (B, max_pages, Hkv, D); unused entries are summed, masked later
    batch, units, heads, dim = sums.shape
    n_blocks = -(-units // per_block)
    padded = torch.nn.functional.pad(sums, (0, 0, 0, 0, 0, n_blocks * per_block - units))
    return padded.view(batch, n_blocks, per_block, heads, dim).sum(2)


@register_decode_method(
    "moba",
    config=MobaDecodeConfig,
    paper="MoBA (arXiv:2502.13189)",
    summary="the newest block + the best earlier blocks by q · mean key (block_size tokens, token_budget // "
    "block_size blocks), the group's gates summed",
)
def select_moba(q, cache, config: MobaDecodeConfig, *, layer: int, state: dict) -> DecodeSelection:
    if layer < config.dense_layers:
        return dense_selection(cache)
    if config.block_size % cache.page_size:
        raise ValueError(f"block_size ({config.block_size}) must be a multiple of the page size ({cache.page_size})")
    batch, q_heads, dim = q.shape
    top_k = config.token_budget // config.block_size
    pages_per_block = config.block_size // cache.page_size
    lengths = cache.seq_lens.long()  # (B,)
    sums = block_key_sums(cache, config.block_size)  # (B, n_blocks, Hkv, D)
    n_blocks = sums.shape[1]
    index = torch.arange(n_blocks, device=q.device)
    tokens = (lengths[:, None] - index * config.block_size).clamp(0, config.block_size)  # (B, n_blocks)
    means = sums / tokens.clamp(min=1)[:, :, None, None]
    group_query = q.float().view(batch, cache.kv_heads, q_heads // cache.kv_heads, dim).sum(2)  # (B, Hkv, D)
    gates = torch.einsum("bhd,bnhd->bhn", group_query, means)
    own = (lengths - 1) // config.block_size  # (B,)
    valid = index[None, :] <= own[:, None]
    gates = gates.masked_fill(~valid[:, None], float("-inf"))
    forced = (index[None, :] == own[:, None]) | (index[None, :] < config.sink_blocks)
    gates = gates.masked_fill((forced & valid)[:, None], float("inf"))
    keep = min(top_k, n_blocks)
    # Stable descending sort: equal gates keep the lower block first.
    order = torch.sort(gates, dim=-1, descending=True, stable=True).indices[..., :keep]
    chosen = torch.where(torch.gather(gates, -1, order) > float("-inf"), order, n_blocks)
    chosen = torch.sort(chosen, dim=-1).values  # ascending; blocks past the sequence (n_blocks) last
    pages = chosen[..., None] * pages_per_block + torch.arange(pages_per_block, device=q.device)
    chosen_blocks = torch.minimum(own + 1, torch.full_like(own, keep))  # (B,)
    counts = (chosen_blocks - 1) * pages_per_block + (cache.page_counts.long() - own * pages_per_block)
    selected = pages.flatten(-2).clamp(max=cache.page_table.shape[1] - 1).to(torch.int32)
    return DecodeSelection(selected, counts[:, None].expand(batch, cache.kv_heads).to(torch.int32), cache.page_size)
