"""Reference backend: exact block-sparse attention in plain PyTorch.

The oracle every fast path is tested against. It gathers, for a chunk of query blocks,
only the KV blocks their lists name, so memory stays ``O(chunk * block * max_kv)`` and
never ``O(S^2)``. Arithmetic runs in float32 (float64 inputs stay float64). It supports
autograd, so it is also the path for inputs that require gradients, and it runs every case
(any device, dtype, head_dim and block size). A pattern's token rule
(:class:`sparse_attn.masked_pattern.MaskedPattern`) is evaluated exactly inside every gathered block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from ..masked_pattern import token_rule_of
from ..pattern import BlockSparsePattern

name = "reference"

# Upper bound on score elements materialized at once (per chunk of query blocks).
_SCORE_BUDGET = 1 << 22


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str | None:
    """Always ``None``: the reference backend runs every case."""
    return None


def _blocked(x: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, n_blocks, block, D), zero-padded at the tail."""
    batch, heads, length, dim = x.shape
    pad = n_blocks * block - length
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(batch, heads, n_blocks, block, dim)


def _attend_chunk(
    queries, k_blocks, v_blocks, batch_index, kv_head, indices, used, query_pos, seq_k, scale, dtype, rule, rows_pos
):
    """Exact attention of one chunk of query blocks over their gathered KV blocks.

    ``queries`` ``(B, h, c, bq, D)``; ``indices`` / ``used`` ``(B, h, c, max_kv)`` (unused slots
    point at the spare zero block); ``query_pos`` ``(c, bq)`` absolute positions in causal mode,
    else ``None``; ``rule``: the pattern's token rule (evaluated on every gathered key, with the
    queries at absolute positions ``rows_pos`` ``(c, bq)``) or ``None``. Returns ``out``
    ``(B, h, c, bq, D)`` and ``lse`` ``(B, h, c, bq)`` in ``dtype``.
    """
    block_k = k_blocks.shape[3]
    keys = k_blocks[batch_index, kv_head, indices].flatten(3, 4).to(dtype)
    values = v_blocks[batch_index, kv_head, indices].flatten(3, 4).to(dtype)
    # The scale goes on the query chunk, which is smaller than its scores by max_kv*bk / D.
    scores = torch.matmul(queries.to(dtype) * scale, keys.transpose(-1, -2))  # (B, h, c, bq, max_kv*bk)
    key_pos = (indices[..., None] * block_k + torch.arange(block_k, device=indices.device)).flatten(3, 4)
    visible = used[..., None].expand(*used.shape, block_k).flatten(3, 4) & (key_pos < seq_k)
    if rule is not None:
        # The rule is whole (all True) on blocks it does not cut, so evaluating it everywhere is exact.
        visible = visible[..., None, :] & rule.allowed(rows_pos[None, None, :, :, None], key_pos[..., None, :])
    else:
        visible = visible[..., None, :]
    if query_pos is None:
        hidden = ~visible
    else:
        # One comparison covers causality and the slot/bounds rule: hidden keys sit past every query.
        key_pos = torch.where(visible, key_pos[..., None, :], torch.iinfo(key_pos.dtype).max)
        hidden = key_pos > query_pos[None, None, :, :, None]
    # In place: matmul keeps its inputs, not its output, for the backward pass.
    scores.masked_fill_(hidden, float("-inf"))
    # One max / exp / sum pass. The max only shifts the exponent (no gradient flows through it);
    # an infinite max is replaced by 0 as torch.logsumexp does, so a row with no visible key (only
    # a token rule can empty a row) gets lse = -inf and output 0 (its weights are all 0; divided
    # by 1, not 0, so no NaN reaches its gradients either), as the kernels and FlexAttention
    # give; a +inf score gives lse = +inf and a NaN output, as before.
    shift = scores.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isinf(shift), 0.0, shift)
    weights = scores.sub_(shift).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    lse = (torch.log(total) + shift).squeeze(-1)
    return torch.matmul(weights, values) / torch.where(total == 0, 1.0, total), lse


class _Chunk(NamedTuple):
    """One step of :func:`chunks`: query heads ``heads`` (a slice) and query blocks ``blocks``
    (the first is ``first_block``); ``pattern_head`` / ``kv_head`` ``(1, h, 1)`` their pattern
    head and KV head, ``counts`` ``(B, h, c)`` the blocks' list lengths."""

    heads: slice
    pattern_head: torch.Tensor
    kv_head: torch.Tensor
    blocks: torch.Tensor
    first_block: int
    counts: torch.Tensor


