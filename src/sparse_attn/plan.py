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
  Triton and Gluon kernels take query blocks in this order within each wave of heads
  (:func:`sparse_attn.backends.launch.heads_per_wave`), so the longest programs start first
  and the short ones fill the tail, after the heavy blocks of every head (``heavy_blocks``);
  the Triton backward's dQ pass too.
* ``work_bucket``: ``ceil(log2)`` of the mean number of kept blocks per query block, the
  autotuning key (and the Gluon dispatch rule) that keeps dense and sparse cases apart.
  Computed on first use (one host sync).
* ``heavy_blocks``: how many query blocks lead the work order with more than
  :data:`HEAVY_ROW_RATIO` times the mean kept blocks (summed over batch and heads), e.g. the
  rows of text tokens that attend a whole video; the kernels issue them for every head before
  their waves (:func:`sparse_attn.backends.launch.lead_blocks`). Computed on first use (one host sync).
* ``row_imbalance``: the most kept blocks of a query block over the mean, for the Gluon
  kernel's choice of a persistent launch. Computed on first use (one host sync).
* ``density``: the pattern's density in this mode, for dispatch rules. Computed on first use.
* ``transposed``: per KV block, the query blocks whose lists hold it (``q_counts`` and
  ``q_indices``, int32, ascending), as the backward pass walks K/V blocks, and the KV blocks
  heaviest first (``work_order``). Built on first use. ``heavy_kv_blocks``: how many KV blocks
  lead that order with more than :data:`HEAVY_ROW_RATIO` times the mean (the text tokens' keys,
  which every video query sees); one host sync, on first use.
  For a pattern with a token rule it also carries each entry's ``rule_index`` (below).
* ``rule_lists`` (patterns with a token rule, :class:`~sparse_attn.masked_pattern.MaskedPattern`;
  ``None`` otherwise): the token rule inside the partial entries as per-block bitmasks the
  kernels read, and the lists reordered so the entries every row sees whole lead (see
  :class:`RuleLists`). Built on first use.
* ``predicate_lists`` (patterns whose token rule offers a box predicate,
  :mod:`sparse_attn.rule_predicate`; ``None`` otherwise): the same reordered lists without any
  bitmask; the forward kernels evaluate the predicate arithmetically from three int32 values per
  token (:class:`PredicateLists`). Built on first use. The backward kernels evaluate it too,
  on the entries it cuts only (``transposed.rule_index`` and :func:`box_cut_index` mark them).

Token-rule bitmasks (:func:`rule_bitmask`, cached on the pattern: they do not depend on the
mode). ``token_rule.allowed`` is evaluated only on the entries ``rule_partial`` marks (a chunk
of entries at a time), and each entry's ``(block_q, block_k)`` mask is packed into int32 words:
``block_q`` rows of ``ceil(block_k / 32)`` words, key ``c`` of the block in bit ``c % 32`` of
word ``c // 32``. Memory is ``4 * block_q * ceil(block_k / 32)`` bytes per partial entry (the
packed mask; ``block_k = 16`` leaves half of each word unused), plus one int32 per list entry
naming its mask (``-1``: the rule does not cut the entry), never anything ``O(S^2)``. The
kernels load that one index beside each KV block number and, for indices ``>= 0``, the words,
applying the mask as ``-inf`` scores where they apply the causal and bounds masks.

:func:`plan_for` caches the plan on the pattern, so repeated calls with one pattern plan once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .geometry import fully_visible_entries
from .masked_pattern import token_rule_of
from .pattern import BlockSparsePattern
from .rule_predicate import GROUP, BoxPredicate, kernel_predicate
from .utils import bin_counts

__all__ = [
    "BlockSparsePlan",
    "box_cut_index",
    "PredicateLists",
    "RuleBitmask",
    "RuleLists",
    "TransposedLists",
    "plan_for",
    "rule_bitmask",
]

# A query block whose kept blocks (summed over batch and heads) exceed this many times the mean
# is heavy (BlockSparsePlan.heavy_blocks). Random causal patterns stay below it (their longest
# rows keep about twice the mean).
HEAVY_ROW_RATIO = 4.0

# Upper bound on (query, key) pairs of one chunk of partial entries when the token rule is evaluated.
_RULE_PAIRS_PER_CHUNK = 1 << 21


