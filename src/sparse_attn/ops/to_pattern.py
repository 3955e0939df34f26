"""The last step of every estimator, streamed: block masks become a :class:`BlockSparsePattern` chunk by chunk.

An estimator's block scores are ``O(n_q * n_kv)`` per head (at a million tokens and 128-token
blocks, 8192 x 8192 per head), so no estimator holds them whole. It hands a function that
scores and selects one range of query blocks (or, for a rule that selects over a whole head,
one range of query heads) to :func:`stream_pattern` (or :func:`stream_pattern_by_heads`),
which calls it chunk after chunk and writes each chunk's rows straight into the pattern
through a :class:`PatternBuilder`. Chunks are sized so that the chunk's float32 working set
stays within :data:`CHUNK_ELEMENTS`; a range of query blocks is processed last-first.

The builder applies the pattern rules row by row, exactly as ``BlockSparsePattern.from_mask``
does (causal: drop blocks after the query block, add its diagonal; non-causal: a row left
empty keeps its last block), and turns each piece of mask into sorted ``int32`` lists
(:mod:`sparse_attn.ops.mask_lists`: on CUDA one kernel pass per row, elsewhere a prefix count
and a binary search; no sort, no ``int64`` table of the piece). Its index table
is as wide as the widest row so far and widens when a row needs more, so the result is
compact: ``max_kv`` is the largest count of any row. Working memory beyond the chunk is the
pattern itself (and, while its table widens, the narrower copy). Streamed by query blocks, last
first, the widest rows (a causal pattern's last) usually come first and the table rarely widens.
Streamed by heads (``compact=True``), each head chunk's lists are kept as a flat run of its kept
entries (no padding) until :meth:`PatternBuilder.finish` knows the widest row and fills the
table once: the extra memory is the kept entries (for a causal pattern about half the padded
table, less for a sparse one) instead of a second padded table per widening.

Some query blocks only (:func:`capture_rows`): a caller that needs an estimator's rows for a few
query blocks (``auto`` judging a candidate on its probed blocks) runs the estimator inside
``with capture_rows(blocks):``. Where the estimator would work in several chunks,
:func:`stream_pattern` calls its rule for those blocks only (each in the group of
``rows_multiple`` blocks it belongs to), applies the builder's row rules to them all at once
(their rule rows computed once), and raises :class:`RowsCaptured` carrying the rows, so nothing
after it in the estimator runs and no pattern is built (a static rule, ``static=True``, builds
its whole pattern instead: it reads no scores, so its chunks cost less than a call per block); :func:`stream_pattern_by_heads` computes every head chunk as usual (its rule
needs whole heads) and keeps the captured rows only. Where the whole pattern is one chunk, both
build it as usual and return it: one call over every row is then no dearer than a call per
captured block (each call's launches and synchronisations cost more than its rows at such
lengths; on an H200 at 128K tokens sixteen calls per candidate made ``auto``'s estimate slower
than dense attention), and the caller gets the whole pattern. An estimator that returns
``stream_pattern(...)`` or ``stream_pattern_by_heads(...)`` directly therefore gives exactly the
rows of its pattern either way (tests check this for every such registered method).

Row-local rules (every method but FlexPrefill's query-aware heads) give the same lists in any
chunking; scores computed by a matrix product per chunk can round differently from one
product over all rows (BLAS picks its kernel by shape), which can move a selection only where
a score sits within rounding of its selection boundary. The builder marks its result as
validated, as ``from_mask`` does: it is valid by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from ..geometry import num_blocks
from ..pattern import BlockSparsePattern
from ._chunking import CHUNK_ELEMENTS
from .block_rows import (
    causal_block_rows,
    diagonal_block_rows,
    query_block_chunks,
    query_block_range,
)
from .gqa import head_chunks
from .mask_lists import mask_rows_to_lists

__all__ = ["PatternBuilder", "RowsCaptured", "capture_rows", "stream_pattern", "stream_pattern_by_heads"]

# Mask pieces the builder converts at once hold CHUNK_ELEMENTS / _PIECE_SHARE entries: a piece
# costs a few bytes per entry (bool copies, an int32 prefix count), a float32 chunk four.
_PIECE_SHARE = 2


# The query blocks a capture_rows() block asks for (None: build patterns as usual).
_CAPTURE: ContextVar[tuple[int, ...] | None] = ContextVar("sparse_attn_capture_rows", default=None)


class RowsCaptured(Exception):  # noqa: N818 (a signal carrying a result, not an error)
    """Raised by :func:`stream_pattern` / :func:`stream_pattern_by_heads` inside :func:`capture_rows`.

    ``mask``: bool ``(batch, heads, len(query_blocks), n_kv_blocks)``, the rows the pattern would
    have for the captured query blocks (in the order asked for), after the builder's row rules.
    """

    def __init__(self, mask: torch.Tensor, query_blocks: tuple[int, ...]) -> None:
        super().__init__(f"rows of query blocks {list(query_blocks)} captured")
        self.mask = mask
        self.query_blocks = query_blocks


@contextmanager
def capture_rows(query_blocks: Sequence[int]) -> Iterator[None]:
    """Inside this block, :func:`stream_pattern` and :func:`stream_pattern_by_heads` compute only
    (or keep only) ``query_blocks`` and raise :class:`RowsCaptured` with their rows, unless the
    whole pattern is one chunk: then they return it as usual (module docstring)."""
    blocks = tuple(int(b) for b in query_blocks)
    if not blocks or min(blocks) < 0:
        raise ValueError(f"query_blocks must be a non-empty sequence of block numbers >= 0, got {list(query_blocks)}")
    token = _CAPTURE.set(blocks)
    try:
        yield
    finally:
        _CAPTURE.reset(token)


def _captured_blocks(n_q: int) -> tuple[int, ...] | None:
    blocks = _CAPTURE.get()
    if blocks is not None and max(blocks) >= n_q:
        raise ValueError(f"capture_rows: query block {max(blocks)} asked for, the pattern has {n_q}")
    return blocks


class PatternBuilder:
    """Assembles a :class:`BlockSparsePattern` ``(batch, heads, n_q_blocks, max_kv)`` from pieces of block mask.

    Each :meth:`add` writes the lists of some query blocks of some heads; every (head, query
    block) must be written exactly once before :meth:`finish`. ``compact=True`` keeps each piece's
    kept entries unpadded until :meth:`finish` (the module docstring says when that saves memory).
    """

    def __init__(
        self,
        *,
        batch: int,
        heads: int,
        seq_q: int,
        seq_k: int,
        block_q: int,
        block_k: int,
        causal: bool,
        device: torch.device | str | None = None,
        compact: bool = False,
    ) -> None:
        self.compact = bool(compact)
        self._pieces: list[tuple[range, range, int, torch.Tensor]] = []
        self._width = 1
        self.batch, self.heads = batch, heads
        self.seq_q, self.seq_k, self.block_q, self.block_k = seq_q, seq_k, block_q, block_k
        self.causal = bool(causal)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.n_q, self.n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
        self._counts = torch.zeros((batch, heads, self.n_q), dtype=torch.int32, device=self.device)
        self._indices = torch.zeros((batch, heads, self.n_q, 0), dtype=torch.int32, device=self.device)
        self._rows_written = 0
        self._rules_at: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, mask: torch.Tensor, *, rows: range, heads: range | None = None) -> None:
        """Write query blocks ``rows`` of heads ``heads`` (default: all) from bool ``mask``.

        ``mask`` broadcasts to ``(batch, len(heads), len(rows), n_kv_blocks)`` (a 2-D
        ``(len(rows), n_kv_blocks)`` mask serves every batch and head). It is converted a few
        rows at a time, so its pieces' temporaries stay within the builder's share of
        :data:`CHUNK_ELEMENTS`.
        """
        heads = range(self.heads) if heads is None else heads
        rows = query_block_range(self.n_q, rows)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        mask = mask.expand(self.batch, len(heads), len(rows), self.n_kv)
        piece_rows = max(1, CHUNK_ELEMENTS // (_PIECE_SHARE * self.batch * len(heads) * self.n_kv))
        for offset in reversed(range(0, len(rows), piece_rows)):  # last first, as the chunks
            piece = range(rows.start + offset, min(rows.stop, rows.start + offset + piece_rows))
            self._write(mask[:, :, offset : offset + len(piece)], piece, heads)

    def row_rules(self, mask: torch.Tensor, rows: range | tuple[int, ...]) -> torch.Tensor:
        """``mask`` (last two dims: query blocks ``rows``, KV blocks) after the pattern's row rules
        (causal: blocks after the query block dropped, its diagonal added; non-causal: a row left
        empty keeps its last block). ``rows``: a range, or a tuple of query blocks in any order
        (captured rows; their rule rows are computed once per builder)."""
        if self.causal:
            valid, diagonal = self._rule_rows(rows)
            return (mask & valid) | diagonal
        empty = ~mask.any(-1, keepdim=True)
        if bool(empty.any()):
            last = F.one_hot(torch.tensor(self.n_kv - 1, device=self.device), self.n_kv).bool()
            mask = mask | (empty & last)
        return mask

    def _rule_rows(self, rows: range | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal rule's valid and diagonal rows for query blocks ``rows``."""
        geometry = (self.seq_q, self.seq_k, self.block_q, self.block_k, rows, self.device)
        if isinstance(rows, range):  # streamed once each: not worth keeping
            return causal_block_rows(*geometry), diagonal_block_rows(*geometry)
        if rows not in self._rules_at:  # captured rows: the same tuples come back for every head chunk
            self._rules_at[rows] = (causal_block_rows(*geometry), diagonal_block_rows(*geometry))
        return self._rules_at[rows]

    def _write(self, mask: torch.Tensor, rows: range, heads: range) -> None:
        mask = self.row_rules(mask, rows)
        counts, columns = mask_rows_to_lists(mask)  # sorted lists padded with 0 to the widest row
        del mask
        width = columns.shape[-1]
        self._counts[:, heads.start : heads.stop, rows.start : rows.stop] = counts
        self._rows_written += len(heads) * len(rows)
        if self.compact:  # the kept entries only, row-major; the table is filled by finish()
            slots = torch.arange(1, width + 1, dtype=torch.int32, device=self.device)
            self._width = max(self._width, width)
            self._pieces.append((heads, rows, width, columns[slots <= counts[..., None]]))
            return
        self._widen(width)
        self._indices[:, heads.start : heads.stop, rows.start : rows.stop, :width] = columns

    def _widen(self, width: int) -> None:
        current = self._indices.shape[-1]
        if width > current:
            wider = torch.zeros((*self._indices.shape[:-1], width), dtype=torch.int32, device=self.device)
            wider[..., :current] = self._indices
            self._indices = wider

    def finish(self) -> BlockSparsePattern:
        """The pattern; valid by construction, so it is marked validated for this mode."""
        expected = self.heads * self.n_q
        if self._rows_written != expected:
            raise RuntimeError(
                f"pattern assembled from {self._rows_written} (head, query block) rows, expected {expected}"
            )
        if self.compact:
            self._indices = torch.zeros(
                (self.batch, self.heads, self.n_q, self._width), dtype=torch.int32, device=self.device
            )
            while self._pieces:  # each piece freed as soon as it is in the table
                heads, rows, width, kept = self._pieces.pop()
                counts = self._counts[:, heads.start : heads.stop, rows.start : rows.stop]
                slots = torch.arange(width, dtype=torch.int32, device=self.device)
                view = self._indices[:, heads.start : heads.stop, rows.start : rows.stop, :width]
                view.masked_scatter_(slots < counts[..., None], kept)
                del kept
        self._widen(1)
        pattern = BlockSparsePattern(
            kv_counts=self._counts,
            kv_indices=self._indices,
            block_q=self.block_q,
            block_k=self.block_k,
            seq_q=self.seq_q,
            seq_k=self.seq_k,
        )
        pattern._cache[("validated", self.causal)] = True
        return pattern


