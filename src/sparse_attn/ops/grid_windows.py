"""Separable windows on a token grid: per-dimension window tables, the token rule, and its block masks.

The spatial methods (``neighborhood``, ``sliding_tile``) give every query a window that is a
product over grid dimensions: along dimension ``d`` (size ``L``, dilation ``r``) the query at
coordinate ``i`` sees the keys ``j`` with ``j % r == i % r`` and ``lo[i] <= j // r < hi[i]``
(in dilation-group coordinates). A method only fills the tables ``lo`` / ``hi`` (int64
``(L,)``, one pair per dimension); everything else is shared here:

* :class:`GridWindowRule`: the token rule of a :class:`~sparse_attn.masked_pattern.MaskedPattern`
  over a :class:`~sparse_attn.layouts.Layout` (positions in its tile order). Text tokens see
  every token and are seen by every token.
* :func:`window_pattern`: the block pattern, streamed over chunks of query blocks. A KV block is
  kept when some key in it is in the window of some query of the query block, tested on
  bounding boxes: the union of the windows of a box of queries is the product of per-dimension
  unions, so the test is exact for blocks that are boxes (whole tiles) at dilation 1, and
  keeps a superset otherwise (the token rule then removes the extra pairs). A kept block is
  *whole* for the rule when every (query, key) pair of the boxes is in the window; the others
  are marked in ``rule_partial``. When no kept block is partial the pattern carries no rule
  (block-exact: the block kernels run it).

Memory: the per-block boxes are ``O(S / block)``; a chunk of query blocks holds its
``(rows, n_kv_blocks)`` masks and ``(rows, L)`` range tables, never ``O(S^2)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..layouts import Layout
from ..masked_pattern import MaskedPattern
from ..pattern import BlockSparsePattern
from ..rule_predicate import BoxPredicate, pack_box
from ._chunking import CHUNK_ELEMENTS
from .to_pattern import stream_pattern

__all__ = ["DimWindow", "GridWindowRule", "block_boxes", "kept_blocks", "layout_pattern", "window_pattern"]


@dataclass(frozen=True)
class DimWindow:
    """One dimension's window: ``lo``/``hi`` int64 ``(L,)`` in dilation-group coordinates, and the dilation."""

    lo: torch.Tensor
    hi: torch.Tensor
    dilation: int = 1

    def to(self, device) -> DimWindow:
        return DimWindow(self.lo.to(device), self.hi.to(device), self.dilation)

    def allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool: key coordinate ``j`` is in the window of query coordinate ``i`` (valid coordinates only)."""
        r = self.dilation
        group = j // r
        return (j % r == i % r) & (self.lo[i] <= group) & (group < self.hi[i])

    def span(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query coordinate, the first and last key coordinate of its window (inclusive), int64 ``(L,)``."""
        residue = torch.arange(self.lo.numel(), device=self.lo.device) % self.dilation
        return self.lo * self.dilation + residue, (self.hi - 1) * self.dilation + residue


