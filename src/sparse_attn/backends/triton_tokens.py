"""Token-granular Triton forward: block-sparse attention for patterns with small query blocks.

The block kernel (:mod:`.triton`) gives one program one query head and ``BLOCK_M >= 16`` rows
of one query block, so it needs ``block_q >= 16``. Token-level selection (NSA, MoBA: one list
per query token, ``block_q = 1``) and small query blocks run here instead, on the ``triton``
backend (:mod:`sparse_attn.backends` routes every pattern with ``block_q < 16`` to this module).

Group-centric packing (NSA's kernel idea). The rows of one ``tl.dot`` tile are the query heads
that share one list and one KV head, times the tokens of a small query tile:

* lists per KV head (``H == Hkv``) or shared (``H == 1``): the ``G = Hq / Hkv`` heads of a GQA
  group share every list, so a program packs ``P`` of them (``P = G`` when ``G * block_q <= 64``,
  else the largest divisor of ``G`` that fits) times ``T`` tokens; each selected KV block is then
  loaded once for the ``P`` heads. With ``block_q = 1`` and ``G = 16`` (NSA's 64/4 heads) a tile
  is 16 heads of one token.
* lists per query head (``H == Hq``, e.g. ``moba``): ``P = 1``; the rows are ``T`` consecutive
  tokens of one head.

``T`` (the query tile, a whole number of query blocks) is chosen so that ``P * T >= 16`` rows
(a ``tl.dot`` needs 16): ``T = block_q * max(1, 16 // (P * block_q))``, padded up to a power of
two; ``kernel_configs(token_rows=R)`` aims at ``R`` rows instead (``T`` up to 16 query blocks). When a tile holds several query blocks, their lists differ: the program walks the sorted
*union* of the tile's lists, and a bitmask per union entry (bit ``i``: the tile's ``i``-th query
block lists it) masks the rows whose own list lacks the block, token by token like the causal
diagonal and the sequence end. A wider tile loads a KV block once for more tokens but computes
the blocks only some of its rows list; 16 rows is the smallest tile (32 rows doubled the time of
NSA's selected branch on the H200: neighbouring tokens shared few blocks). A tile of exactly one
query block (NSA's 16 heads of one token) walks that block's own list, read from the pattern's
``kv_counts`` / ``kv_indices`` as they are (:func:`program_lists`). Wider tiles' union lists, and
the transpose (per KV block, the tiles whose union holds it, with the same bitmask, for the dK/dV
pass of :mod:`.triton_tokens_backward`), are built in compressed-row form in arrays of the
pattern's padded size, so memory is O(listed entries), never O(S^2), and without waiting on the
device (:class:`TokenLists`, cached on the pattern; a forward-only call on one-block tiles builds
none).

Large blocks (``block_k >= 256``, MoBA's 512 and 4096), and one-token lists of ``block_k >= 64``
that no two heads of a tile share (MoBA's lists per query head), take the key-centric
*gathered* path of :mod:`.triton_tokens_gathered` instead
(:func:`~.triton_tokens_gathered.uses_gathered_path`): per KV block, the query rows that list it, gathered
into full tiles, with partial results merged per row. There a block's keys are loaded once per
64 listing rows, whatever the rows' positions, where a query tile here would load it for few
rows or compute it for many rows that do not list it.

Masks inside a block, token by token: the row's list (bitmask), the causal rule (key position
<= query position), the sequence end, and the block end (``block_k`` need not be a multiple of
the key step ``BLOCK_N``, nor a power of two: MoBA's ``block_size`` is any int).

Non-finite values follow :func:`sparse_attn.block_sparse_attention`'s rule exactly: a NaN/Inf
``v[j, d]`` reaches column ``d`` of the rows whose own list keeps ``j``'s block, not the other
rows of the tile. Where a union entry is not listed by every row, the step reads V with
non-finite values replaced by zero and marks column ``d`` NaN in the listing rows (a few
elementwise operations on the V tile, only on such steps). That choice is a branch inside the
key loop, and with it Triton pipelines fewer of the K/V loads of tiles of several query blocks
(compiled for sm_90a with the alignment a launch specializes: 2 asynchronous K/V tile copies in
the 32- and 64-row kernels against 6 in one-block tiles, which never branch).
``kernel_configs(token_wide_steps=...)`` offers two branch-free ways, both with the 6 copies
(checked in the sm_90a code at 32 and 64 rows): ``"masked"`` takes every step of such tiles through the
masked path (the elementwise work on every step); ``"zeroed_v"`` zeroes V's non-finite values
once per call (:func:`zeroed_v`: one pass over V, a V-sized buffer, per-block flags and
columns), takes the plain step everywhere, flags in the loop the rows that list a block with
non-finite values, and marks those rows' columns NaN after the loop, in the programs that have
such rows only. On one H100 (NSA's module at 64K, q and k correlated along the sequence as on
text; docs/h100.md) the selected branch took 8.68 ms with 64-row ``"zeroed_v"`` tiles, 21.48 with
``"masked"`` ones and 17.09 with the default one-token tiles; ``"masked"`` 32-row tiles 39.87 and
``"zeroed_v"`` ones 14.25. The branch was not timed in that run, so it stays the default
(:data:`WIDE_STEPS_BY_DEFAULT`).

Tuning: ``BLOCK_N``, warps and stages are autotuned (keyed by ``ceil(log2(seq_k))``, head_dim,
block sizes and the row tile); under ``TRITON_INTERPRET=1`` one small configuration runs and
bf16 products are taken in float32 (:func:`sparse_attn.utils.dot_in_float32`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..pattern import BlockSparsePattern
from ..utils import HostCopy, dot_in_float32, interpreting, length_bucket
from . import configs, launch
from .launch import LOG2_E
from .triton import input_unsupported_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

name = "triton"

# How tiles of several query blocks take their key steps (kernel_configs(token_wide_steps=...), one of
# configs.TOKEN_WIDE_STEPS): the per-step branch until it is timed beside "zeroed_v" (the faster of
# the two alternatives on an H100, thirty-eighth session; see the module docstring).
WIDE_STEPS_BY_DEFAULT = "branch"
WIDE_STEP_CODES = {"branch": 0, "masked": 1, "zeroed_v": 2}

# Rows of a tile: P heads x T tokens. 64 bounds P * block_q; 16 is the smallest tl.dot.
MAX_PACKED_ROWS = 64
MIN_ROWS = 16
MAX_TILE_BLOCKS = 16


def wide_steps() -> str:
    """How the forward steps through tiles of several query blocks: ``"branch"``, ``"masked"`` or
    ``"zeroed_v"`` (see :data:`WIDE_STEPS_BY_DEFAULT`, ``kernel_configs(token_wide_steps=...)``)."""
    current = configs.current()
    if current.token_wide_steps is not None:
        return current.token_wide_steps
    # "overlap" takes the way timed with the wide tiles it chooses.
    return "zeroed_v" if current.token_rows == configs.TOKEN_ROWS_BY_OVERLAP else WIDE_STEPS_BY_DEFAULT


def zeroed_v(v: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``token_wide_steps="zeroed_v"``: ``(clean, any, columns)``, ``v`` with its non-finite
    values replaced by zero, and per KV block of ``block_k`` keys whether it holds any (int8
    ``(B, Hkv, n_blocks)``) and in which columns (int8 ``(B, Hkv, n_blocks, D)``). O(S * D)
    memory, no host synchronisation."""
    batch, heads, seq, dim = v.shape
    bad = ~torch.isfinite(v)
    clean = v.masked_fill(bad, 0)
    whole, rest = divmod(seq, block_k)
    columns = torch.zeros((batch, heads, whole + (rest > 0), dim), dtype=torch.bool, device=v.device)
    if whole:
        columns[:, :, :whole] = bad[:, :, : whole * block_k].unflatten(2, (whole, block_k)).any(3)
    if rest:
        columns[:, :, whole] = bad[:, :, whole * block_k :].any(2)
    return clean, columns.any(3).to(torch.int8), columns.to(torch.int8)


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str | None:
    """Why the token-granular kernel cannot run this case, or ``None`` when it can."""
    reason = input_unsupported_reason(q)
    if reason is not None:
        return reason
    if pattern.block_q > MAX_PACKED_ROWS:
        return f"the token-granular Triton kernel takes block_q <= {MAX_PACKED_ROWS}, got {pattern.block_q}"
    return None


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """``None``: :mod:`.triton_tokens_backward` differentiates every case the forward takes."""
    return None