@dataclass(frozen=True)
class TransposedLists:
    """Per (batch, head, KV block), the sorted query blocks whose lists hold that KV block.

    ``q_counts`` int32 ``(B, H, n_kv_blocks)`` (zero where no query block keeps the KV block),
    ``q_indices`` int32 ``(B, H, n_kv_blocks, max_q)``, ascending; entries at or past the count
    are padding (zero). ``B`` and ``H`` are the pattern's. ``rule_index`` int32, ``q_indices``'
    shape, for a pattern with a token rule: each entry's row of :attr:`RuleBitmask.words`
    (``-1``: whole for the rule, and padding), or for a rule the kernels evaluate as a box
    predicate ``0`` where the rule cuts the entry (:func:`box_cut_index`); ``None`` for other
    patterns. ``work_order`` int32
    ``(n_kv_blocks,)``: the KV blocks heaviest first (most query blocks summed over batch and
    heads; ties go to the earlier block, whose causal columns are longer), the order of the
    backward's dK/dV programs.
    """

    q_counts: torch.Tensor
    q_indices: torch.Tensor
    work_order: torch.Tensor
    rule_index: torch.Tensor | None = None


@dataclass(frozen=True)
class RuleBitmask:
    """A pattern's token rule inside its partial entries, packed (see the module docstring).

    ``entry_index`` int32, ``kv_indices``' shape: for each list entry the row of ``words`` that
    holds its mask, ``-1`` where the rule does not cut the entry (and in unused slots).
    ``words`` int32 ``(n_partial, block_q, ceil(block_k / 32))`` (one unused zero row when
    ``n_partial`` is 0): bit ``c % 32`` of
    ``words[e, r, c // 32]`` is set when query ``r`` and key ``c`` of entry ``e``'s block pair are
    allowed by the rule (positions past the sequence included: the kernels' bounds masks hide them).
    """

    entry_index: torch.Tensor
    words: torch.Tensor


@dataclass(frozen=True)
class RuleLists:
    """The lists of a pattern with a token rule as the block kernels' forward walks them.

    ``kv_indices`` int32 ``(B, H, n_q_blocks, max_kv)``: each list reordered so that its *whole*
    entries lead (full under the causal / bounds rule and not cut by the token rule; ascending),
    then the others (ascending); ``full_counts`` int32 ``(B, H, n_q_blocks)``: how many whole
    entries lead, which the kernel computes without any mask; ``rule_index`` int32, the lists'
    shape: each entry's row of ``words`` (``-1``: the rule does not cut it); ``words``: the packed
    masks (:class:`RuleBitmask`). Entries are reordered because a rule-cut entry may sit anywhere
    in a sorted list, while the kernel splits each list into one unmasked and one masked run;
    the softmax does not depend on the order of its blocks.
    """

    kv_indices: torch.Tensor
    full_counts: torch.Tensor
    rule_index: torch.Tensor
    words: torch.Tensor