class GridWindowRule:
    """Token rule: ``allowed(q_pos, k_pos)`` on positions of ``layout``'s tile order (see the module docstring)."""

    def __init__(self, layout: Layout, windows: tuple[DimWindow, ...], device=None) -> None:
        self.layout = layout
        self.windows = tuple(w.to(device) if device is not None else w for w in windows)
        self.coordinates = layout.coordinates(self.windows[0].lo.device)  # (rank, S), -1 for text

    def to(self, device) -> GridWindowRule:
        return GridWindowRule(self.layout, self.windows, device)

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        last = self.layout.seq_len - 1
        # Positions past the sequence (block padding) are clamped: the bounds rule hides them anyway.
        q_pos, k_pos = q_pos.clamp(0, last), k_pos.clamp(0, last)
        result = self.layout.is_text(q_pos) | self.layout.is_text(k_pos)
        inside = None
        for dim, window in enumerate(self.windows):
            # Text tokens have coordinate -1; clamped to 0 they index the tables harmlessly (the text term decides).
            i = self.coordinates[dim][q_pos].clamp(min=0)
            j = self.coordinates[dim][k_pos].clamp(min=0)
            term = window.allowed(i, j)
            inside = term if inside is None else inside & term
        return result | inside

    def kernel_predicate(self) -> BoxPredicate | None:
        """The rule as packed box fields (:mod:`sparse_attn.rule_predicate`): per dimension the
        key's dilation group with the query's ``[lo, hi - 1]``, and at dilation > 1 the residue
        (a one-value range); text keys are seen by every query and text queries see every key.
        ``None`` when the fields need more than 31 bits."""
        coordinates = self.coordinates
        text = coordinates[0] < 0
        keys, lows, highs, maxima = [], [], [], []
        for dim, window in enumerate(self.windows):
            r = window.dilation
            size = self.layout.grid[dim]
            i = coordinates[dim].clamp(min=0)
            keys.append(i // r)
            lows.append(window.lo[i])
            highs.append(window.hi[i] - 1)
            maxima.append(-(-size // r) - 1)
            if r > 1:
                keys.append(i % r)
                lows.append(i % r)
                highs.append(i % r)
                maxima.append(r - 1)
        return pack_box(keys, lows, highs, maxima, key_always=text, query_all=text)


@dataclass(frozen=True)
class _Boxes:
    """Per block of the tile order: grid coordinate bounds (``low``/``high`` int64 ``(rank, n)``), whether
    it holds grid tokens and whether it holds text tokens (bool ``(n,)``)."""

    low: torch.Tensor
    high: torch.Tensor
    has_grid: torch.Tensor
    has_text: torch.Tensor


def block_boxes(layout: Layout, block: int, device) -> _Boxes:
    """Bounding boxes of the grid tokens of every ``block``-token block of ``layout``'s tile order."""
    coordinates = layout.coordinates(device)
    n = num_blocks(layout.seq_len, block)
    pad = n * block - layout.seq_len
    text = layout.is_text(torch.arange(layout.seq_len, device=device))
    big = max(layout.grid) + 1
    low = torch.nn.functional.pad(torch.where(coordinates < 0, big, coordinates), (0, pad), value=big)
    high = torch.nn.functional.pad(coordinates, (0, pad), value=-1)
    return _Boxes(
        low=low.view(layout.rank, n, block).amin(-1),
        high=high.view(layout.rank, n, block).amax(-1),
        has_grid=torch.nn.functional.pad(~text, (0, pad)).view(n, block).any(-1),
        has_text=torch.nn.functional.pad(text, (0, pad)).view(n, block).any(-1),
    )


def _range_reduce(values: torch.Tensor, first: torch.Tensor, last: torch.Tensor, *, largest: bool) -> torch.Tensor:
    """For each row, the min (or max) of ``values`` (``(L,)``) over coordinates ``[first, last]`` (``(rows,)``).
    Rows with an empty range (no grid token) get an arbitrary value; callers mask them."""
    coordinate = torch.arange(values.numel(), device=values.device)
    inside = (coordinate >= first[:, None]) & (coordinate <= last[:, None])
    fill = torch.iinfo(values.dtype).min if largest else torch.iinfo(values.dtype).max
    masked = torch.where(inside, values, fill)
    return masked.amax(-1) if largest else masked.amin(-1)


def _query_bounds(windows, boxes: _Boxes, rows: range):
    """Per dimension and query block of ``rows``: the union span of its queries' windows and the intersection
    of their ``lo``/``hi`` (for the whole-block test)."""
    spans = []
    for dim, window in enumerate(windows):
        first, last = boxes.low[dim, rows.start : rows.stop], boxes.high[dim, rows.start : rows.stop]
        first_key, last_key = window.span()
        spans.append(
            (
                _range_reduce(first_key, first, last, largest=False),
                _range_reduce(last_key, first, last, largest=True),
                _range_reduce(window.lo, first, last, largest=True),
                _range_reduce(window.hi, first, last, largest=False),
                first,
                last,
            )
        )
    return spans


def _keep_rows(windows, q_boxes: _Boxes, k_boxes: _Boxes, rows: range) -> torch.Tensor:
    """Bool ``(len(rows), n_kv_blocks)``: KV blocks holding a key of some query's window (box test)."""
    keep = q_boxes.has_grid[rows.start : rows.stop, None] & k_boxes.has_grid[None, :]
    for dim, (union_first, union_last, *_rest) in enumerate(_query_bounds(windows, q_boxes, rows)):
        keep = (
            keep
            & (k_boxes.low[dim][None, :] <= union_last[:, None])
            & (k_boxes.high[dim][None, :] >= union_first[:, None])
        )
    return keep | q_boxes.has_text[rows.start : rows.stop, None] | k_boxes.has_text[None, :]


def _whole(windows, q_boxes: _Boxes, k_boxes: _Boxes, kv_indices: torch.Tensor) -> torch.Tensor:
    """Bool, ``kv_indices``' shape ``(n_q, max_kv)``: every (query, key) pair of the two boxes is in the window."""
    rows = range(kv_indices.shape[0])
    whole = torch.ones(kv_indices.shape, dtype=torch.bool, device=kv_indices.device)
    index = kv_indices.long()
    for dim, (_, _, lo_max, hi_min, first, last) in enumerate(_query_bounds(windows, q_boxes, rows)):
        window = windows[dim]
        k_low, k_high = k_boxes.low[dim][index], k_boxes.high[dim][index]
        if window.dilation == 1:
            whole &= (lo_max[:, None] <= k_low) & (k_high < hi_min[:, None])
        else:
            # Keys of different residues never share a window: only a single query and key coordinate can be whole.
            single = (first == last)[:, None] & (k_low == k_high)
            query = first.clamp(0, window.lo.numel() - 1)[:, None].expand_as(k_low)
            whole &= single & window.allowed(query, k_low.clamp(min=0))
    # A pair with a text token is always allowed: a block without grid queries or keys is whole.
    no_grid = ~q_boxes.has_grid[:, None] | ~k_boxes.has_grid[index]
    return whole | no_grid


def kept_blocks(layout: Layout, windows: tuple[DimWindow, ...], *, block_q: int, block_k: int, device) -> int:
    """How many (query block, KV block) pairs :func:`window_pattern` keeps, counted over chunks of
    query blocks without building the lists (the cost model for choosing a tile)."""
    windows = tuple(w.to(device) for w in windows)
    q_boxes = block_boxes(layout, block_q, device)
    k_boxes = block_boxes(layout, block_k, device)
    n_q, n_kv = num_blocks(layout.seq_len, block_q), num_blocks(layout.seq_len, block_k)
    rows = max(1, CHUNK_ELEMENTS // (4 * n_kv + 4 * max(layout.grid)))
    total = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, n_q, rows):
        total += _keep_rows(windows, q_boxes, k_boxes, range(start, min(n_q, start + rows))).sum()
    return int(total)


def window_pattern(
    layout: Layout, windows: tuple[DimWindow, ...], *, block_q: int, block_k: int, device
) -> MaskedPattern:
    """The non-causal :class:`MaskedPattern` of a separable grid window (one list for every batch and head)."""
    windows = tuple(w.to(device) for w in windows)
    q_boxes = block_boxes(layout, block_q, device)
    k_boxes = block_boxes(layout, block_k, device)
    row_elements = 4 * num_blocks(layout.seq_len, block_k) + 4 * max(layout.grid)
    keep_rows = functools.partial(_keep_rows, windows, q_boxes, k_boxes)
    pattern = layout_pattern(
        keep_rows, layout, block_q=block_q, block_k=block_k, device=device, row_elements=row_elements
    )
    used = torch.arange(pattern.max_kv, device=device) < pattern.kv_counts[..., None]
    partial = ~_whole(windows, q_boxes, k_boxes, pattern.kv_indices[0, 0]) & used[0, 0]
    rule = GridWindowRule(layout, windows) if bool(partial.any()) else None
    return MaskedPattern.over_layout(
        pattern, layout, token_rule=rule, rule_partial=None if rule is None else partial[None, None]
    )


def layout_pattern(
    mask_rows: Callable[[range], torch.Tensor],
    layout: Layout,
    *,
    block_q: int,
    block_k: int,
    device,
    row_elements: int,
    heads: int = 1,
) -> BlockSparsePattern:
    """A non-causal pattern over ``layout`` (one batch row; one list for every head unless ``heads``),
    streamed over chunks of query blocks: ``mask_rows(rows)`` gives bool ``(len(rows), n_kv_blocks)``,
    or ``(1, heads, len(rows), n_kv_blocks)`` (see :func:`stream_pattern`)."""
    return stream_pattern(
        mask_rows,
        batch=1,
        heads=heads,
        seq_q=layout.seq_len,
        seq_k=layout.seq_len,
        block_q=block_q,
        block_k=block_k,
        causal=False,
        device=device,
        row_elements=row_elements,
    )
