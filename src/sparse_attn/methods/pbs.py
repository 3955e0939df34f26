"""PBS-Attn: permute keys within causal segments so each query block's important keys cluster into few blocks.

Paper: Xinghao Wang, Pengyu Wang, Dong Zhang, Chenkun Tan, Shaojun Zhou, Zhaoxiang Liu,
Shiguo Lian, Fangxu Liu, Kai Song, Xipeng Qiu, "Sparser Block-Sparse Attention via Token
Permutation", 2025, arXiv:2510.21270.

Rule (causal prefill):

1. Cut the keys into segments of ``segment_size`` tokens. Within every complete segment, sort
   the keys (and values) by their attention from the last query block: the softmax of the last
   ``block_size`` queries against all keys, averaged over those queries (here also over the
   query heads of a GQA group, since keys are shared). A trailing partial segment keeps its
   order. Queries are not permuted.
2. Each query attends to its own segment densely (token-level causal mask in the original
   order) and to blocks of the permuted earlier segments: per query block, mean-pooled
   query x mean-pooled permuted key block scores, softmaxed over the earlier segments' blocks,
   and the fewest blocks reaching ``threshold`` of that mass are kept, plus the block holding
   the first token (attention sink).

Defaults: ``block_size=128``, ``segment_size=256``, ``threshold=0.9``, ``keep_first_block=True``
(the released configuration).

Why a wrapper and not a registered method: a permuted key block holds keys from all over its
segment, so the keys a query block attends to are not whole blocks of the original order; a
:class:`~sparse_attn.pattern.BlockSparsePattern` over the original order could express them
only at ``block_k = 1``, an ``O(S^2 / block)`` list. Instead :func:`pbs_attention` runs two
block-sparse attentions and merges them exactly by their log-sum-exps:

- own segment, original order, causal: a pattern keeping, per query block, the KV blocks from
  its segment's start to the diagonal;
- earlier segments, permuted order, non-causal: the queries past the first segment against the
  permuted keys, with the selected blocks (all of them lie in earlier segments, wholly in every
  query's past, so no causal mask is needed there).

Every key a query attends to is in exactly one of the two, so ``out = (out_own * exp(lse_own) +
out_far * exp(lse_far)) / (exp(lse_own) + exp(lse_far))`` is attention over their union. It is
differentiable in q, k and v (both calls are; the permutation is data). Choices where the paper
is silent or this engine differs:

- ``Sq < Sk`` (chunked prefill, not in the paper): supported when the query offset
  ``Sk - Sq`` is a multiple of ``block_size`` (query blocks then never straddle a segment);
  otherwise, and for ``causal=False``, the call runs dense attention with one warning.
- An input of at most one segment has nothing to permute: it runs dense causal attention
  (as the released code does).
- GQA: one permutation per KV head, from the mean over its query heads; the block selection is
  per query head.

Operators: :mod:`sparse_attn.ops.last_query_probe` (the sort keys), :mod:`sparse_attn.ops.pooling`
and :mod:`sparse_attn.ops.selection` (block choice), streamed by
:func:`sparse_attn.ops.to_pattern.stream_pattern`; attention by
:func:`sparse_attn.block_sparse_attention` on any backend.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..api import block_sparse_attention
from ..checks import check_attention_inputs, check_bool, check_fraction, check_int
from ..geometry import num_blocks, query_block_positions
from ..ops.last_query_probe import probe_last_queries
from ..ops.pooling import PooledBlocks, block_softmax
from ..ops.selection import cumulative_mass_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern, dense_pattern

__all__ = ["PbsInfo", "pbs_attention", "segment_permutation"]


@dataclass(frozen=True)
class PbsInfo:
    """What :func:`pbs_attention` computed.

    ``own``: the own-segment pattern (original order, causal); ``far``: the permuted-order
    pattern of the queries from row ``first_far_row`` on (None when no query has an earlier
    segment); ``permutation`` int64 ``(B, Hkv, Sk)``: permuted position -> original key index;
    ``density``: computed blocks of both over the causally valid blocks of the call.
    """

    own: BlockSparsePattern
    far: BlockSparsePattern | None
    permutation: torch.Tensor
    first_far_row: int
    density: float


def segment_permutation(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, segment_size: int, scale: float
) -> torch.Tensor:
    """Int64 ``(B, Hkv, Sk)``: for each permuted position, the original index of the key placed there.

    Within each complete segment the keys are sorted by descending attention from the last
    ``block_size`` queries (stable: ties keep their order); a trailing partial segment is not
    permuted.
    """
    batch, kv_heads, seq_k, _ = k.shape
    group = q.shape[1] // kv_heads
    probe = probe_last_queries(q, k, num_queries=block_size, block_k=block_size, scale=scale, causal=True)
    importance = probe.vertical.view(batch, kv_heads, group, seq_k).mean(2)
    whole = (seq_k // segment_size) * segment_size
    order = torch.arange(seq_k, device=k.device).expand(batch, kv_heads, seq_k).clone()
    segments = importance[..., :whole].view(batch, kv_heads, -1, segment_size)
    within = torch.sort(segments, dim=-1, descending=True, stable=True).indices
    starts = torch.arange(0, whole, segment_size, device=k.device)[:, None]
    order[..., :whole] = (within + starts).view(batch, kv_heads, whole)
    return order


def _gather_keys(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, permutation[..., None].expand(*permutation.shape, x.shape[-1]))


def _own_segment_pattern(seq_q: int, seq_k: int, block: int, segment: int, device) -> BlockSparsePattern:
    first, _ = query_block_positions(seq_q, seq_k, block, device)
    segment_start_block = (first // segment) * (segment // block)
    kv_block = torch.arange(num_blocks(seq_k, block), device=device)

    def mask_rows(rows: range) -> torch.Tensor:
        return kv_block[None, :] >= segment_start_block[rows.start : rows.stop, None]

    return stream_pattern(
        mask_rows,
        batch=1,
        heads=1,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block,
        block_k=block,
        causal=True,
        device=device,
        row_elements=2 * num_blocks(seq_k, block),
    )


def _far_pattern(
    q_far: torch.Tensor,
    k_permuted: torch.Tensor,
    permutation: torch.Tensor,
    *,
    seq_k: int,
    block: int,
    segment: int,
    threshold: float,
    keep_first_block: bool,
    scale: float,
) -> BlockSparsePattern:
    """Per query head, the permuted KV blocks of earlier segments each query block of ``q_far`` keeps."""
    batch, q_heads, seq_q, _ = q_far.shape
    group = q_heads // k_permuted.shape[1]
    pooled = PooledBlocks.of(q_far, k_permuted, block_q=block, block_k=block)
    first, _ = query_block_positions(seq_q, seq_k, block, q_far.device)
    kv_segment = torch.arange(num_blocks(seq_k, block), device=q_far.device) * block // segment
    earlier = kv_segment[None, :] < (first // segment)[:, None]
    # The permuted block holding original key 0 (segment 0, so earlier than every far query).
    sink_block = (permutation == 0).int().argmax(-1) // block  # (B, Hkv)
    sink = torch.nn.functional.one_hot(sink_block, kv_segment.numel()).bool().repeat_interleave(group, dim=1)

    def mask_rows(rows: range) -> torch.Tensor:
        allowed = earlier[rows.start : rows.stop]
        logits = pooled.logits(scale=scale, causal=False, q_blocks=rows).masked_fill(~allowed, float("-inf"))
        mask = cumulative_mass_mask(block_softmax(logits), threshold) & allowed
        if keep_first_block:
            mask |= sink[:, :, None, :]
        return mask

    return stream_pattern(
        mask_rows,
        batch=batch,
        heads=q_heads,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block,
        block_k=block,
        causal=False,
        device=q_far.device,
        row_elements=2 * batch * q_heads * kv_segment.numel(),
    )


def _dense(q, k, v, *, causal: bool, scale: float, backend: str, block: int, return_info: bool):
    pattern = dense_pattern(
        seq_q=q.shape[2], seq_k=k.shape[2], block_q=block, block_k=block, causal=causal, device=q.device
    )
    out = block_sparse_attention(q, k, v, pattern, causal=causal, scale=scale, backend=backend)
    if not return_info:
        return out
    identity = torch.arange(k.shape[2], device=k.device).expand(k.shape[0], k.shape[1], -1)
    return out, PbsInfo(own=pattern, far=None, permutation=identity, first_far_row=q.shape[2], density=1.0)


def pbs_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 128,
    segment_size: int = 256,
    threshold: float = 0.9,
    keep_first_block: bool = True,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_info: bool = False,
):
    """Permuted block-sparse attention (see the module docstring); ``(B, Hq, Sq, D)`` in q's dtype.

    q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)`` as in :func:`sparse_attn.sparse_attention`.
    ``segment_size`` must be a multiple of ``block_size``. With ``return_info=True`` returns
    ``(out, PbsInfo)``. Differentiable in q, k and v.
    """
    scale = check_attention_inputs(q, k, v, scale)
    check_int("block_size", block_size)
    check_int("segment_size", segment_size)
    if segment_size % block_size != 0:
        raise ValueError(f"segment_size ({segment_size}) must be a multiple of block_size ({block_size})")
    check_fraction("threshold", threshold)
    check_bool("keep_first_block", keep_first_block)
    seq_q, seq_k = q.shape[2], k.shape[2]
    offset = seq_k - seq_q
    dense = dict(causal=bool(causal), scale=scale, backend=backend, block=block_size, return_info=return_info)
    if not causal or offset % block_size != 0:
        why = "causal=False" if not causal else f"the query offset Sk - Sq = {offset} is not a multiple of block_size"
        warnings.warn(f"pbs_attention runs dense attention: {why} (not supported by the permutation)", stacklevel=2)
        return _dense(q, k, v, **dense)
    if seq_k <= segment_size:
        return _dense(q, k, v, **dense)
    permutation = segment_permutation(q, k, block_size=block_size, segment_size=segment_size, scale=scale)
    own = _own_segment_pattern(seq_q, seq_k, block_size, segment_size, q.device)
    out_own, lse_own = block_sparse_attention(q, k, v, own, scale=scale, backend=backend, return_lse=True)
    first_far_row = max(0, segment_size - offset)
    far = None
    out = out_own
    if first_far_row < seq_q:
        q_far = q[:, :, first_far_row:]
        k_permuted, v_permuted = _gather_keys(k, permutation), _gather_keys(v, permutation)
        far = _far_pattern(
            q_far,
            k_permuted,
            permutation,
            seq_k=seq_k,
            block=block_size,
            segment=segment_size,
            threshold=threshold,
            keep_first_block=keep_first_block,
            scale=scale,
        )
        out_far, lse_far = block_sparse_attention(
            q_far, k_permuted, v_permuted, far, causal=False, scale=scale, backend=backend, return_lse=True
        )
        lse_near = lse_own[:, :, first_far_row:]
        lse = torch.logaddexp(lse_near, lse_far)
        merged = out_own[:, :, first_far_row:].float() * torch.exp(lse_near - lse)[..., None]
        merged = merged + out_far.float() * torch.exp(lse_far - lse)[..., None]
        out = torch.cat([out_own[:, :, :first_far_row], merged.to(q.dtype)], dim=2)
    if not return_info:
        return out
    valid = dense_pattern(seq_q=seq_q, seq_k=seq_k, block_q=block_size, block_k=block_size, device=q.device)
    computed = own.kv_counts.sum(dtype=torch.int64) * q.shape[0] * q.shape[1]
    if far is not None:
        computed = computed + far.kv_counts.sum(dtype=torch.int64) * (q.shape[0] // far.batch)
    density = float(computed) / float(valid.kv_counts.sum(dtype=torch.int64) * q.shape[0] * q.shape[1])
    return out, PbsInfo(own=own, far=far, permutation=permutation, first_far_row=first_far_row, density=density)
