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


def walked_blocks(pattern: BlockSparsePattern, seq_q: int, seq_k: int) -> tuple[int, int]:
    """``(block_q, block_k)`` as the walk takes them: a block longer than its sequence is the
    whole sequence (its only block, so no position moves), and padding it to its nominal size
    would allocate for keys that do not exist (a ``block_size`` of 10**7 on 300 tokens)."""
    return min(pattern.block_q, max(seq_q, 1)), min(pattern.block_k, max(seq_k, 1))


def _blocked(x: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, n_blocks, block, D), zero-padded at the tail."""
    batch, heads, length, dim = x.shape
    pad = n_blocks * block - length
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(batch, heads, n_blocks, block, dim)


def _attend_chunk(
    queries,
    k_blocks,
    v_blocks,
    batch_index,
    kv_head,
    indices,
    used,
    query_pos,
    seq_k,
    scale,
    dtype,
    rule,
    rows_pos,
    row_keep=None,
):
    """Exact attention of one chunk of query blocks over their gathered KV blocks.

    ``queries`` ``(B, h, c, bq, D)``; ``indices`` / ``used`` ``(B, h, c, max_kv)`` (unused slots
    point at the spare zero block); ``query_pos`` ``(c, bq)`` absolute positions in causal mode,
    else ``None``; ``rule``: the pattern's token rule (evaluated on every gathered key, with the
    queries at absolute positions ``rows_pos`` ``(c, bq)``) or ``None``; ``row_keep``: bool ``(B, h, c, bq, max_kv)``,
    which gathered blocks each query row keeps (the grouped walk of token-level patterns,
    :func:`_grouped_forward`), or ``None`` (every row keeps its block's list). Returns ``out``
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
    if row_keep is not None:
        visible = visible & row_keep[..., None].expand(*row_keep.shape, block_k).flatten(-2, -1)
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
           kv_heads: int, per_head_block: int, budget: int = _SCORE_BUDGET,
           n_blocks: int | None = None) -> Iterator[_Chunk]:  # fmt: skip
    """Walk (query heads, query blocks) in chunks of about ``budget`` elements, where one
    (query head, query block) costs ``per_head_block``: heads first, then query blocks, so one
    step stays near the budget at any length. ``n_blocks``: walk that many units instead of the
    pattern's query blocks (groups of them, :func:`_grouped_forward`); ``counts`` is then ``None``."""
    q_heads_per_chunk = min(q_heads, max(1, budget // per_head_block))
    blocks_per_chunk = max(1, budget // (per_head_block * q_heads_per_chunk))
    device = batch_index.device
    for first_head in range(0, q_heads, q_heads_per_chunk):
        # Index maps from (batch, query head) to the pattern's batch/head and the KV head.
        query_head = torch.arange(first_head, min(first_head + q_heads_per_chunk, q_heads), device=device)
        pattern_head = (query_head // (q_heads // pattern.num_heads))[None, :, None]
        kv_head = (query_head // (q_heads // kv_heads))[None, :, None]
        heads = slice(first_head, first_head + len(query_head))
        total = pattern.num_q_blocks if n_blocks is None else n_blocks
        for first in range(0, total, blocks_per_chunk):
            blocks = torch.arange(first, min(first + blocks_per_chunk, total), device=device)
            counts = None
            if n_blocks is None:
                counts = pattern.kv_counts[pattern_batch, pattern_head, blocks[None, None, :]]  # (B, h, c)
            yield _Chunk(heads, pattern_head, kv_head, blocks, first, counts)


def _rows_per_group(pattern: BlockSparsePattern, v: torch.Tensor) -> int:
    """How many query blocks :func:`_grouped_forward` walks together: about 128 rows for
    token-level patterns (``block_q`` below 16), 1 (the block walk) otherwise, and 1 when ``v``
    holds a NaN/Inf (a group's shared gather would let it reach rows whose own lists skip its
    block, against the documented propagation rule)."""
    if pattern.block_q >= 16 or pattern.num_q_blocks == 1:
        return 1
    if not bool(torch.isfinite(v).all()):
        return 1
    return max(1, 128 // pattern.block_q)


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
    group = _rows_per_group(pattern, v)
    if group > 1:
        return _grouped_forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse, group=group)
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_q, block_k = walked_blocks(pattern, seq_q, seq_k)
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
        chunk = (q_blocks[:, heads, blocks], k_blocks, v_blocks, batch_index[..., None], kv_head[..., None])
        chunk += (indices, used, query_pos, seq_k, scale, compute_dtype, rule, rows_pos)
        rows = slice(first * block_q, (first + len(blocks)) * block_q)
        _attend_and_store(chunk, (q, k, v), out, lse_out, heads, rows)
    return _trimmed(out, lse_out, seq_q, return_lse)


def _attend_and_store(chunk: tuple, inputs: tuple, out, lse_out, heads: slice, rows: slice) -> None:
    """:func:`_attend_chunk` on ``chunk``, its output and LSE written at ``(heads, rows)``. Under
    autograd (any of ``inputs`` requires grad) the chunk is recomputed in the backward pass
    (checkpointed), so the graph keeps only its inputs, never its scores: O(S * block) memory."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        chunk_out, lse = checkpoint(_attend_chunk, *chunk, use_reentrant=False)
    else:
        chunk_out, lse = _attend_chunk(*chunk)
    out[:, heads, rows] = chunk_out.flatten(2, 3).to(out.dtype)
    lse_out[:, heads, rows] = lse.flatten(2, 3).float()


def _trimmed(out: torch.Tensor, lse_out: torch.Tensor, seq_q: int, return_lse: bool):
    """The padded outputs cut to the ``seq_q`` queries."""
    if return_lse:
        return out[:, :, :seq_q], lse_out[:, :, :seq_q]
    return out[:, :, :seq_q]


def _grouped_forward(q, k, v, pattern: BlockSparsePattern, *, causal: bool, scale: float, return_lse: bool,
                     group: int):  # fmt: skip
    """The walk of :func:`forward` for token-level patterns: ``group`` consecutive query blocks (a
    few rows each) gather the union of their lists once, and each row masks the union down to
    its own list (``row_keep``). The per-block walk would gather every row's keys separately
    (``max_kv * block_k`` keys per row: at 32K tokens with MoBA's 12 blocks of 4096, 25 MB per
    row and head). Same arithmetic, same result."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_q, block_k = walked_blocks(pattern, seq_q, seq_k)
    n_q, n_kv, max_kv = pattern.num_q_blocks, pattern.num_kv_blocks, pattern.max_kv
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rule = token_rule_of(pattern)
    rows_per_group = group * block_q
    n_groups = -(-n_q // group)
    k_blocks = _blocked(k, block_k, n_kv + 1)
    v_blocks = _blocked(v, block_k, n_kv + 1)
    q_groups = _blocked(q, rows_per_group, n_groups)
    out = q.new_empty((batch, q_heads, n_groups * rows_per_group, dim))
    lse_out = torch.empty((batch, q_heads, n_groups * rows_per_group), dtype=torch.float32, device=q.device)
    offset = seq_k - seq_q
    device = q.device
    slots = torch.arange(max_kv, device=device)
    row_in_group = torch.arange(rows_per_group, device=device)
    batch_index = torch.arange(batch, device=device)[:, None, None]
    pattern_batch = batch_index if pattern.batch == batch else torch.zeros_like(batch_index)
    union_bound = min(n_kv, group * max_kv)
    # Per (query head, group): scores and gathered K/V of the union, plus the membership table.
    per_head_group = batch * (union_bound * block_k * (rows_per_group + 2 * dim) + 2 * group * (n_kv + 1))
    for heads, pattern_head, kv_head, groups, first, _ in chunks(
        pattern, batch_index, pattern_batch, q_heads, kv_heads, per_head_group, n_blocks=n_groups
    ):
        blocks = (groups[:, None] * group + torch.arange(group, device=device)).flatten()  # (c * group,)
        real = blocks < n_q
        safe = torch.where(real, blocks, 0)
        counts = pattern.kv_counts[pattern_batch, pattern_head, safe[None, None, :]] * real  # (B, h, c*G)
        indices = pattern.kv_indices[
            pattern_batch[..., None], pattern_head[..., None], safe[None, None, :, None], slots
        ]
        indices = torch.where(slots < counts[..., None], indices.long(), n_kv)  # unused slots: the spare block
        # Which KV blocks each query block keeps, then their union per group (ascending).
        member = torch.zeros((*indices.shape[:3], n_kv + 1), dtype=torch.bool, device=device)
        member.scatter_(-1, indices, True)
        member[..., n_kv] = False
        member = member.view(*member.shape[:2], len(groups), group, n_kv + 1)
        union = member.any(3)  # (B, h, c, n_kv + 1)
        union_counts = union.sum(-1)
        width = max(int(union_counts.max()), 1)
        union_index = torch.sort((~union).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
        used = torch.arange(width, device=device) < union_counts[..., None]
        union_index = torch.where(used, union_index, n_kv)
        expanded = union_index[:, :, :, None, :].expand(*union_index.shape[:3], group, width)
        row_keep = torch.gather(member, -1, expanded).repeat_interleave(block_q, dim=3)  # (B, h, c, rows, U)
        rows_pos = offset + groups[:, None] * rows_per_group + row_in_group  # (c, rows)
        query_pos = rows_pos if causal else None
        chunk = (q_groups[:, heads, groups], k_blocks, v_blocks, batch_index[..., None], kv_head[..., None])
        chunk += (union_index, used, query_pos, seq_k, scale, compute_dtype, rule, rows_pos, row_keep)
        rows = slice(first * rows_per_group, (first + len(groups)) * rows_per_group)
        _attend_and_store(chunk, (q, k, v), out, lse_out, heads, rows)
    return _trimmed(out, lse_out, seq_q, return_lse)


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend cannot differentiate this case, or ``None``: autograd differentiates it
    directly, one chunk of query blocks at a time (see :func:`forward`)."""
    return None