def stream_pattern(
    mask_rows: Callable[[range], torch.Tensor],
    *,
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool,
    device,
    row_elements: int,
    rows_multiple: int = 1,
    static: bool = False,
    block_lists: bool = False,
) -> BlockSparsePattern:
    """A pattern from ``mask_rows(q_blocks)``, called once per chunk of query blocks, last chunk first.

    ``mask_rows`` returns bool ``(batch, heads, len(q_blocks), n_kv_blocks)`` (or a shape that
    broadcasts to it) for the contiguous ``range`` of query blocks it is given. ``row_elements``
    is the float32 size of one query block's row in the largest tensor ``mask_rows`` holds
    (typically ``batch * heads * n_kv_blocks``); chunks hold ``CHUNK_ELEMENTS // row_elements``
    query blocks (at least one), rounded down to a multiple of ``rows_multiple`` (at least
    one multiple): a rule that shares a choice among groups of ``rows_multiple`` query blocks
    then sees whole groups, each chunk starting at a multiple of it. ``static``: the rule reads
    the geometry only, no scores (sink/window/distance patterns); under :func:`capture_rows` the
    whole pattern is then built and returned, since a few chunks of such rows cost less than
    a call per captured block (on an H200 at 1M tokens ``streaming``'s whole pattern took
    3.1 ms, its sixteen captured blocks 14-23 ms, all launch overhead). ``block_lists``:
    ``mask_rows`` also takes a tuple of query blocks; under :func:`capture_rows` it is then
    called once (once per chunk's worth of blocks) instead of once per captured block (HiP's tree search made ~350 launches per
    call: 198 ms for sixteen blocks at 1M tokens, 10 ms of it on the GPU). With ``rows_multiple``
    1 the tuple is the captured blocks in their order; otherwise it is the whole groups holding
    them, ascending (so only its last group can be short: the sequence's last).
    """
    builder = PatternBuilder(
        batch=batch,
        heads=heads,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=device,
    )
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, row_elements * rows_multiple)) * rows_multiple
    captured = _captured_blocks(builder.n_q)
    if captured is not None and rows_per_chunk < builder.n_q and not static:  # several chunks: captured blocks only
        if block_lists:  # calls of at most one chunk's blocks (the working set of a chunk)
            starts = sorted({block - block % rows_multiple for block in captured})
            groups = [tuple(range(start, min(builder.n_q, start + rows_multiple))) for start in starts]
            if rows_multiple == 1:
                groups = [(block,) for block in captured]  # the captured order
            calls, current = [], ()
            for group in groups:
                if current and len(current) + len(group) > rows_per_chunk:
                    calls.append(current)
                    current = ()
                current += group
            calls.append(current)
            mask = torch.cat(
                [mask_rows(blocks).expand(batch, heads, len(blocks), builder.n_kv) for blocks in calls], dim=2
            )
            blocks = tuple(block for call in calls for block in call)
            if blocks != captured:
                where = torch.as_tensor([blocks.index(block) for block in captured], device=mask.device)
                mask = mask.index_select(2, where)
            raise RowsCaptured(builder.row_rules(mask, captured), captured)
        pieces = []
        for block in captured:  # each in its group of rows_multiple blocks, as the chunks see it
            start = block - block % rows_multiple
            rows = range(start, min(builder.n_q, start + rows_multiple))
            mask = mask_rows(rows).expand(batch, heads, len(rows), builder.n_kv)
            pieces.append(mask[:, :, block - start : block - start + 1])
            del mask
        raise RowsCaptured(builder.row_rules(torch.cat(pieces, dim=2), captured), captured)
    for rows in query_block_chunks(builder.n_q, rows_per_chunk):
        builder.add(mask_rows(rows), rows=rows)
    return builder.finish()


