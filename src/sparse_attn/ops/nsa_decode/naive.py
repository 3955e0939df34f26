"""One NSA decode step in dense PyTorch operations: the reference, the CPU path and the differentiable path.

The rule is :mod:`sparse_attn.ops.nsa_decode`'s (module docstring there). Per GQA group the
query rows are multiplied with the visible compressed keys, the selected blocks' keys gathered
(``top_n * l'`` per KV head) and the last ``w`` keys, with float32 scores and softmax (float64
for float64 inputs). On CUDA, with 16-bit inputs and no gradient to record, the keys, values and
compressed tokens go to the tensor cores as they are with float32 products
(``torch.bmm(..., out_dtype=)``) and the compressed branch's output comes from SDPA (flash
first: its decode kernels split the long reduction); elsewhere both operands are converted to
the working precision first. Differentiable in every tensor input except through the discrete
choice of blocks.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..compressed_scores.naive import spread_to_blocks, visible_count

__all__ = ["nsa_decode_step_reference", "selection_size"]

_DECODE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
_BMM_FLOAT32_OUT = hasattr(torch.ops.aten.bmm, "dtype")  # torch.bmm(..., out_dtype=) on CUDA


def selection_size(seq_k: int, visible: int, select_block: int, top_n: int) -> int:
    """How many blocks the query at position ``seq_k - 1`` keeps: ``min(top_n, own + 1)`` (``own``
    its block) once it sees a compressed token, else its forced blocks only (the first, the one
    before its own and its own, without repeats)."""
    own = (seq_k - 1) // select_block
    if visible:
        return min(top_n, own + 1)
    return min(top_n, len({0, max(own - 1, 0), own}))


def nsa_decode_step_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *,
    scale: float,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    top_n: int,
    window: int,
) -> torch.Tensor:
    """:func:`sparse_attn.ops.nsa_decode.nsa_decode_step` in PyTorch: same arguments and result.

    Memory: ``O(B * Hkv * (n_cmp + top_n l' + w) * D)``.
    """
    batch, q_heads, _, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group, pos, block = q_heads // kv_heads, seq_k - 1, select_block
    work = torch.promote_types(q.dtype, torch.float32)
    rows = q.reshape(batch, kv_heads, group, dim)
    own = pos // block  # the last block: no block lies past the query
    visible = visible_count(pos, compress_block, compress_stride, k_cmp.shape[2])
    if visible:
        keys, values = k_cmp[:, :, :visible], v_cmp[:, :, :visible]
        probabilities = torch.softmax(_products(rows, keys.transpose(-1, -2), work) * scale, dim=-1)
        if _tensor_cores(rows, keys, work):  # SDPA splits the long reduction over the keys
            with sdpa_kernel(_DECODE_SDPA, set_priority=True):  # cuDNN's decode is slow (benchmarks/decode.py)
                compressed = torch.nn.functional.scaled_dot_product_attention(rows, keys, values, scale=scale)
            compressed = compressed.to(work)
        else:
            compressed = _products(probabilities, values, work)
        per_key, per_block = compress_block // compress_stride, block // compress_stride
        ranking = spread_to_blocks(probabilities.detach().sum(2), per_key, per_block, own + 1)
    else:  # before the first whole compression block: the forced blocks only
        compressed = q.new_zeros(rows.shape, dtype=work)
        ranking = q.new_zeros((batch, kv_heads, own + 1), dtype=torch.float32)
    top_n = selection_size(seq_k, visible, block, top_n)
    # The ranking of causal_top_blocks for one row, specialised (two fills and a sort instead of
    # ranking_scores' masks over all rows: this path is bound by kernel launches): forced blocks
    # (the first, the one before the query's and its own) at +inf, every block up to the query's
    # eligible; a stable descending sort ranks ties to the lower block. Order in the list does not matter.
    ranking[..., 0] = float("inf")
    ranking[..., max(own - 1, 0) :] = float("inf")
    chosen = torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :top_n]
    positions = (chosen[..., None] * block + torch.arange(block, device=q.device)).flatten(2)
    selected_keys = positions.shape[2]
    listed = positions <= pos  # the query's own block is cut at the query
    if window:  # the window's keys after the selected ones, one gather and one product for both
        last = torch.arange(max(0, seq_k - window), seq_k, device=q.device)
        positions = torch.cat([positions, last.expand(batch, kv_heads, -1)], dim=2)
    index = positions.clamp(max=pos)[..., None].expand(-1, -1, -1, dim)
    keys, values = (x.gather(2, index) for x in (k, v))
    logits = (_products(rows, keys.transpose(-1, -2), work) * scale)[:, :, None]  # (B, Hkv, 1, G, N)
    # Branch rows: selected (its listed keys), then window (its keys): (B, Hkv, branches, 1, N).
    masks = [torch.nn.functional.pad(listed, (0, positions.shape[2] - selected_keys))]
    if window:
        masks.append((torch.arange(positions.shape[2], device=q.device) >= selected_keys).expand_as(masks[0]))
    masks = torch.stack(masks, dim=2)[:, :, :, None]
    probabilities = torch.softmax(logits.masked_fill(~masks, float("-inf")), dim=-1)
    branches = _products(probabilities.flatten(2, 3), values, work).view(batch, kv_heads, masks.shape[2], group, dim)
    # (B, Hkv, 3, G, D): compressed, selected, window; gates as prefill computes them.
    branches = torch.cat([compressed[:, :, None], branches], dim=2)
    gates = torch.sigmoid(torch.einsum("bhsd,hdg->bhsg", q, gate_weight.to(q.dtype)) + gate_bias[:, None])
    gates = gates[..., : branches.shape[2]].to(work).reshape(batch, kv_heads, group, -1).transpose(2, 3)
    out = (branches * gates[..., None]).sum(2)
    return out.view(batch, q_heads, 1, dim).to(q.dtype)


def _products(a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """``a @ b`` (batched over the leading dimensions) in ``work`` precision. On CUDA, with ``b`` in
    16 bits and no gradient to record, the tensor cores take ``b`` as it is (``a`` cast to its
    dtype: queries, or probabilities as flash kernels cast them) and write float32
    (``torch.bmm(..., out_dtype=)``), so the cached compressed keys and values are read once in
    16 bits, not copied to float32 first; elsewhere both operands are converted to ``work``."""
    if not _tensor_cores(a, b, work):
        return a.to(work) @ b.to(work)
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = a.to(b.dtype).expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:])
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
    return out.view(*lead, *out.shape[-2:])


def _tensor_cores(a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> bool:
    """Whether :func:`_products` (and the compressed branch, through SDPA) take the 16-bit
    operands as they are: CUDA, 16-bit ``b``, float32 work, no gradient to record."""
    return (
        b.is_cuda
        and b.dtype in (torch.float16, torch.bfloat16)
        and work == torch.float32
        and _BMM_FLOAT32_OUT
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    )
