"""The compensated attention of a :class:`~sparse_attn.compensated_pattern.CompensatedPattern` in plain PyTorch.

The oracle of :mod:`.triton_compensated`, and the path on CPU and for gradients. Two parts:

* the softmax over, per query row, the keys of its exact blocks (causal and bounds rule as in
  :mod:`.reference`) and the pooled keys of its pooled blocks, each pooled score raised by the
  natural log of the number of keys it averages. Pooled K/V at level ``l`` are the means of
  aligned groups of ``2**l`` positions of the whole sequence (the last group: of its real
  positions), computed once per call in the compute dtype; a chunk of (query heads, query
  blocks) gathers its exact blocks and, per level, its pooled blocks, and takes one softmax over
  all of them, so memory is ``O(chunk * block * (max_kv + max_comp))``, never ``O(S^2)``;
* the linear branch (only when the pattern has linear entries and a projection):
  ``O_l = phi(q) H / (phi(q) . z)`` with ``H``, ``z`` the sums over the query block's linear
  entries of the per-block states ``phi(K_j)^T V_j`` and ``phi(K_j)^T 1`` (float32
  ``(B, Hkv, n_kv, D, D)`` and ``(B, Hkv, n_kv, D)`` for this call), summed directly (no
  subtraction from a total, unlike the kernel's short walk); ``O_l = 0`` for a query block
  without linear entries and for a row whose ``phi(q) . z`` is 0 (``relu`` can zero a row).

Arithmetic in float32 (float64 inputs in float64). Differentiable through autograd (the
softmax chunks checkpointed as in :mod:`.reference`). Returns the softmax output in q's dtype,
its log-sum-exp and the unprojected linear output (float32, or ``None``);
:func:`sparse_attn.compensated_pattern.compensated_attention` applies the projection.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..compensated_pattern import LINEAR, CompensatedPattern
from .reference import _blocked, chunks

name = "compensated_reference"

# Upper bound on score elements materialized at once (per chunk of query blocks).
_SCORE_BUDGET = 1 << 22


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """SLA's feature map ``phi`` on the last dimension: ``softmax``, ``elu`` (``elu(x) + 1``) or ``relu``."""
    if feature_map == "softmax":
        return torch.softmax(x, dim=-1)
    if feature_map == "elu":
        return torch.nn.functional.elu(x) + 1.0
    return torch.relu(x)