@dataclass(frozen=True)
class TokenTiling:
    """How a program's rows are packed: ``heads`` query heads (sharing one list and one KV head)
    times ``tile_tokens`` query tokens (``tile_blocks`` whole query blocks), padded to ``block_m``."""

    heads: int
    tile_blocks: int
    tile_tokens: int
    block_m: int


def token_tiling(
    q_heads: int, kv_heads: int, pattern_heads: int, block_q: int, pattern: BlockSparsePattern | None = None
) -> TokenTiling:
    """The row packing for these head counts (see the module docstring); the rows aimed at are
    ``kernel_configs(token_rows=...)``'s, default :data:`MIN_ROWS`. With ``token_rows="overlap"``
    the tile follows ``pattern``'s lists (:func:`overlap_tile_blocks`; the smallest tile without a
    ``pattern``)."""
    heads = _packed_heads(q_heads, kv_heads, pattern_heads, block_q)
    asked = configs.current().token_rows
    if asked == configs.TOKEN_ROWS_BY_OVERLAP and pattern is not None:
        tile_blocks = overlap_tile_blocks(pattern, heads)
    else:  # "overlap" without a pattern: the smallest tile
        tile_blocks = _tile_blocks(
            MIN_ROWS if asked in (None, configs.TOKEN_ROWS_BY_OVERLAP) else asked, heads, block_q
        )
    tile_tokens = tile_blocks * block_q
    block_m = max(MIN_ROWS, triton.next_power_of_2(heads * tile_tokens))
    return TokenTiling(heads=heads, tile_blocks=tile_blocks, tile_tokens=tile_tokens, block_m=block_m)


def _packed_heads(q_heads: int, kv_heads: int, pattern_heads: int, block_q: int) -> int:
    """The query heads one tile packs (see the module docstring)."""
    group = q_heads // kv_heads
    # Heads that share both a list and a KV head: the whole group unless lists are per query head.
    sharing = group if q_heads // pattern_heads >= group else 1
    return max(d for d in range(1, sharing + 1) if sharing % d == 0 and d * block_q <= MAX_PACKED_ROWS)