@dataclass(frozen=True)
class PredicateLists:
    """The lists of a pattern whose token rule is a box predicate, as the kernels' forward walks them:
    ``kv_indices`` and ``full_counts`` as in :class:`RuleLists` (whole entries first), and the
    :class:`~sparse_attn.rule_predicate.BoxPredicate` the masked run evaluates on every entry."""

    kv_indices: torch.Tensor
    full_counts: torch.Tensor
    predicate: BoxPredicate


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
    def heavy_blocks(self) -> int:
        """How many query blocks lead :attr:`work_order` with more than :data:`HEAVY_ROW_RATIO`
        times the mean kept blocks, summed over batch and heads (0 for an empty pattern). One
        host sync, on first use."""
        return _heavy(self.pattern.kv_counts)

    @functools.cached_property
    def heavy_kv_blocks(self) -> int:
        """How many KV blocks lead :attr:`TransposedLists.work_order` with more than
        :data:`HEAVY_ROW_RATIO` times the mean number of query blocks that keep them, summed over
        batch and heads. One host sync, on first use."""
        return _heavy(self.transposed.q_counts)

    @functools.cached_property
    def row_imbalance(self) -> float:
        """The most kept blocks of any query block over the mean (1 for equal rows, about 2 for a
        causal pattern of one density, far more where a few rows are dense, e.g. text tokens that
        attend a whole video). One host sync, on first use; 1 for an empty pattern."""
        counts = self.pattern.kv_counts.float()
        peak, mean = torch.stack((counts.max(), counts.mean())).tolist()
        return peak / mean if mean > 0 else 1.0

    @functools.cached_property
    def density(self) -> float:
        """The pattern's density in this mode (:meth:`BlockSparsePattern.density`; one host sync)."""
        return self.pattern.density(causal=self.causal)

    @functools.cached_property
    def transposed(self) -> TransposedLists:
        # A rule the kernels evaluate as a box predicate needs no bitmask index per entry, only
        # whether the rule cuts it.
        if kernel_predicate(self.pattern) is not None:
            return _transpose(self.pattern, box_cut_index(self.pattern))
        bitmask = rule_bitmask(self.pattern)
        return _transpose(self.pattern, None if bitmask is None else bitmask.entry_index)

    @functools.cached_property
    def rule_lists(self) -> RuleLists | None:
        """The forward's lists and bitmasks for a pattern with a token rule, else ``None``."""
        bitmask = rule_bitmask(self.pattern)
        if bitmask is None:
            return None
        kv_indices, full_counts, rule_index = _whole_entries_first(
            self.pattern, self.causal, bitmask.entry_index >= 0, bitmask.entry_index
        )
        return RuleLists(kv_indices=kv_indices, full_counts=full_counts, rule_index=rule_index, words=bitmask.words)

    @functools.cached_property
    def predicate_lists(self) -> PredicateLists | None:
        """The forward's lists for a pattern whose token rule the kernels evaluate as a box
        predicate (:mod:`sparse_attn.rule_predicate`), else ``None``. No bitmask is built."""
        predicate = kernel_predicate(self.pattern)
        if predicate is None:
            return None
        used = torch.arange(self.pattern.max_kv, device=self.pattern.device) < self.pattern.kv_counts[..., None]
        cut = self.pattern.rule_partial & used
        kv_indices, full_counts, _ = _whole_entries_first(self.pattern, self.causal, cut, None)
        return PredicateLists(kv_indices=kv_indices, full_counts=full_counts, predicate=predicate)