def pooled(x: torch.Tensor, level: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(B, H, S, D)`` averaged over aligned groups of ``2**level`` positions, in ``dtype``:
    ``(B, H, ceil(S / 2**level), D)``, and the float32 log of each group's number of positions."""
    size = 1 << level
    length = x.shape[2]
    groups = -(-length // size)
    padded = torch.nn.functional.pad(x.to(dtype), (0, 0, 0, groups * size - length))
    counts = torch.full((groups,), float(size), device=x.device)
    counts[-1] = length - (groups - 1) * size
    sums = padded.reshape(*x.shape[:2], groups, size, x.shape[3]).sum(3)
    return sums / counts[:, None].to(dtype), counts.log()


def linear_states(k: torch.Tensor, v: torch.Tensor, block_k: int, feature_map: str, dtype: torch.dtype):
    """Per KV block ``phi(K_j)^T V_j`` ``(B, Hkv, n_kv, D, D)`` and ``phi(K_j)^T 1`` ``(B, Hkv, n_kv, D)``
    in ``dtype`` (positions past the sequence contribute nothing)."""
    n_kv = -(-k.shape[2] // block_k)
    phi = _blocked(feature(k.to(dtype), feature_map), block_k, n_kv)  # zero rows past the end
    values = _blocked(v.to(dtype), block_k, n_kv)
    return torch.matmul(phi.transpose(-1, -2), values), phi.sum(3)


def _softmax_chunk(queries, k_blocks, v_blocks, pooled_blocks, batch_index, kv_head, indices, used, comp, query_pos,
                   seq_k):  # fmt: skip
    """The softmax of one chunk: ``queries`` ``(B, h, c, bq, D)`` (scaled, compute dtype) over the
    exact blocks ``indices`` / ``used`` ``(B, h, c, max_kv)`` (unused slots at the spare zero block)
    and, per level in ``pooled_blocks`` (``{level: (keys, values, log_counts)}``, blocked with a
    spare block), the pooled blocks of ``comp`` = ``(indices, levels, used)``. Returns ``out``
    ``(B, h, c, bq, D)`` and ``lse`` ``(B, h, c, bq)``."""
    block_k = k_blocks.shape[3]
    n_kv = k_blocks.shape[2] - 1
    keys = k_blocks[batch_index, kv_head, indices].flatten(3, 4).to(queries.dtype)
    values = v_blocks[batch_index, kv_head, indices].flatten(3, 4).to(queries.dtype)
    scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, h, c, bq, max_kv * bk)
    key_pos = (indices[..., None] * block_k + torch.arange(block_k, device=indices.device)).flatten(3, 4)
    visible = (used[..., None].expand(*used.shape, block_k).flatten(3, 4) & (key_pos < seq_k))[..., None, :]
    if query_pos is not None:
        visible = visible & (key_pos[..., None, :] <= query_pos[None, None, :, :, None])
    all_scores = [scores.masked_fill(~visible, float("-inf"))]
    all_values = [values]
    comp_indices, comp_levels, comp_used = comp
    for level, (pooled_keys, pooled_values, log_counts) in pooled_blocks.items():
        chosen = torch.where(comp_used & (comp_levels == level), comp_indices, n_kv)
        level_keys = pooled_keys[batch_index, kv_head, chosen].flatten(3, 4)  # (B, h, c, max_comp * w, D)
        bias = log_counts[chosen].flatten(3, 4)  # -inf at the spare block and past the sequence
        all_scores.append(torch.matmul(queries, level_keys.transpose(-1, -2)) + bias[..., None, :])
        all_values.append(pooled_values[batch_index, kv_head, chosen].flatten(3, 4))
    scores = torch.cat(all_scores, -1)
    # As the reference backend: a row with no visible key gets lse -inf and output 0.
    shift = scores.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isinf(shift), 0.0, shift)
    weights = (scores - shift).exp()
    total = weights.sum(dim=-1, keepdim=True)
    lse = (torch.log(total) + shift).squeeze(-1)
    out = torch.matmul(weights, torch.cat(all_values, -2)) / torch.where(total == 0, 1.0, total)
    return out, lse


def _pooled_blocks(x, level, block_k, n_kv, dtype):
    """Pooled ``x`` at ``level`` as blocks ``(B, H, n_kv + 1, block_k >> level, D)`` (spare last block of zeros)."""
    values, log_counts = pooled(x, level, dtype)
    width = block_k >> level
    blocks = _blocked(values, width, n_kv + 1)
    bias = torch.full(((n_kv + 1) * width,), float("-inf"), device=x.device)
    bias[: log_counts.numel()] = log_counts
    return blocks, bias.to(dtype).view(n_kv + 1, width)


def forward(q, k, v, pattern: CompensatedPattern, *, causal: bool, scale: float, return_lse: bool = False):
    """``(out, lse, linear)``: the softmax output ``(B, Hq, Sq, D)`` in q's dtype, its float32 lse
    ``(B, Hq, Sq)`` (``None`` unless ``return_lse``) and the float32 unprojected linear output
    ``(B, Hq, Sq, D)`` (``None`` when the pattern has no linear entry or no projection)."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_q, block_k = pattern.block_q, pattern.block_k
    n_q, n_kv, max_kv, max_comp = pattern.num_q_blocks, pattern.num_kv_blocks, pattern.max_kv, pattern.max_comp
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))

    k_blocks = _blocked(k, block_k, n_kv + 1)
    v_blocks = _blocked(v, block_k, n_kv + 1)
    q_blocks = _blocked(q, block_q, n_q)
    pooled_blocks = {}
    for level in pattern.pooled_levels():
        keys, bias = _pooled_blocks(k, level, block_k, n_kv, dtype)
        values, _ = _pooled_blocks(v, level, block_k, n_kv, dtype)
        pooled_blocks[level] = (keys, values, bias)
    out = q.new_empty((batch, q_heads, n_q * block_q, dim))
    lse_out = torch.empty((batch, q_heads, n_q * block_q), dtype=torch.float32, device=q.device)

    offset = seq_k - seq_q
    slots, comp_slots = torch.arange(max_kv, device=q.device), torch.arange(max_comp, device=q.device)
    row_in_block = torch.arange(block_q, device=q.device)
    batch_index = torch.arange(batch, device=q.device)[:, None, None]
    pattern_batch = batch_index if pattern.batch == batch else torch.zeros_like(batch_index)
    per_head_block = batch * (max_kv + max_comp) * block_k * (block_q + 2 * dim)
    for heads, pattern_head, kv_head, blocks, first, counts in chunks(
        pattern, batch_index, pattern_batch, q_heads, kv_heads, per_head_block, _SCORE_BUDGET
    ):
        where = (pattern_batch[..., None], pattern_head[..., None], blocks[None, None, :, None])
        used = slots < counts[..., None]
        indices = torch.where(used, pattern.kv_indices[(*where, slots)], n_kv).long()
        comp_used = comp_slots < pattern.comp_counts[pattern_batch, pattern_head, blocks[None, None, :]][..., None]
        comp = (pattern.comp_indices[(*where, comp_slots)].long(), pattern.comp_levels[(*where, comp_slots)], comp_used)
        query_pos = offset + blocks[:, None] * block_q + row_in_block if causal else None
        chunk = (q_blocks[:, heads, blocks].to(dtype) * scale, k_blocks, v_blocks, pooled_blocks)
        chunk += (batch_index[..., None], kv_head[..., None], indices, used, comp, query_pos, seq_k)
        if needs_grad:
            chunk_out, lse = checkpoint(_softmax_chunk, *chunk, use_reentrant=False)
        else:
            chunk_out, lse = _softmax_chunk(*chunk)
        rows = slice(first * block_q, (first + len(blocks)) * block_q)
        out[:, heads, rows] = chunk_out.flatten(2, 3).to(q.dtype)
        lse_out[:, heads, rows] = lse.flatten(2, 3).float()
    linear = None
    if pattern.projection is not None and pattern.has_linear():
        linear = _linear_branch(q, k, v, pattern, dtype)
    return out[:, :, :seq_q], (lse_out[:, :, :seq_q] if return_lse else None), linear


def _linear_branch(q, k, v, pattern: CompensatedPattern, dtype) -> torch.Tensor:
    """Float32 ``(B, Hq, Sq, D)``: the unprojected linear attention over each query block's linear entries."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads = k.shape[1]
    block_q, n_q, n_kv, max_comp = pattern.block_q, pattern.num_q_blocks, pattern.num_kv_blocks, pattern.max_comp
    states, sums = linear_states(k, v, pattern.block_k, pattern.feature_map, dtype)
    phi_q = _blocked(feature(q.to(dtype), pattern.feature_map), block_q, n_q)
    linear = torch.empty((batch, q_heads, n_q * block_q, dim), dtype=torch.float32, device=q.device)
    batch_index = torch.arange(batch, device=q.device)[:, None, None]
    pattern_batch = batch_index if pattern.batch == batch else torch.zeros_like(batch_index)
    comp_slots = torch.arange(max_comp, device=q.device)
    per_head_block = batch * (max_comp + n_kv + dim * dim + block_q * dim)
    for heads, pattern_head, kv_head, blocks, first, _ in chunks(
        pattern, batch_index, pattern_batch, q_heads, kv_heads, per_head_block, _SCORE_BUDGET
    ):
        where = (pattern_batch[..., None], pattern_head[..., None], blocks[None, None, :, None], comp_slots)
        count = pattern.comp_counts[pattern_batch, pattern_head, blocks[None, None, :]]
        chosen = (comp_slots < count[..., None]) & (pattern.comp_levels[where] == LINEAR)
        columns = torch.where(chosen, pattern.comp_indices[where].long(), n_kv)
        selected = torch.zeros((*chosen.shape[:3], n_kv + 1), dtype=dtype, device=q.device)
        selected = selected.scatter(-1, columns, chosen.to(dtype))[..., :n_kv]  # (B, h, c, n_kv)
        rows = slice(first * block_q, (first + len(blocks)) * block_q)
        for position, head in enumerate(range(heads.start, heads.stop)):
            kv = int(kv_head[0, position, 0])
            state = torch.matmul(selected[:, position], states[:, kv].flatten(2)).view(batch, -1, dim, dim)
            total = torch.matmul(selected[:, position], sums[:, kv])  # (B, c, D)
            phi = phi_q[:, head, blocks]  # (B, c, bq, D)
            numerator = torch.matmul(phi, state)
            denominator = (phi * total[:, :, None, :]).sum(-1, keepdim=True)
            # No linear entry, or phi(q) . z = 0 (relu can zero a row): output 0.
            defined = chosen[:, position].any(-1)[:, :, None, None] & (denominator != 0)
            result = torch.where(defined, numerator / torch.where(defined, denominator, 1.0), 0.0)
            linear[:, head, rows] = result.flatten(1, 2).float()
    return linear[:, :, :seq_q]


def unsupported_reason(q, k, v, pattern, *, return_lse: bool) -> str | None:
    """Always ``None``: the reference runs every case."""
    return None


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """``None``: autograd differentiates it directly."""
    return None