def chunks(pattern: BlockSparsePattern, batch_index: torch.Tensor, pattern_batch: torch.Tensor, q_heads: int,
           kv_heads: int, per_head_block: int, budget: int = _SCORE_BUDGET) -> Iterator[_Chunk]:  # fmt: skip
    """Walk (query heads, query blocks) in chunks of about ``budget`` elements, where one
    (query head, query block) costs ``per_head_block``: heads first, then query blocks, so one
    step stays near the budget at any length."""
    q_heads_per_chunk = min(q_heads, max(1, budget // per_head_block))
    blocks_per_chunk = max(1, budget // (per_head_block * q_heads_per_chunk))
    device = batch_index.device
    for first_head in range(0, q_heads, q_heads_per_chunk):
        # Index maps from (batch, query head) to the pattern's batch/head and the KV head.
        query_head = torch.arange(first_head, min(first_head + q_heads_per_chunk, q_heads), device=device)
        pattern_head = (query_head // (q_heads // pattern.num_heads))[None, :, None]
        kv_head = (query_head // (q_heads // kv_heads))[None, :, None]
        heads = slice(first_head, first_head + len(query_head))
        for first in range(0, pattern.num_q_blocks, blocks_per_chunk):
            blocks = torch.arange(first, min(first + blocks_per_chunk, pattern.num_q_blocks), device=device)
            counts = pattern.kv_counts[pattern_batch, pattern_head, blocks[None, None, :]]  # (B, h, c)
            yield _Chunk(heads, pattern_head, kv_head, blocks, first, counts)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool = False,
):
    """Exact attention over the pattern's blocks. Shapes as in :func:`sparse_attn.block_sparse_attention`."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_q, block_k = pattern.block_q, pattern.block_k
    n_q, n_kv, max_kv = pattern.num_q_blocks, pattern.num_kv_blocks, pattern.max_kv
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rule = token_rule_of(pattern)

    # Inputs stay in their dtype; each step converts only what it gathers. K and V get one
    # spare zero block, which unused list slots point at: their (zero) weights then multiply
    # zeros, so a NaN/Inf in a block the list does not keep never reaches the row.
    k_blocks = _blocked(k, block_k, n_kv + 1)
    v_blocks = _blocked(v, block_k, n_kv + 1)
    q_blocks = _blocked(q, block_q, n_q)
    out = q.new_empty((batch, q_heads, n_q * block_q, dim))
    lse_out = torch.empty((batch, q_heads, n_q * block_q), dtype=torch.float32, device=q.device)

    offset = seq_k - seq_q
    slots = torch.arange(max_kv, device=q.device)
    row_in_block = torch.arange(block_q, device=q.device)
    batch_index = torch.arange(batch, device=q.device)[:, None, None]
    pattern_batch = batch_index if pattern.batch == batch else torch.zeros_like(batch_index)
    # Work per (query head, query block): its scores plus the gathered keys and values.
    per_head_block = batch * max_kv * block_k * (block_q + 2 * dim)
    for heads, pattern_head, kv_head, blocks, first, counts in chunks(
        pattern, batch_index, pattern_batch, q_heads, kv_heads, per_head_block
    ):
        indices = pattern.kv_indices[
            pattern_batch[..., None], pattern_head[..., None], blocks[None, None, :, None], slots
        ]
        used = slots < counts[..., None]  # (B, h, c, max_kv)
        indices = torch.where(used, indices, n_kv).long()
        rows_pos = offset + blocks[:, None] * block_q + row_in_block  # (c, bq)
        query_pos = rows_pos if causal else None
        # Under autograd each chunk is recomputed in the backward pass (checkpointed), so
        # the graph keeps only the chunk's inputs, never its scores: O(S * block) memory.
        chunk = (q_blocks[:, heads, blocks], k_blocks, v_blocks, batch_index[..., None], kv_head[..., None])
        chunk += (indices, used, query_pos, seq_k, scale, compute_dtype, rule, rows_pos)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            chunk_out, lse = checkpoint(_attend_chunk, *chunk, use_reentrant=False)
        else:
            chunk_out, lse = _attend_chunk(*chunk)
        rows = slice(first * block_q, (first + len(blocks)) * block_q)
        out[:, heads, rows] = chunk_out.flatten(2, 3).to(q.dtype)
        lse_out[:, heads, rows] = lse.flatten(2, 3).float()
    if return_lse:
        return out[:, :, :seq_q], lse_out[:, :, :seq_q]
    return out[:, :, :seq_q]


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend cannot differentiate this case, or ``None``: autograd differentiates it
    directly, one chunk of query blocks at a time (see :func:`forward`)."""
    return None