def unseen_steps(plan: BlockSparsePlan, *, block_n: int = 128) -> tuple[int, int]:
    """``(unseen, taken)``: of the (64 query rows, ``block_n`` keys) steps the Gluon forward's
    warpgroups take over the cut entries of ``plan``'s box-predicate lists, how many the
    predicate's group summaries rule out (:func:`sparse_attn.rule_predicate.groups_may_see`;
    those steps run no ``Q K^T`` and no softmax), and how many there are. ``(0, 0)`` without a
    box predicate. Needs ``block_q`` a multiple of 64 and ``block_k`` of ``block_n``."""
    lists = plan.predicate_lists
    if lists is None:
        return 0, 0
    pattern = plan.pattern
    group = GROUP
    if pattern.block_q % group or pattern.block_k % block_n or block_n % group:
        raise ValueError(f"unseen_steps needs block_q a multiple of 64 and block_k of block_n={block_n}")
    summaries = lists.predicate.groups.long()
    guard = lists.predicate.guard
    device = pattern.device
    halves = pattern.block_q // group
    first_query = (pattern.seq_k - pattern.seq_q) // group
    slots = torch.arange(pattern.max_kv, device=device)
    steps = torch.arange(0, pattern.block_k, block_n, device=device)
    parts = torch.arange(block_n // group, device=device)
    unseen = taken = 0
    # One list and a chunk of its query blocks at a time: memory stays a small multiple of the chunk's lists.
    chunk = 256
    for batch in range(pattern.kv_counts.shape[0]):
        for head in range(pattern.kv_counts.shape[1]):
            for start in range(0, pattern.num_q_blocks, chunk):
                rows = torch.arange(start, min(start + chunk, pattern.num_q_blocks), device=device)
                counts = pattern.kv_counts[batch, head, rows]
                cut = (slots >= lists.full_counts[batch, head, rows, None]) & (slots < counts[:, None])  # (n, max_kv)
                queries = first_query + rows[:, None] * halves + torch.arange(halves, device=device)  # (n, halves)
                blocks = lists.kv_indices[batch, head, rows].long()
                keys = ((blocks[..., None] * pattern.block_k + steps) // group)[..., None] + parts  # (n, max_kv, s, p)
                low = summaries[0][queries].view(len(rows), 1, 1, halves, 1)
                high = (summaries[1][queries] | guard).view(len(rows), 1, 1, halves, 1)
                key_min, key_max = summaries[2][keys][..., None, :], summaries[3][keys][..., None, :]
                meet = ((key_max | guard) - low) & (high - key_min) & guard
                seen = (meet == guard).any(-1)  # (n, max_kv, steps, halves)
                cut = cut[..., None, None].expand_as(seen)
                unseen += int((cut & ~seen).sum())
                taken += int(cut.sum())
    return unseen, taken


def plan_for(pattern: BlockSparsePattern, *, causal: bool) -> BlockSparsePlan:
    """The plan of ``pattern`` in this mode, built on first request and cached on the pattern."""
    key = ("block_sparse_plan", bool(causal))
    plan = pattern.cached_plan(key)
    if plan is None:
        plan = pattern.store_plan(key, _build(pattern, bool(causal)))
    return plan


def box_cut_index(pattern: BlockSparsePattern) -> torch.Tensor:
    """int32, contiguous, ``kv_indices``' shape: ``0`` where the pattern's token rule cuts the
    entry (``rule_partial``), ``-1`` elsewhere; for a rule the backward kernels evaluate as a box
    predicate only on the entries it cuts (:mod:`sparse_attn.backends.triton_backward`). Cached."""
    cut = pattern.cached_plan("box_cut_index")
    if cut is None:
        cut = pattern.store_plan("box_cut_index", torch.where(pattern.rule_partial, 0, -1).to(torch.int32).contiguous())
    return cut


def rule_bitmask(pattern: BlockSparsePattern) -> RuleBitmask | None:
    """The packed token-rule masks of ``pattern``'s partial entries (``None`` without a token
    rule), built on first request and cached on the pattern (see the module docstring)."""
    rule = token_rule_of(pattern)
    if rule is None:
        return None
    bitmask = pattern.cached_plan("rule_bitmask")
    if bitmask is None:
        bitmask = pattern.store_plan("rule_bitmask", _pack_rule(pattern, rule))
    return bitmask


def _pack_rule(pattern: BlockSparsePattern, rule) -> RuleBitmask:
    device = pattern.device
    block_q, block_k = pattern.block_q, pattern.block_k
    used = torch.arange(pattern.max_kv, device=device) < pattern.kv_counts[..., None]
    b, h, q_block, slot = (pattern.rule_partial & used).nonzero(as_tuple=True)
    n_partial = q_block.numel()
    entry_index = torch.full(pattern.kv_indices.shape, -1, dtype=torch.int32, device=device)
    entry_index[b, h, q_block, slot] = torch.arange(n_partial, dtype=torch.int32, device=device)
    kv_block = pattern.kv_indices[b, h, q_block, slot].long()
    # Keys padded to whole words; the padding keys' bits stay clear.
    words_per_row = -(-block_k // 32)
    padded_k = words_per_row * 32
    # One spare row when no entry is cut, so the kernels always get a real pointer (no index names it).
    words = torch.zeros((max(n_partial, 1), block_q, words_per_row), dtype=torch.int32, device=device)
    rows = torch.arange(block_q, device=device)
    keys = torch.arange(block_k, device=device)
    bit_values = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=device), torch.arange(32, device=device)
    )
    offset = pattern.seq_k - pattern.seq_q
    chunk = max(1, _RULE_PAIRS_PER_CHUNK // (block_q * padded_k))
    for start in range(0, n_partial, chunk):
        part = slice(start, start + chunk)
        query_pos = offset + q_block[part, None] * block_q + rows  # (E, block_q), in key positions
        key_pos = kv_block[part, None] * block_k + keys  # (E, block_k)
        allowed = rule.allowed(query_pos[:, :, None], key_pos[:, None, :])  # (E, block_q, block_k)
        allowed = allowed.expand(query_pos.shape[0], block_q, block_k)
        allowed = torch.nn.functional.pad(allowed, (0, padded_k - block_k))
        packed = (allowed.view(-1, block_q, words_per_row, 32).to(torch.int64) * bit_values).sum(-1)
        # Bits 0..31 as an unsigned value; int32 holds the same bits (two's complement).
        words[part] = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return RuleBitmask(entry_index=entry_index, words=words)


def _full_entries(pattern: BlockSparsePattern, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``kv_indices``' shape: the full-block rule per list entry (O(kept entries), no
    ``(n_q, n_kv)`` table), and the used slots."""
    slots = torch.arange(pattern.max_kv, device=pattern.device)
    used = slots < pattern.kv_counts[..., None]
    safe_indices = torch.where(used, pattern.kv_indices, 0).long()
    is_full = fully_visible_entries(
        safe_indices, pattern.seq_q, pattern.seq_k, pattern.block_q, pattern.block_k, causal=causal
    )
    return is_full & used, used


def _whole_entries_first(
    pattern: BlockSparsePattern, causal: bool, cut: torch.Tensor, entry_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(kv_indices, full_counts, entry_index)`` with each list reordered: the entries that are
    full and not ``cut`` by the token rule first, then the others (``entry_index``, if given,
    reordered alike)."""
    is_full, used = _full_entries(pattern, causal)
    whole = is_full & ~cut
    # A stable sort by (not whole, not used) keeps each group ascending: whole, cut, unused.
    rank = (~whole).to(torch.uint8) + (~used).to(torch.uint8)
    order = torch.sort(rank, dim=-1, stable=True).indices
    return (
        torch.gather(pattern.kv_indices, -1, order).to(torch.int32).contiguous(),
        whole.sum(-1, dtype=torch.int32).contiguous(),
        None if entry_index is None else torch.gather(entry_index, -1, order).contiguous(),
    )


def _heavy(counts: torch.Tensor) -> int:
    """How many of the last dimension's blocks of ``counts`` (B, H, n) keep more than
    :data:`HEAVY_ROW_RATIO` times the mean, summed over batch and heads."""
    work = counts.sum((0, 1), dtype=torch.int64).double()
    return int((work > HEAVY_ROW_RATIO * work.mean()).sum())


def _heaviest_first(counts: torch.Tensor, *, later_first: bool) -> torch.Tensor:
    """int32 ``(n,)``: the last dimension's blocks of ``counts`` (B, H, n) by their total over
    batch and heads, largest first; among equals the later block first if ``later_first``, else
    the earlier (stable sorts)."""
    work = counts.sum((0, 1), dtype=torch.int64)
    if not later_first:
        return torch.sort(work, descending=True, stable=True).indices.to(torch.int32).contiguous()
    # A stable sort of the reversed totals keeps later blocks first among equals.
    order = torch.sort(work.flip(0), descending=True, stable=True).indices
    return (work.numel() - 1 - order).to(torch.int32).contiguous()


def _build(pattern: BlockSparsePattern, causal: bool) -> BlockSparsePlan:
    is_full, _ = _full_entries(pattern, causal)
    # Kernels share one offset computation for counts and full counts: both contiguous, same shape.
    full_counts = is_full.sum(-1, dtype=torch.int32).contiguous()

    work_order = _heaviest_first(pattern.kv_counts, later_first=True)
    return BlockSparsePlan(pattern=pattern, causal=causal, full_counts=full_counts, work_order=work_order)


def _transpose(pattern: BlockSparsePattern, entry_index: torch.Tensor | None) -> TransposedLists:
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
    rule_entry = None if entry_index is None else entry_index[b, h, q_block, slot][order]
    group, q_block = group[order], q_block[order]
    counts = bin_counts(group, batch * heads * n_kv)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(group.numel(), device=device) - starts[group]
    max_q = max(int(counts.max()) if counts.numel() else 0, 1)
    indices = torch.zeros((batch * heads * n_kv, max_q), dtype=torch.int32, device=device)
    indices[group, position] = q_block.to(torch.int32)
    rule_index = None
    if rule_entry is not None:
        rule_index = torch.full((batch * heads * n_kv, max_q), -1, dtype=torch.int32, device=device)
        rule_index[group, position] = rule_entry
        rule_index = rule_index.view(batch, heads, n_kv, max_q)
    q_counts = counts.to(torch.int32).view(batch, heads, n_kv).contiguous()
    return TransposedLists(
        q_counts=q_counts,
        q_indices=indices.view(batch, heads, n_kv, max_q),
        work_order=_heaviest_first(q_counts, later_first=False),
        rule_index=rule_index,
    )
