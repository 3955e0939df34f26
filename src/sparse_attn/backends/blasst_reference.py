"""The BLASST skip rule in plain PyTorch: the oracle for :mod:`.triton_blasst`, and its CPU / autograd path.

For a :class:`~sparse_attn.skip_pattern.SkipThresholdPattern` with threshold ``λ``, each query
block of each (batch, query head) walks its candidate KV blocks in the visiting order of
:func:`sparse_attn.skip_pattern.visiting_order` (partial entries first, then the full ones
ascending) with the online softmax, keeping per row ``r`` the running maximum ``m[r]`` of its
scaled scores over the blocks computed so far (``-inf`` before any), the running sum and the
running output. For each candidate block ``j`` (scaled scores ``s = scale * q·k`` with the
causal and bounds rule applied as ``-inf``) and each row ``r``, with ``b[r] = max_c s[r, c]``:

* the row *allows skipping* when ``b[r] < m[r] + ln λ`` (strict), or ``b[r] = -inf`` (the row
  sees no key of the block), or ``r`` lies past the last query (the tail of the last query block);
* the block is skipped when every row of the query block allows it, and computed otherwise:
  then every row's ``m``, sum and output take the whole block, exactly as in FlashAttention.

``λ = 0`` (``ln λ = -inf``) never skips a candidate of a valid pattern. A row whose running
maximum is still ``-inf`` allows skipping only a block it sees nothing of, so every row
computes its first block with a visible key and no output row is empty. A NaN block maximum
does not allow skipping (the comparison is false), so non-finite inputs reach the output as
on the other backends.

Scores and the softmax run in float32 (float64 inputs in float64), a chunk of (heads, query
blocks) at a time and one visiting step at a time, so memory is ``O(chunk * block_q * block_k)``,
never ``O(S^2)``. Differentiable through autograd (each chunk checkpointed): skipped blocks get
no gradient; the skip decisions are discrete and get none either.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..plan import plan_for
from ..skip_pattern import SkipThresholdPattern, visiting_order
from .reference import _blocked, chunks, walked_blocks

name = "blasst_reference"

# Upper bound on score elements of one visiting step of one chunk.
_SCORE_BUDGET = 1 << 20


def _walk_chunk(queries, k_blocks, v_blocks, batch_index, kv_head, visit, used, rows_pos, rows_valid, seq_k, options):
    """The skip rule over one chunk: ``queries`` ``(B, h, c, bq, D)`` (already scaled, compute
    dtype), ``visit`` / ``used`` ``(B, h, c, steps)`` the KV block of each visiting step (spare
    zero block where unused) and whether the step is a candidate, ``rows_pos`` ``(c, bq)``
    absolute positions, ``rows_valid`` ``(c, bq)`` rows before the end. ``options``:
    ``(causal, log_threshold, skip)``. Returns ``out`` ``(B, h, c, bq, D)``, ``lse`` and
    ``computed`` ``(B, h, c)``."""
    causal, log_threshold, skip = options
    block_k = k_blocks.shape[3]
    shape = queries.shape[:-1]
    running_max = queries.new_full(shape, float("-inf"))
    total = queries.new_zeros(shape)
    acc = torch.zeros_like(queries)
    computed = torch.zeros(shape[:-1], dtype=torch.int32, device=queries.device)
    key_offsets = torch.arange(block_k, device=queries.device)
    for step in range(visit.shape[-1]):
        blocks, candidate = visit[..., step], used[..., step]
        keys = k_blocks[batch_index, kv_head, blocks].to(queries.dtype)  # (B, h, c, bk, D)
        values = v_blocks[batch_index, kv_head, blocks].to(queries.dtype)
        scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, h, c, bq, bk)
        key_pos = blocks[..., None] * block_k + key_offsets  # (B, h, c, bk)
        visible = (candidate[..., None] & (key_pos < seq_k))[..., None, :]
        if causal:
            visible = visible & (key_pos[..., None, :] <= rows_pos[..., None])
        scores = scores.masked_fill(~visible, float("-inf"))
        block_max = scores.detach().amax(dim=-1)  # (B, h, c, bq)
        if skip:
            allows = (block_max < running_max + log_threshold) | (block_max == float("-inf")) | ~rows_valid
            keep = candidate & ~allows.all(dim=-1)
        else:
            keep = candidate
        keep_rows = keep[..., None]
        new_max = torch.where(keep_rows, torch.maximum(running_max, block_max), running_max)
        # A row that has seen no key keeps m = -inf; its exponents are taken against 0 instead.
        shift = torch.where(new_max == float("-inf"), 0.0, new_max)
        exponents = torch.where(keep_rows[..., None], scores - shift[..., None], float("-inf"))
        weights = exponents.exp()
        alpha = torch.where(keep_rows, (running_max - shift).exp(), 1.0)
        total = total * alpha + weights.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.matmul(weights, values)
        running_max = new_max
        computed = computed + keep.to(torch.int32)
    out = acc / total[..., None]
    lse = running_max + torch.log(total)
    return out, lse, computed


def forward(q, k, v, pattern: SkipThresholdPattern, *, causal: bool, scale: float, return_lse: bool = False):
    """``(out, lse, computed)``: attention over ``pattern``'s candidates with its skip rule.

    Shapes as in :func:`sparse_attn.block_sparse_attention`; ``lse`` float32 ``(B, Hq, Sq)``
    (``None`` unless ``return_lse``), ``computed`` int32 ``(B, Hq, n_q_blocks)``: blocks each
    query block computed (its candidates minus the skipped ones)."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_q, block_k = walked_blocks(pattern, seq_q, seq_k)
    n_q, n_kv, max_kv = pattern.num_q_blocks, pattern.num_kv_blocks, pattern.max_kv
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    threshold = pattern.skip_threshold
    options = (bool(causal), math.log(threshold) if threshold > 0 else float("-inf"), threshold > 0)
    order = visiting_order(pattern.kv_counts, plan_for(pattern, causal=causal).full_counts, max_kv)
    visit_all = torch.gather(pattern.kv_indices.long(), -1, order)

    # K and V get a spare zero block, which non-candidate steps point at.
    k_blocks = _blocked(k, block_k, n_kv + 1)
    v_blocks = _blocked(v, block_k, n_kv + 1)
    q_blocks = _blocked(q, block_q, n_q)
    out = q.new_empty((batch, q_heads, n_q * block_q, dim))
    lse_out = torch.empty((batch, q_heads, n_q * block_q), dtype=torch.float32, device=q.device)
    computed = torch.empty((batch, q_heads, n_q), dtype=torch.int32, device=q.device)

    offset = seq_k - seq_q
    steps = torch.arange(max_kv, device=q.device)
    row_in_block = torch.arange(block_q, device=q.device)
    batch_index = torch.arange(batch, device=q.device)[:, None, None]
    pattern_batch = batch_index if pattern.batch == batch else torch.zeros_like(batch_index)
    per_head_block = batch * block_q * block_k
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))

    for heads, pattern_head, kv_head, blocks, first, counts in chunks(
        pattern, batch_index, pattern_batch, q_heads, kv_heads, per_head_block, _SCORE_BUDGET
    ):
        visit = visit_all[pattern_batch[..., None], pattern_head[..., None], blocks[None, None, :, None], steps]
        used = steps < counts[..., None]
        visit = torch.where(used, visit, n_kv)
        rows = blocks[:, None] * block_q + row_in_block  # (c, bq)
        chunk = (q_blocks[:, heads, blocks].to(compute_dtype) * scale, k_blocks, v_blocks)
        chunk += (batch_index, kv_head, visit, used, rows + offset, rows < seq_q, seq_k, options)
        if needs_grad:
            chunk_out, lse, chunk_computed = checkpoint(_walk_chunk, *chunk, use_reentrant=False)
        else:
            chunk_out, lse, chunk_computed = _walk_chunk(*chunk)
        token_rows = slice(first * block_q, (first + len(blocks)) * block_q)
        out[:, heads, token_rows] = chunk_out.flatten(2, 3).to(q.dtype)
        lse_out[:, heads, token_rows] = lse.flatten(2, 3).float()
        computed[:, heads, first : first + len(blocks)] = chunk_computed
    return out[:, :, :seq_q], (lse_out[:, :, :seq_q] if return_lse else None), computed
