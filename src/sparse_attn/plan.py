"""`BlockSparsePlan`: what every backend precomputes about a pattern, built once per (pattern, causal).

A pattern says *which* KV blocks each query block computes; its plan says *how*, in the terms
the kernels need (FlashInfer's plan/run split, FlexAttention's full/partial block lists):

* ``full_counts`` int32 ``(B, H, n_q_blocks)``, same shape as the pattern's ``kv_counts``: how
  many leading entries of each list are *full* blocks, which every query row of the block sees
  in full (:func:`sparse_attn.geometry.fully_visible_entries`, the one full-block rule), so
  a kernel computes them without any mask. The remaining ``kv_counts - full_counts`` entries
  are *partial*: the token-level rule (causal, sequence bounds) applies inside them. The rule
  is closed downwards (if block ``j`` is full, so is every block before it) and lists are
  sorted, so the full entries always lead.
* ``work_order`` int32 ``(n_q_blocks,)``: the query blocks heaviest first (most kept blocks
  summed over batch and heads; ties go to the later block, whose causal rows are longer). The
  Triton and Gluon kernels take query blocks in this order, so the longest programs start
  first and the short ones fill the tail of the grid.
* ``work_bucket``: ``ceil(log2)`` of the mean number of kept blocks per query block, the
  autotuning key (and the Gluon dispatch rule) that keeps dense and sparse cases apart.
  Computed on first use (one host sync).
* ``density``: the pattern's density in this mode, for dispatch rules. Computed on first use.
* ``transposed``: per KV block, the query blocks whose lists hold it (``q_counts`` and
  ``q_indices``, int32, ascending), as the backward pass walks K/V blocks. Built on first use.

:func:`plan_for` caches the plan on the pattern, so repeated calls with one pattern plan once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .geometry import fully_visible_entries
from .pattern import BlockSparsePattern

__all__ = ["BlockSparsePlan", "TransposedLists", "plan_for"]


@dataclass(frozen=True)
class TransposedLists:
    """Per (batch, head, KV block), the sorted query blocks whose lists hold that KV block.

    ``q_counts`` int32 ``(B, H, n_kv_blocks)`` (zero where no query block keeps the KV block),
    ``q_indices`` int32 ``(B, H, n_kv_blocks, max_q)``, ascending; entries at or past the count
    are padding (zero). ``B`` and ``H`` are the pattern's.
    """

    q_counts: torch.Tensor
    q_indices: torch.Tensor


@dataclass(frozen=True, eq=False)
class BlockSparsePlan:
    """The plan of one pattern in one mode (see the module docstring). Build with :func:`plan_for`."""

    pattern: BlockSparsePattern
    causal: bool
    full_counts: torch.Tensor
    work_order: torch.Tensor

    @property
    def partial_counts(self) -> torch.Tensor:
        """int32 ``(B, H, n_q_blocks)``: list entries after the full ones, computed with the token-level mask."""
        return self.pattern.kv_counts - self.full_counts

    @functools.cached_property
    def work_bucket(self) -> int:
        mean_blocks = float(self.pattern.kv_counts.float().mean())
        return max(math.ceil(mean_blocks) - 1, 1).bit_length()

    @functools.cached_property
    def density(self) -> float:
        """The pattern's density in this mode (:meth:`BlockSparsePattern.density`; one host sync)."""
        return self.pattern.density(causal=self.causal)

    @functools.cached_property
    def transposed(self) -> TransposedLists:
        return _transpose(self.pattern)


def plan_for(pattern: BlockSparsePattern, *, causal: bool) -> BlockSparsePlan:
    """The plan of ``pattern`` in this mode, built on first request and cached on the pattern."""
    key = ("block_sparse_plan", bool(causal))
    plan = pattern.cached_plan(key)
    if plan is None:
        plan = pattern.store_plan(key, _build(pattern, bool(causal)))
    return plan


def _build(pattern: BlockSparsePattern, causal: bool) -> BlockSparsePlan:
    device = pattern.device
    slots = torch.arange(pattern.max_kv, device=device)
    used = slots < pattern.kv_counts[..., None]
    safe_indices = torch.where(used, pattern.kv_indices, 0).long()
    # The full-block rule per list entry (O(kept entries), no (n_q, n_kv) table).
    is_full = (
        fully_visible_entries(
            safe_indices, pattern.seq_q, pattern.seq_k, pattern.block_q, pattern.block_k, causal=causal
        )
        & used
    )
    # Kernels share one offset computation for counts and full counts: both contiguous, same shape.
    full_counts = is_full.sum(-1, dtype=torch.int32).contiguous()

    work = pattern.kv_counts.sum((0, 1), dtype=torch.int64)
    latest_first = torch.arange(pattern.num_q_blocks - 1, -1, -1, device=device)
    # A stable sort of the reversed totals keeps later blocks first among equals.
    order = torch.sort(work.flip(0), descending=True, stable=True).indices
    work_order = latest_first[order].to(torch.int32).contiguous()
    return BlockSparsePlan(pattern=pattern, causal=causal, full_counts=full_counts, work_order=work_order)


def _transpose(pattern: BlockSparsePattern) -> TransposedLists:
    batch, heads, _, max_kv = pattern.kv_indices.shape
    n_kv = pattern.num_kv_blocks
    device = pattern.device
    used = torch.arange(max_kv, device=device) < pattern.kv_counts[..., None]
    # Kept entries in row-major order: ascending (batch, head, query block) within each list.
    b, h, q_block, slot = used.nonzero(as_tuple=True)
    kv_block = pattern.kv_indices[b, h, q_block, slot].long()
    group = (b * heads + h) * n_kv + kv_block
    # A stable sort by (batch, head, KV block) keeps the query blocks of each group ascending.
    order = torch.sort(group, stable=True).indices
    group, q_block = group[order], q_block[order]
    counts = torch.bincount(group, minlength=batch * heads * n_kv)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(group.numel(), device=device) - starts[group]
    max_q = max(int(counts.max()) if counts.numel() else 0, 1)
    indices = torch.zeros((batch * heads * n_kv, max_q), dtype=torch.int32, device=device)
    indices[group, position] = q_block.to(torch.int32)
    return TransposedLists(
        q_counts=counts.to(torch.int32).view(batch, heads, n_kv).contiguous(),
        q_indices=indices.view(batch, heads, n_kv, max_q),
    )