def _tile_blocks(rows: int, heads: int, block_q: int) -> int:
    # A tile's query blocks are bits of an int32 mask per union entry: at most MAX_TILE_BLOCKS.
    return min(MAX_TILE_BLOCKS, max(1, rows // (heads * block_q)))


def union_ratio(pattern: BlockSparsePattern, tile_blocks: int, max_tiles: int | None = None) -> float:
    """How many more KV blocks a tile of ``tile_blocks`` consecutive query blocks walks than one
    query block: the mean number of distinct blocks in a tile's lists (per batch and pattern head,
    tiles from query block 0, the last one possibly short) over the mean list length; 1 where the
    tile's blocks list the same blocks, ``tile_blocks`` where they share none (``U(R)`` of
    ``benchmarks/selection_overlap.py``). Sorts each tile's padded lists (memory of the pattern's
    own size) and reads two numbers back to the host in one transfer.

    ``max_tiles``: where the pattern has more tiles than this, the ratio is that of ``max_tiles``
    full tiles spread evenly over the query blocks (the same tile numbers for every batch and
    head; numerator and denominator both over the sampled tiles' query blocks): an estimate, at a
    cost that no longer grows with the length."""
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"max_tiles must be a positive int or None, got {max_tiles!r}")
    return _ratio(*_union_counts(pattern, tile_blocks, max_tiles))


def _ratio(counts: torch.Tensor | None, n_tiles: int, n_q: int) -> float:
    """:func:`union_ratio` from :func:`_union_counts`' ``(distinct, total)`` (read to the host here)."""
    if counts is None:
        return 1.0
    distinct, total = counts.tolist()
    return max(1.0, (distinct / n_tiles) / (total / n_q)) if total else 1.0


def _union_counts(pattern: BlockSparsePattern, tile_blocks: int, max_tiles: int | None):
    """``(counts, n_tiles, n_q)`` for :func:`union_ratio`: ``counts`` int64 ``(2,)`` on the
    pattern's device (distinct blocks over the measured tiles, entries over their query blocks),
    or ``None`` for an empty pattern; the number of tiles and query blocks measured."""
    batch, heads, n_q, max_kv = pattern.kv_indices.shape
    if n_q == 0 or max_kv == 0:
        return None, 1, 1
    counts, indices = pattern.kv_counts, pattern.kv_indices
    n_tiles = num_blocks(n_q, tile_blocks)
    if max_tiles is not None and n_tiles > max_tiles:
        # n_q // tile_blocks >= n_tiles - 1 >= max_tiles full tiles: evenly spaced picks are distinct.
        picks = torch.linspace(0, n_q // tile_blocks - 1, max_tiles, device=pattern.device).long()
        rows = (picks[:, None] * tile_blocks + torch.arange(tile_blocks, device=pattern.device)).flatten()
        counts, indices = counts[:, :, rows], indices[:, :, rows]
        n_q, n_tiles = rows.numel(), max_tiles
    listed = torch.arange(max_kv, device=pattern.device) < counts[..., None]
    entries = torch.where(listed, indices.long(), -1)
    padding = n_tiles * tile_blocks - n_q
    if padding:
        entries = torch.cat([entries, entries.new_full((batch, heads, padding, max_kv), -1)], dim=2)
    tiles = entries.view(batch, heads, n_tiles, tile_blocks * max_kv).sort(dim=-1).values
    distinct = (tiles[..., 0] >= 0).sum() + ((tiles[..., 1:] != tiles[..., :-1]) & (tiles[..., 1:] >= 0)).sum()
    return torch.stack([distinct, listed.sum()]), n_tiles, n_q


# kernel_configs(token_rows="overlap"): tiles of OVERLAP_ROWS rows where the lists of their query
# blocks overlap at least this much (union_ratio at most OVERLAP_LIMIT), else the smallest tile.
# On one H100 (NSA's module at 64K, 64/4 heads; docs/h100.md) 64-row "zeroed_v" tiles took the
# selected branch to 8.68 ms where four tokens' lists had a union ratio of about 1.24 (q and k
# correlated along the sequence, as SmolLM2's lists on text: 1.25-1.27) and to 19.45 where it was
# about 2.59 (white noise), against 17.1-17.3 with one-token tiles; the backward, which takes the
# same tiles, 86.9 and 131.4 against 90.0-92.3. Between those two points forward + backward grows
# about linearly with the ratio (40.8 ms per unit) and breaks even with one-token tiles near 1.5,
# the limit chosen here (the forward alone would break even near 2.3). The ratios are those
# measured on the CPU at 8K (benchmarks/selection_overlap.py), not at 64K: an estimate.
OVERLAP_ROWS = 64
OVERLAP_LIMIT = 1.5
# The ratio is measured on at most this many tiles, evenly spread (union_ratio's max_tiles): the
# exact ratio up to 16K tokens in NSA's four-token tiles. The whole sort at 64K was 0.85 ms of
# one H100's time in the 39th session's profile (nsa_fwdbwd_profile_overlap_c098_s59.log,
# radixSortKVInPlace). Timed at 64K on one H100 (40th session, dkdv_ab_union_ratio_s60.log): the
# same ratio to three decimals, and measuring it adds 0.44-0.59 ms to the forward instead of
# 0.92-1.78 (the rest is the host read). The count is a design choice.
OVERLAP_SAMPLE_TILES = 4096


def overlap_tile_blocks(pattern: BlockSparsePattern, heads: int) -> int:
    """The query blocks per tile ``token_rows="overlap"`` takes for ``pattern`` with ``heads``
    packed heads: those of :data:`OVERLAP_ROWS` rows where :func:`union_ratio` (over at most
    :data:`OVERLAP_SAMPLE_TILES` tiles) is at most :data:`OVERLAP_LIMIT`, else the smallest tile's. Only where the smallest tile is one query
    block (as NSA's group of 16 heads); elsewhere (lists per query head: the smallest tile already
    holds 16 query blocks) the smallest tile, unmeasured otherwise. Cached on the pattern, so the
    forward and both backward passes take the same tiles."""
    wide = _overlap_wide(heads, pattern.block_q)
    if wide is None:
        return _tile_blocks(MIN_ROWS, heads, pattern.block_q)
    key = ("overlap_tile_blocks", heads)
    cached = pattern.cached_plan(key)
    if cached is None:
        counts, n_tiles, n_q = pattern.cached_plan(("overlap_counts", heads)) or _queue_counts(pattern, wide)
        cached = pattern.store_plan(
            key, wide if _ratio(counts.get(), n_tiles, n_q) <= OVERLAP_LIMIT else 1
        )  # (1: the smallest)
    return cached


def _overlap_wide(heads: int, block_q: int) -> int | None:
    """The wide tile's query blocks where ``"overlap"`` chooses by measuring (the smallest tile is
    one query block and the wide one more), else ``None``."""
    wide = _tile_blocks(OVERLAP_ROWS, heads, block_q)
    return wide if _tile_blocks(MIN_ROWS, heads, block_q) == 1 and wide != 1 else None


def _queue_counts(pattern: BlockSparsePattern, wide: int):
    """:func:`_union_counts` for :func:`overlap_tile_blocks`, on its way to the host without a
    wait: ``(counts, n_tiles, n_q)``, ``counts`` a :class:`~sparse_attn.utils.HostCopy` (of
    ``None`` for an empty pattern)."""
    counts, n_tiles, n_q = _union_counts(pattern, wide, OVERLAP_SAMPLE_TILES)
    return (HostCopy(None) if counts is None else HostCopy.of(counts)), n_tiles, n_q


@dataclass(frozen=True)
class TokenLists:
    """Per (pattern batch, pattern head, query tile) the sorted union of the tile's lists, and its
    transpose, in compressed-row form.

    * ``offsets`` int64 ``(B * H * n_tiles + 1,)``; entries ``offsets[r]:offsets[r + 1]`` of
      ``blocks`` (int32 KV block numbers, ascending) and ``bits`` (int32: bit ``i`` set when the
      tile's ``i``-th query block lists the block) belong to row ``r = (b * H + h) * n_tiles + tile``.
    * ``t_offsets`` int64 ``(B * H * n_kv_blocks + 1,)``; ``t_tiles`` (int32, ascending) and
      ``t_bits`` for row ``(b * H + h) * n_kv_blocks + kv_block``: the tiles whose union holds it.
    * ``ready``: on CUDA, an event recorded on the stream that built them, once queued (the build
      does not wait for the device, so the arrays may still be in the making): work on another
      stream waits for it first (:func:`wait_for_lists`).
    * ``t_slots`` (one-block tiles only, else ``None``): int32, aligned with ``t_tiles``, where each
      transposed entry's KV block sits in its query block's list (the gathered path's partials).
    """

    offsets: torch.Tensor
    blocks: torch.Tensor
    bits: torch.Tensor
    t_offsets: torch.Tensor
    t_tiles: torch.Tensor
    t_bits: torch.Tensor
    ready: object = None
    t_slots: torch.Tensor | None = None


def _built(lists: TokenLists) -> TokenLists:
    """``lists`` with its ``ready`` event recorded on the current stream (on CUDA)."""
    if not lists.offsets.is_cuda:
        return lists
    ready = torch.cuda.Event()
    ready.record()
    return dataclasses.replace(lists, ready=ready)


def wait_for_lists(lists: TokenLists) -> TokenLists:
    """Make the current stream wait until ``lists`` are built (they may have been queued on
    another stream: the forward builds them on the default stream, and the dK/dV plan reads them on
    :func:`.triton_tokens_backward.prepare_backward`'s side stream); ``lists`` returned."""
    if lists.ready is not None:
        torch.cuda.current_stream(lists.offsets.device).wait_event(lists.ready)
    return lists


def _padded_entries(pattern: BlockSparsePattern):
    """Every slot of ``pattern``'s padded lists, row-major (batch x head, query block, slot):
    ``(row, kv_block, used)`` with ``row = (b * H + h) * n_q + q_block`` (int64), the slot's KV
    block (int64; 0 where unused) and whether the slot is within its list (bool). Unused slots
    are marked rather than removed (``nonzero`` would wait on the device for their number)."""
    max_kv = pattern.kv_indices.shape[-1]
    used = (torch.arange(max_kv, device=pattern.device) < pattern.kv_counts[..., None]).reshape(-1)
    row = torch.arange(used.numel(), device=pattern.device) // max(max_kv, 1)
    kv_block = torch.where(used, pattern.kv_indices.reshape(-1).long(), 0)
    return row, kv_block, used


def _sort_keys(keys: torch.Tensor, bound: int, *, stable: bool = False):
    """``torch.sort`` of int64 ``keys`` all ``<= bound``, on int32 where ``bound`` fits."""
    return torch.sort(keys.int() if bound < 2**31 else keys, stable=stable)


def _row_offsets(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """int64 ``(n_rows + 1,)``: where each row's entries start in a list sorted by row, from the
    entries' rows in that order (values ``>= n_rows`` mark slots past the real entries). A binary
    search per row: counting by ``index_add_`` took 1.3 ms per call at NSA's 64K on an H100,
    most of it the spare slots' adds to one address (43rd session's profile)."""
    rows = torch.arange(n_rows + 1, dtype=sorted_rows.dtype, device=sorted_rows.device)
    return torch.searchsorted(sorted_rows, rows).to(torch.int64)


def token_lists(pattern: BlockSparsePattern, tile_blocks: int) -> TokenLists:
    """The union lists of ``pattern`` for query tiles of ``tile_blocks`` blocks, built once and
    cached. Built without waiting on the device: the arrays have the padded lists' size
    (``kv_indices.numel()`` entries), their tails past ``offsets[-1]`` / ``t_offsets[-1]`` unused,
    so the host can queue the kernels that read them while the pattern is still being computed."""
    key = ("token_lists", tile_blocks)
    cached = pattern.cached_plan(key)
    if cached is not None:
        return cached
    if tile_blocks == 1:
        return pattern.store_plan(key, _built(_one_block_lists(pattern)))
    batch, heads, n_q, _ = pattern.kv_indices.shape
    n_tiles, n_kv = num_blocks(n_q, tile_blocks), pattern.num_kv_blocks
    row, kv_block, used = _padded_entries(pattern)
    size, device = row.numel(), pattern.device
    q_block = row % max(n_q, 1)
    n_rows = batch * heads * n_tiles
    past = n_rows * n_kv  # the key of an unused slot: after every real one
    keys, order = _sort_keys(
        torch.where(used, ((row // max(n_q, 1)) * n_tiles + q_block // tile_blocks) * n_kv + kv_block, past), past
    )
    keys = keys.long()
    real = keys < past
    first, last = real.clone(), real.clone()
    first[1:] &= keys[1:] != keys[:-1]
    last[:-1] &= keys[1:] != keys[:-1]
    # The union entry each sorted slot merges into (its pair's first occurrence); a spare slot
    # (`size`) takes the writes of the others.
    merged = torch.cumsum(first, 0) - 1
    at_first, at_last = torch.where(first, merged, size), torch.where(last, merged, size)
    # Repeats of a pair are adjacent and come from different query blocks of the tile: the OR of
    # their bits is their sum, a difference of running sums at the run's ends (no atomic adds).
    bit = torch.where(used, torch.ones_like(q_block) << (q_block % tile_blocks), 0)[order]
    running = torch.cumsum(bit, 0)
    union_key, before, through = torch.empty((3, size + 1), dtype=torch.int64, device=device)
    union_key.fill_(past).index_put_((at_first,), keys)
    before.index_put_((at_first,), running - bit)
    through.index_put_((at_last,), running)
    union_key, bits = union_key[:size], (through - before)[:size].to(torch.int32)  # (garbage past the entries)
    union_row, blocks = union_key // n_kv, union_key % n_kv  # past the real entries: n_rows, 0
    offsets = _row_offsets(union_row, n_rows)  # (ascending: the keys were sorted)
    # The transpose: rows (batch x head, KV block). The union entries are sorted by tile then
    # block, so a stable sort by the transposed row keeps each row's tiles ascending.
    n_t = batch * heads * n_kv
    t_rows, t_order = _sort_keys(
        torch.where(union_row < n_rows, (union_row // n_tiles) * n_kv + blocks, n_t), n_t, stable=True
    )
    return pattern.store_plan(
        key,
        _built(TokenLists(
            offsets, blocks.to(torch.int32), bits, _row_offsets(t_rows, n_t),
            (union_row % n_tiles)[t_order].to(torch.int32), bits[t_order],
        )),
    )  # fmt: skip


def _one_block_lists(pattern: BlockSparsePattern) -> TokenLists:
    """:func:`token_lists` for one-block tiles: the lists are the pattern's own (blocks strictly
    ascending: no pair repeats, nothing to merge), packed, and their transpose is one stable sort
    of the padded slots by (batch x head, KV block), which keeps each block's query blocks
    ascending, instead of the general path's merge (NSA's 64K step on one H100: ``aten::_unique2``
    took 2.29 ms of kernels with two ``torch.unique`` calls, 0.91 without, the rest being the
    forward's four-token lists; profiles of the 42nd session, ``benchmarks/results/h100/NOTES.md``)."""
    device, n_kv = pattern.device, pattern.num_kv_blocks
    batch, heads, n_q, max_kv = pattern.kv_indices.shape
    row, kv_block, used = _padded_entries(pattern)
    size = row.numel()
    offsets = torch.zeros(pattern.kv_counts.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(pattern.kv_counts.reshape(-1).long(), 0, out=offsets[1:])
    # A used slot's packed place: its list's start plus its slot (used slots lead each list).
    slot = torch.arange(size, device=device) % max(max_kv, 1)
    blocks = torch.zeros(size + 1, dtype=torch.int32, device=device)
    blocks.index_put_((torch.where(used, offsets[row] + slot, size),), kv_block.to(torch.int32))
    n_t = batch * heads * n_kv
    t_rows, order = _sort_keys(torch.where(used, (row // max(n_q, 1)) * n_kv + kv_block, n_t), n_t, stable=True)
    ones = torch.ones(size, dtype=torch.int32, device=device)
    return TokenLists(
        offsets, blocks[:size], ones, _row_offsets(t_rows, n_t), (row % max(n_q, 1))[order].to(torch.int32), ones,
        t_slots=slot[order].to(torch.int32),
    )  # fmt: skip


def rows_fit_int32(*tensors: torch.Tensor) -> bool:
    """Whether every element offset within one batch entry of each ``(B, H, S, D)`` tensor (and
    ``H * S``, the row statistics' offsets) fits in int32: :func:`load_rows`' ``NARROW`` then
    holds (64 heads x 128K tokens x head_dim 128 is 2^30)."""
    limit = 2**31 - 1
    for x in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:], strict=True))
        if x.shape[1] * x.shape[2] > limit or span + 1 > limit:
            return False
    return True


def list_strides(pattern: BlockSparsePattern, rows_per_head: int) -> tuple[int, int]:
    """Row strides of a compressed list per (batch, head): batch 0 when one pattern serves the batch."""
    return (0 if pattern.batch == 1 else pattern.num_heads * rows_per_head), rows_per_head


if triton is not None:

    @triton.jit
    def tile_program(K, V, Offsets, stride_kb, stride_kh, stride_vb, stride_vh, list_stride_b, list_stride_h,
                     num_q_heads, group, pattern_head_divisor, seq_q, seq_k, max_kv, HEADS: tl.constexpr,
                     TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):  # fmt: skip
        """This forward / dQ program's tile and rows (``HEADS`` heads x ``TILE_TOKENS`` tokens,
        head-major): ``(batch, tile, head, token, query position, valid, bit, k_base, v_base,
        start, end)``, ``bit`` the row's query block in the tile, ``k_base`` / ``v_base`` at the
        KV head, ``[start, end)`` the tile's union-list entries. A tile of one query block
        (``TILE_TOKENS == BLOCK_Q``) reads the pattern's own padded lists (:func:`program_lists`):
        ``Offsets`` is then ``kv_counts`` and its entries start at ``row * max_kv``."""
        chunks = num_q_heads // HEADS
        # Tiles on the first grid axis: the others are limited to 65535 programs.
        tile = tl.program_id(0)
        batch = tl.program_id(1) // chunks
        first_head = tl.program_id(1) % chunks * HEADS
        rows = tl.arange(0, BLOCK_M)
        token_in_tile = rows % TILE_TOKENS
        token = tile * TILE_TOKENS + token_in_tile
        valid = (rows // TILE_TOKENS < HEADS) & (token < seq_q)
        kv_head = (first_head // group).to(tl.int64)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
        list_row = batch * list_stride_b + (first_head // pattern_head_divisor) * list_stride_h + tile
        if TILE_TOKENS == BLOCK_Q:
            start = list_row.to(tl.int64) * max_kv
            end = start + tl.load(Offsets + list_row)
        else:
            start = tl.load(Offsets + list_row)
            end = tl.load(Offsets + list_row + 1)
        head = first_head + rows // TILE_TOKENS
        bit = token_in_tile // BLOCK_Q
        return batch, tile, head, token, token + (seq_k - seq_q), valid, bit, k_base, v_base, start, end

    @triton.jit
    def load_rows(X, batch, head, token, valid, stride_b, stride_h, stride_s, offs_d, DOT_FP32: tl.constexpr,
                  NARROW: tl.constexpr = False):  # fmt: skip
        """The ``(rows, HEAD_DIM)`` tile of gathered rows (zeros where not ``valid``), float32 if
        ``DOT_FP32``. ``NARROW``: the rows' offsets within the batch entry in int32 (the caller
        checked they fit: :func:`rows_fit_int32`), the batch's in one int64 scalar."""
        if NARROW:
            offset = head * stride_h + token * stride_s
        else:
            offset = head.to(tl.int64) * stride_h + token.to(tl.int64) * stride_s
        x = tl.load(
            X + batch.to(tl.int64) * stride_b + offset[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        if DOT_FP32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def load_row_stats(Lse, Delta, batch, head, token, valid, num_q_heads, seq_q, NARROW: tl.constexpr = False):
        """The rows' log-sum-exp (in log2 units) and delta, from float32 ``(B, Hq, Sq)`` tensors
        (``NARROW`` as in :func:`load_rows`)."""
        if NARROW:
            row = head * seq_q + token
        else:
            row = head.to(tl.int64) * seq_q + token
        first = batch.to(tl.int64) * num_q_heads * seq_q
        lse = tl.load(Lse + first + row, mask=valid, other=0.0) * 1.4426950408889634
        return lse, tl.load(Delta + first + row, mask=valid, other=0.0)

    @triton.jit
    def store_rows(X, values, batch, head, token, valid, stride_b, stride_h, stride_s, offs_d):
        offset = batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + token.to(tl.int64) * stride_s
        tl.store(X + offset[:, None] + offs_d[None, :], values.to(X.dtype.element_ty), mask=valid[:, None])

    @triton.jit
    def load_keys(k_base, v_base, kv_block, sub, seq_k, stride_ks, stride_vs, offs_n, offs_d,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                  USE_TMA: tl.constexpr = False):  # fmt: skip
        """Key step ``sub`` of KV block ``kv_block``: positions, which exist (inside the sequence
        and the block), and the K and V tiles (zeros elsewhere in V; in K too for pointer loads).

        ``USE_TMA``: ``k_base`` / ``v_base`` are tensor descriptors over the KV head's ``(seq_k,
        HEAD_DIM)`` rows (rows past ``seq_k`` read as zeros; ``stride_ks``, ``stride_vs`` and
        ``offs_d`` unused); V rows past the block's end are zeroed here, K's only masked later."""
        key_start = kv_block * BLOCK_K + sub * BLOCK_N
        key_pos = key_start + offs_n
        key_ok = key_pos < seq_k
        if BLOCK_K % BLOCK_N != 0:
            key_ok = key_ok & (sub * BLOCK_N + offs_n < BLOCK_K)
        if USE_TMA:
            k = k_base.load([key_start, 0])
            v = v_base.load([key_start, 0])
            if BLOCK_K % BLOCK_N != 0:
                v = tl.where(key_ok[:, None], v, 0.0)  # the next block's rows: no weight, no NaN
        else:
            k = tl.load(k_base + key_pos[:, None] * stride_ks + offs_d[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + key_pos[:, None] * stride_vs + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return key_pos, key_ok, k, v

    @triton.jit
    def key_steps(kv_block, seq_k, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key steps of a block that hold keys (a last, partial block ends early)."""
        return tl.minimum((BLOCK_K + BLOCK_N - 1) // BLOCK_N, tl.cdiv(seq_k - kv_block * BLOCK_K, BLOCK_N))

    @triton.jit
    def attend_step(acc, m_i, l_i, q, k, v, key_pos, key_ok, listed, query_pos, qk_scale, all_listed,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """One online-softmax step over a key tile (``m`` in scaled log2 units).

        ``all_listed``: every row of the tile lists this block. Otherwise rows that do not must
        not see its non-finite values through their zero weights: V is read with them zeroed
        and the listing rows' columns marked NaN (the documented rule).
        """
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = listed[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # A row with nothing visible yet keeps m = -inf and subtracts 0 instead (no inf - inf).
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if all_listed:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        else:
            finite = tl.abs(v.to(tl.float32)) < float("inf")
            poisoned = tl.max(tl.where(finite, 0, 1), 0)
            acc = tl.dot(p.to(v.dtype), tl.where(finite, v, 0.0).to(v.dtype), acc, input_precision=PRECISION)
            acc = tl.where(listed[:, None] & (poisoned[None, :] > 0), float("nan"), acc)
        return acc, m_new, l_i

    @triton.jit
    def dq_step(dq, q, do, lse, delta, k, v, key_pos, key_ok, listed, query_pos, qk_scale,
                CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """``dq += dS K`` over one key tile (unscaled), probabilities from the saved log-sum-exp."""
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = listed[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
        p = tl.where(visible, tl.math.exp2(scores * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        return tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, dq, input_precision=PRECISION)

    @triton.jit
    def _token_forward(
        Q, K, V, Out, Lse, Offsets, Blocks, Bits, PoisonAny, PoisonCols,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        list_stride_b, list_stride_h,
        num_q_heads, group, pattern_head_divisor,
        seq_q, seq_k, max_kv, qk_scale,
        seq_bucket,  # autotuning key only: ceil(log2(seq_k))
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        HEADS: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        WIDE_STEPS: tl.constexpr,
    ):  # fmt: skip
        batch, tile, head, token, query_pos, valid, bit, k_base, v_base, start, end = tile_program(
            K, V, Offsets, stride_kb, stride_kh, stride_vb, stride_vh, list_stride_b, list_stride_h,
            num_q_heads, group, pattern_head_divisor, seq_q, seq_k, max_kv, HEADS, TILE_TOKENS, BLOCK_M, BLOCK_Q,
        )  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = load_rows(Q, batch, head, token, valid, stride_qb, stride_qh, stride_qs, offs_d, DOT_FP32)
        # Bits of the query blocks this tile has rows in: an entry with all of them set is listed by every row.
        tile_rows = tl.minimum(seq_q - tile * TILE_TOKENS, TILE_TOKENS)
        all_bits = (1 << ((tile_rows + BLOCK_Q - 1) // BLOCK_Q)) - 1

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # WIDE_STEPS == 2 ("zeroed_v"): V comes with its non-finite values zeroed; the rows that list
        # a block holding some are flagged here and their columns marked after the loop.
        poisoned = tl.zeros([BLOCK_M], dtype=tl.int32)
        kv_head = (tl.program_id(1) % (num_q_heads // HEADS) * HEADS) // group
        poison_base = (batch.to(tl.int64) * (num_q_heads // group) + kv_head) * tl.cdiv(seq_k, BLOCK_K)
        # One flat loop over (entry, key step) so the next step's K/V loads are issued under this
        # step's products (software pipelining spans entries; a nested per-entry loop of one key
        # step, NSA's 64-key blocks, had nothing to overlap). Steps past the sequence end (a last,
        # partial block) load nothing and are masked whole. Tiles of one query block (NSA's group
        # of heads for one token) take the no-branch step: a runtime branch on whether every row
        # lists the entry keeps the compiler from pipelining the loads (checked in the sm_90 PTX:
        # no cp.async with it, cp.async with the constexpr step; compiled without a launch's
        # alignment hints, which stop all tile pipelining, and not rechecked with them).
        SUBS: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
        for step in range(start * SUBS, end * SUBS):
            entry = step // SUBS
            kv_block = tl.load(Blocks + entry)
            key_pos, key_ok, k, v = load_keys(
                k_base, v_base, kv_block, step % SUBS, seq_k, stride_ks, stride_vs, offs_n, offs_d,
                BLOCK_K, BLOCK_N, DOT_FP32,
            )  # fmt: skip
            if TILE_TOKENS == BLOCK_Q:  # one query block per tile: its rows list every entry
                acc, m_i, l_i = attend_step(
                    acc, m_i, l_i, q, k, v, key_pos, key_ok, valid, query_pos, qk_scale, True, CAUSAL, PRECISION
                )
            else:
                bits = tl.load(Bits + entry)
                listed = valid & (((bits >> bit) & 1) != 0)
                # "branch" (0) decides per step (a runtime value); "masked" (1) always takes the masked
                # path and "zeroed_v" (2), whose V is finite, the plain one: constants, no branch.
                if WIDE_STEPS == 0:
                    all_listed = bits == all_bits
                else:
                    all_listed: tl.constexpr = WIDE_STEPS == 2
                acc, m_i, l_i = attend_step(
                    acc, m_i, l_i, q, k, v, key_pos, key_ok, listed, query_pos, qk_scale, all_listed, CAUSAL, PRECISION
                )
                if WIDE_STEPS == 2:  # flag the rows that list a block holding non-finite values
                    flag = tl.load(PoisonAny + poison_base + kv_block)
                    poisoned = poisoned | (listed & (flag != 0)).to(tl.int32)

        out = acc / l_i[:, None]
        if WIDE_STEPS == 2 and TILE_TOKENS != BLOCK_Q:
            if tl.max(poisoned, 0) > 0:  # after the loop: this branch does not stop its pipelining
                bad = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.int32)
                for entry in range(start, end):
                    kv_block = tl.load(Blocks + entry)
                    listed = valid & (((tl.load(Bits + entry) >> bit) & 1) != 0)
                    columns = tl.load(PoisonCols + (poison_base + kv_block) * HEAD_DIM + offs_d)
                    bad = bad | (listed[:, None] & (columns[None, :] != 0)).to(tl.int32)
                out = tl.where(bad != 0, float("nan"), out)
        store_rows(Out, out, batch, head, token, valid, stride_ob, stride_oh, stride_os, offs_d)
        if WRITE_LSE:
            # Natural-log units, like the block kernel's.
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
            tl.store(Lse + (batch.to(tl.int64) * num_q_heads + head) * seq_q + token, lse, mask=valid)


def block_n_candidates(block_k: int) -> tuple[int, ...]:
    """Key steps worth trying: at most the block rounded up to a power of two (no step mostly past the block)."""
    return tuple(n for n in (16, 32, 64, 128) if n <= max(16, triton.next_power_of_2(block_k)))


# Software-pipelining depths the forward autotunes over. Compiled for sm_90a at NSA's shape (with
# a launch's alignment hints), 2 stages wait for every K/V copy at the top of each step, 3 leave
# one step's copies in flight, 4 two (at 64 rows x 64 keys, 8 warps: 147 KB of shared memory,
# 176 registers). 4 was offered in the 40th session and never taken in the 41st session's H100
# runs of NSA's selected branch (3 was, with one- and four-token tiles), so it was withdrawn.
FORWARD_STAGES = (2, 3)


@functools.cache
def _autotuned_forward(block_k: int, is_float32: bool):
    steps = block_n_candidates(block_k)
    if is_float32:
        steps = tuple(n for n in steps if n <= 64)
    tuning = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n in steps for w in (4, 8) for s in FORWARD_STAGES
    ]
    return triton.autotune(
        configs=tuning,
        key=[
            "seq_bucket", "HEAD_DIM", "BLOCK_Q", "BLOCK_K", "HEADS", "TILE_TOKENS", "BLOCK_M", "CAUSAL", "PRECISION",
            "WIDE_STEPS",
        ],
    )(_token_forward)  # fmt: skip


def program_lists(pattern: BlockSparsePattern, tiling: TokenTiling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Offsets, Blocks, Bits)`` for the forward / dQ programs. A tile of one query block walks
    that block's own list: the pattern's ``kv_counts`` and padded ``kv_indices`` as they are (no
    union to build; ``Bits`` unused). Wider tiles walk the cached union lists (:func:`token_lists`)."""
    if tiling.tile_blocks == 1:
        counts, indices = pattern.kv_counts.contiguous(), pattern.kv_indices.contiguous()
        return counts, indices, counts
    lists = token_lists(pattern, tiling.tile_blocks)
    return lists.offsets, lists.blocks, lists.bits


def launch_geometry(q: torch.Tensor, k: torch.Tensor, pattern: BlockSparsePattern):
    """``(tiling, lists, grid, shared)``: the row packing, the lists' ``(Offsets, Blocks, Bits)``
    (:func:`program_lists`), the forward / dQ grid and the runtime arguments both take after
    their strides (list strides through the sizes)."""
    batch, q_heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    tiling = token_tiling(q_heads, kv_heads, pattern.num_heads, pattern.block_q, pattern)
    lists = program_lists(pattern, tiling)
    n_tiles = num_blocks(seq_q, tiling.tile_tokens)
    grid = (n_tiles, batch * (q_heads // tiling.heads))
    shared = (
        *list_strides(pattern, n_tiles),
        *(q_heads, q_heads // kv_heads, q_heads // pattern.num_heads),
        *(seq_q, seq_k, pattern.max_kv),
    )
    return tiling, lists, grid, shared


def kernel_constants(q: torch.Tensor, pattern: BlockSparsePattern, tiling: TokenTiling, *, causal: bool) -> dict:
    """The constexpr arguments the forward and backward kernels share."""
    use_float32_dot = dot_in_float32(q.dtype)
    return dict(
        HEAD_DIM=q.shape[-1],
        BLOCK_Q=pattern.block_q,
        BLOCK_K=pattern.block_k,
        HEADS=tiling.heads,
        TILE_TOKENS=tiling.tile_tokens,
        BLOCK_M=tiling.block_m,
        CAUSAL=bool(causal),
        DOT_FP32=use_float32_dot,
        PRECISION="ieee" if use_float32_dot else "tf32",
    )


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
    """Block-sparse attention with the token-granular kernel. Shapes as in
    :func:`sparse_attn.block_sparse_attention`: ``out`` ``(B, Hq, Sq, D)`` in q's dtype and, with
    ``return_lse``, the natural-log log-sum-exp, float32 ``(B, Hq, Sq)``."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if gathered.uses_gathered_path(pattern, q.shape[1], k.shape[1]):
        return gathered.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
    batch, q_heads, seq_q, dim = q.shape
    tiling, lists, grid, shared = launch_geometry(q, k, pattern)
    out = launch.allocate((batch, q_heads, seq_q, dim), q.dtype, q.device)
    lse = launch.allocate((batch, q_heads, seq_q), torch.float32, q.device) if return_lse else out
    mode = wide_steps() if tiling.tile_tokens != pattern.block_q else "branch"  # one-block tiles never branch
    poison_any = poison_columns = lists[2]  # unused placeholders unless "zeroed_v"
    if mode == "zeroed_v":
        v, poison_any, poison_columns = zeroed_v(v, pattern.block_k)
    args = (
        *(q, k, v, out, lse, *lists, poison_any, poison_columns),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *shared,
        *(scale * LOG2_E, length_bucket(k.shape[2])),
    )
    constants = dict(kernel_constants(q, pattern, tiling, causal=causal), WRITE_LSE=bool(return_lse))
    constants["WIDE_STEPS"] = WIDE_STEP_CODES[mode]
    if interpreting():
        _token_forward[grid](*args, BLOCK_N=16, **constants)
    else:
        _autotuned_forward(pattern.block_k, q.dtype == torch.float32)[grid](*args, **constants)
    return (out, lse) if return_lse else out


def plan_ahead(q: torch.Tensor, k: torch.Tensor, pattern: BlockSparsePattern) -> None:
    """Start now the one decision of :func:`forward` that reads the device: the query tile under
    ``kernel_configs(token_rows="overlap")`` (:func:`overlap_tile_blocks`, from the lists' union
    ratio). Its counts are computed and copied to the host behind a CUDA event, without waiting;
    :func:`forward` waits for that event only, not for work queued after it. Everything else
    :func:`forward` and the backward build from the pattern is built without waiting
    (:func:`token_lists`, :func:`.triton_tokens_backward.dkdv_work`). So a caller that queues
    independent work between this and the call keeps the device busy while the host decides and
    builds the lists (:func:`sparse_attn.backends.plan_ahead`)."""
    if (
        gathered.uses_gathered_path(pattern, q.shape[1], k.shape[1])
        or configs.current().token_rows != configs.TOKEN_ROWS_BY_OVERLAP
    ):
        return
    heads = _packed_heads(q.shape[1], k.shape[1], pattern.num_heads, pattern.block_q)
    wide = _overlap_wide(heads, pattern.block_q)
    if wide is None:
        return
    if (
        pattern.cached_plan(("overlap_tile_blocks", heads)) is None
        and pattern.cached_plan(("overlap_counts", heads)) is None
    ):
        pattern.store_plan(("overlap_counts", heads), _queue_counts(pattern, wide))


# This backend's backward takes delta= and dq_into= (backends.fusable_backward_module).
BACKWARD_TAKES_DELTA = True


def backward(*args, **kwargs):
    """This backend's backward entry point: :func:`.triton_tokens_backward.backward` (imported on
    first use, so either module can be imported first)."""
    from .triton_tokens_backward import backward as token_backward

    return token_backward(*args, **kwargs)


def prepare_backward(*args, **kwargs):
    """Build the backward's lists during the forward: :func:`.triton_tokens_backward.prepare_backward`."""
    from .triton_tokens_backward import prepare_backward as prepare

    return prepare(*args, **kwargs)


# Last: this module reads its helpers (tile_program, launch_geometry, token_lists).
from . import triton_tokens_gathered as gathered  # noqa: E402