def stream_pattern_by_heads(
    mask_heads: Callable[[range], torch.Tensor],
    *,
    batch: int,
    heads: int,
    group: int,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool,
    device,
    head_elements: int,
) -> BlockSparsePattern:
    """A pattern from ``mask_heads(query_heads)``, called once per chunk of query heads (every query block).

    For rules that select over a whole head at once. Chunks are whole GQA groups or lie within
    one (``group`` query heads per KV head; :func:`sparse_attn.ops.gqa.head_chunks`) and hold
    ``CHUNK_ELEMENTS // head_elements`` heads (at least one), ``head_elements`` being the float32
    size of one head in the largest tensor ``mask_heads`` holds (typically
    ``batch * n_q_blocks * n_kv_blocks``). ``mask_heads`` returns bool
    ``(batch, len(query_heads), n_q_blocks, n_kv_blocks)``.
    """
    builder = PatternBuilder(
        batch=batch,
        heads=heads,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=device,
        compact=True,
    )
    chunks = head_chunks(heads, group, max(1, CHUNK_ELEMENTS // max(1, head_elements)))
    captured = _captured_blocks(builder.n_q) if len(chunks) > 1 else None
    pieces = []
    if captured is not None:
        rows = torch.as_tensor(captured, dtype=torch.int64, device=builder.device)
    for query_heads in chunks:
        mask = mask_heads(query_heads)
        if captured is None:
            builder.add(mask, rows=range(builder.n_q), heads=query_heads)
            continue
        mask = mask.expand(batch, len(query_heads), builder.n_q, builder.n_kv)
        pieces.append(builder.row_rules(mask.index_select(2, rows), captured))
        del mask
    if captured is not None:
        raise RowsCaptured(torch.cat(pieces, dim=1), captured)
    return builder.finish()
