"""Shared machinery of the dynamic estimators: scoring, selection and pattern building.

Every estimator is a composition of the pieces here, so no method repeats another's loop:

* scoring: :func:`mean_pool_blocks` + :func:`pooled_block_logits` (pooled q·k per block pair),
  :func:`antidiagonal_block_probs` (XAttention's strided antidiagonal scoring, softmax-normalized
  and summed per block), :func:`probe_last_queries` (exact softmax of the last queries against
  every key, reduced to vertical / slash / per-block sums);
* selection: :func:`cumulative_mass_mask` (fewest entries reaching a share of the mass, with
  min / max budgets), :func:`topk_mask` (both sort-based here, and on CUDA a sort-free Triton
  kernel, :mod:`._select_triton`), :func:`vertical_slash_block_mask` (the blocks that
  chosen columns and diagonals cross);
* patterns: :func:`block_mask_to_pattern` (causal validity and diagonal via ``from_mask``).

Geometry follows :mod:`sparse_attn.pattern`: KV blocks are cut from key position 0, query
blocks from the first query, and the queries are the last ``Sq`` of ``Sk`` positions.
Nothing here materializes an ``Sq x Sk`` tensor: full-resolution scores exist only for a
few probe rows, chunked over heads, and everything else is per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import causal_block_mask, num_blocks
from ..pattern import BlockSparsePattern
from ._select_triton import cumulative_mass_mask_triton, topk_by_rank_mask_triton, triton_selection_available

# Float32 working memory of one chunked step (256 MiB): the chunk's largest tensor is held
# to a quarter of it where softmax-style temporaries follow, to all of it where none do.
CHUNK_ELEMENTS = 1 << 26


# Validation helpers for the config dataclasses -----------------------------------------
def check_int(name: str, value, *, minimum: int, allow_none: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_fraction(name: str, value, *, allow_none: bool = False, open_low: bool = True) -> None:
    """Raise unless ``value`` is a float in ``(0, 1]`` (or ``[0, 1]`` when not ``open_low``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    low_ok = value > 0.0 if open_low else value >= 0.0
    if math.isnan(value) or not low_ok or value > 1.0:
        raise ValueError(f"{name} must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value}")


# Heads -------------------------------------------------------------------------------
def gqa_group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per KV head."""
    return q.shape[1] // k.shape[1]


def grouped_matmul(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` per query head without expanding K over its GQA group.

    q ``(B, Hq, M, D)``, k ``(B, Hkv, N, D)`` -> ``(B, Hq, M, N)`` in q's dtype. Query head
    ``h`` uses KV head ``h // group``, which is the order of a ``(Hkv, group)`` reshape.
    """
    batch, q_heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, (q_heads // kv_heads) * rows, dim)
    return torch.matmul(grouped, k.transpose(-1, -2)).view(batch, q_heads, rows, k.shape[2])


# Pooling and pooled scores ------------------------------------------------------------
def mean_pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` positions, float32 ``(B, H, n_blocks, D)``.

    A last partial block is averaged over its real positions only.
    """
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    whole = length // block
    # No padded or float32 copy of the whole sequence (at 128K tokens and 32 heads one would
    # take 2 GiB): full blocks are summed from a view, the partial block separately, a few
    # heads at a time so any float32 temporary stays under CHUNK_ELEMENTS.
    heads_per_chunk = max(1, CHUNK_ELEMENTS // max(1, batch * length * dim))
    sums = torch.empty((batch, heads, n, dim), dtype=torch.float32, device=x.device)
    for first in range(0, heads, heads_per_chunk):
        part = x[:, first : first + heads_per_chunk]
        chunk = part.shape[1]
        if whole:
            blocks = part[:, :, : whole * block].reshape(batch, chunk, whole, block, dim)
            sums[:, first : first + chunk, :whole] = blocks.sum(3, dtype=torch.float32)
        if whole < n:
            tail = part[:, :, whole * block :]
            sums[:, first : first + chunk, whole:] = tail.sum(2, keepdim=True, dtype=torch.float32)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = length - (n - 1) * block
    return sums / counts[:, None]


def masked_fill_invalid(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~valid, float("-inf"))


def pooled_block_logits(
    q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int, scale: float, causal: bool
) -> torch.Tensor:
    """Scaled ``mean_pool(q) · mean_pool(k)`` per block pair, float32 ``(B, Hq, n_q, n_kv)``.

    Causally invalid block pairs are ``-inf``; every row keeps at least its diagonal.
    """
    pooled_q = mean_pool_blocks(q, block_q)
    pooled_k = mean_pool_blocks(k, block_k)
    logits = grouped_matmul(pooled_q, pooled_k) * scale
    if causal:
        valid = causal_block_mask(q.shape[2], k.shape[2], block_q, block_k, q.device)
        logits = masked_fill_invalid(logits, valid)
    return logits


def block_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in float32 (rows always hold a finite entry here)."""
    return torch.softmax(logits.float(), dim=-1)


# Selection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How many entries a row may keep: at least ``minimum``, at most ``maximum`` (None: no cap)."""

    minimum: int = 1
    maximum: int | None = None


def _rank_mask(order: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Bool mask with True at the first ``keep_count`` entries of each row's ``order``."""
    slots = torch.arange(order.shape[-1], device=order.device)
    keep_sorted = slots < keep_count[..., None]
    return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(-1, order, keep_sorted)


_SCAN_PIECE = 1024


def _row_cumsum(values: torch.Tensor) -> torch.Tensor:
    """``cumsum`` over the last dim of 2-D ``values``; long rows are scanned in pieces.

    A GPU scan over a few very long rows runs on a handful of thread blocks (at 128K
    tokens a whole head's block scores are one row of a million entries); scanning
    ``_SCAN_PIECE``-long pieces and adding each piece's exclusive prefix is parallel.
    """
    rows, length = values.shape
    if length < 64 * _SCAN_PIECE:
        return torch.cumsum(values, dim=-1)
    pieces = -(-length // _SCAN_PIECE)
    padded = F.pad(values, (0, pieces * _SCAN_PIECE - length)).view(rows, pieces, _SCAN_PIECE)
    within = torch.cumsum(padded, dim=-1)
    before = torch.cumsum(within[..., -1], dim=-1) - within[..., -1]
    return (within + before[..., None]).view(rows, -1)[:, :length]


def _cumulative_mass_rows(scores: torch.Tensor, threshold: float, budget: Budget) -> torch.Tensor:
    values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    cumulative = _row_cumsum(values)
    total = cumulative[..., -1:]
    # Keep every entry whose preceding mass is still short of the target (the entry that
    # crosses the threshold is kept).
    preceding = cumulative - values
    keep_count = (preceding < threshold * total).sum(-1)
    keep_count = keep_count.clamp(min=budget.minimum)
    if budget.maximum is not None:
        keep_count = keep_count.clamp(max=budget.maximum)
    return _rank_mask(order, keep_count)


def cumulative_mass_mask(scores: torch.Tensor, threshold: float, budget: Budget = Budget()) -> torch.Tensor:
    """Per row (last dim), the fewest highest entries whose sum reaches ``threshold`` of the row's sum.

    ``scores`` are non-negative (probabilities or masses; invalid entries 0). The budget
    clamps the count per row. Returns bool of ``scores``' shape. Ties are broken by index
    (stable sort), so the result is deterministic. Rows are processed in chunks to bound
    the sort's memory. On CUDA, rows of up to ``_select_triton.MAX_ROW`` entries go through
    the Triton selection kernel instead (same rule, no sort).
    """
    if _on_gpu_selection(scores):
        return cumulative_mass_mask_triton(scores, threshold, minimum=budget.minimum, maximum=budget.maximum)
    scores = scores.float()
    flat = scores.reshape(-1, scores.shape[-1])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (4 * flat.shape[-1]))
    pieces = [_cumulative_mass_rows(chunk, threshold, budget) for chunk in flat.split(rows_per_chunk)]
    return torch.cat(pieces).view(scores.shape)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row (last dim), the ``k`` highest entries (all of them when the row is shorter)."""
    k = min(k, scores.shape[-1])
    return topk_by_rank_mask(scores, torch.full(scores.shape[:-1], k, device=scores.device))


def topk_by_rank_mask(ranking: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Per row, the ``keep_count[row]`` entries ranked highest by ``ranking`` (ties: lower index first)."""
    if _on_gpu_selection(ranking):
        return topk_by_rank_mask_triton(ranking, keep_count)
    _, order = torch.sort(ranking.float(), dim=-1, descending=True, stable=True)
    return _rank_mask(order, keep_count)


def _on_gpu_selection(scores: torch.Tensor) -> bool:
    """CUDA rows short enough for the Triton selection kernel (CPU keeps the sort-based reference)."""
    return scores.device.type == "cuda" and triton_selection_available(scores)


# Antidiagonal scoring (XAttention) ----------------------------------------------------
def strided_cells(x: torch.Tensor, stride: int, *, reverse: bool) -> torch.Tensor:
    """Group ``stride`` consecutive positions into one cell vector: ``(B, H, ceil(S / stride), stride * D)``.

    With ``reverse`` the positions of a cell are taken last-to-first. A query cell taken in
    reverse dotted with a key cell taken in order is the sum of the ``stride`` products on
    the cell pair's antidiagonal: ``sum_i q[a*stride + stride-1-i] · k[b*stride + i]``. The
    sequence is zero-padded to whole cells (padded positions add nothing to the sum).
    """
    batch, heads, length, dim = x.shape
    cells = num_blocks(length, stride)
    padded = F.pad(x, (0, 0, 0, cells * stride - length)).view(batch, heads, cells, stride, dim)
    if reverse:
        padded = padded.flip(3)
    return padded.reshape(batch, heads, cells, stride * dim)


def antidiagonal_visibility(
    seq_q: int, seq_k: int, stride: int, *, causal: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query cell, the last query position, and per key cell, the first key position.

    A key cell is visible from a query cell when its first key is at or before the query
    cell's last query (the cell pair's antidiagonal then reaches at least one past key).
    """
    offset = seq_k - seq_q
    q_cells, k_cells = num_blocks(seq_q, stride), num_blocks(seq_k, stride)
    last_query = torch.clamp((torch.arange(q_cells, device=device) + 1) * stride, max=seq_q) - 1 + offset
    first_key = torch.arange(k_cells, device=device) * stride
    if not causal:
        last_query = torch.full_like(last_query, seq_k)
    return last_query, first_key


def cells_to_block_probs(cell_probs: torch.Tensor, cells_per_q_block: int) -> torch.Tensor:
    """Average per-cell softmax rows ``(B, H, cells, n_kv)`` over the cells of each query block.

    The cells start at a query-block boundary; a last partial block is averaged over the
    cells it has. Each returned row ``(B, H, ceil(cells / cells_per_q_block), n_kv)`` sums to 1.
    """
    batch, heads, cells, n_kv = cell_probs.shape
    n_q = num_blocks(cells, cells_per_q_block)
    padded = F.pad(cell_probs, (0, 0, 0, n_q * cells_per_q_block - cells))
    sums = padded.view(batch, heads, n_q, cells_per_q_block, n_kv).sum(3)
    cells_in_block = torch.full((n_q,), float(cells_per_q_block), device=cell_probs.device)
    cells_in_block[-1] = cells - (n_q - 1) * cells_per_q_block
    return sums / cells_in_block[:, None]


def antidiagonal_block_probs_reference(
    q: torch.Tensor, k: torch.Tensor, *, stride: int, block_q: int, block_k: int, scale: float, causal: bool
) -> torch.Tensor:
    """XAttention's block importance in plain PyTorch, float32 ``(B, Hq, n_q, n_kv)``, rows summing to 1.

    Each cell pair scores ``scale / stride * (antidiagonal sum)``; each query cell's scores
    are softmax-normalized over its visible key cells, summed per KV block, and averaged
    over the query cells of the query block. Chunked over query cells (one pass, no
    ``Sq x Sk`` tensor: cells are ``stride``x coarser on each side). Block sizes must be
    multiples of ``stride``.
    """
    seq_q, seq_k = q.shape[2], k.shape[2]
    query_cells = strided_cells(q, stride, reverse=True)
    key_cells = strided_cells(k, stride, reverse=False)
    last_query, first_key = antidiagonal_visibility(seq_q, seq_k, stride, causal=causal, device=q.device)
    batch, q_heads = q.shape[:2]
    k_cells = key_cells.shape[2]
    cells_per_kv_block = block_k // stride
    n_kv = num_blocks(seq_k, block_k)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (4 * batch * q_heads * k_cells))
    # Whole query blocks per chunk keeps the block sums local to a chunk.
    rows_per_chunk = max(block_q // stride, rows_per_chunk - rows_per_chunk % (block_q // stride))
    pieces = []
    for start in range(0, query_cells.shape[2], rows_per_chunk):
        stop = min(query_cells.shape[2], start + rows_per_chunk)
        logits = grouped_matmul(query_cells[:, :, start:stop], key_cells).float() * (scale / stride)
        visible = first_key[None, :] <= last_query[start:stop, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        padded = F.pad(probs, (0, n_kv * cells_per_kv_block - k_cells))
        cell_probs = padded.view(batch, q_heads, stop - start, n_kv, cells_per_kv_block).sum(-1)
        pieces.append(cells_to_block_probs(cell_probs, block_q // stride))
        del logits, probs, padded, cell_probs
    return torch.cat(pieces, dim=2)


# Last-query probing ------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSums:
    """Exact attention of the last ``num_queries`` queries, reduced (float32, summed over those queries).

    ``vertical[b, h, t]``: mass on key ``t``; ``slash[b, h, o]``: mass on the diagonal at
    distance ``o = query position - key position``; ``block[b, h, j]``: mass on KV block ``j``.
    Each query's softmax sums to 1, so each reduction sums to ``num_queries``.
    """

    vertical: torch.Tensor
    slash: torch.Tensor
    block: torch.Tensor
    num_queries: int


def _slash_sums(probs: torch.Tensor) -> torch.Tensor:
    """Sum causal ``probs`` (…, L, Sk) of the last L positions along diagonals: (…, Sk) indexed by distance.

    Row ``r`` sits at position ``p = Sk - L + r``; its key ``t`` lies at distance
    ``o = p - t``. With ``u = Sk - 1 - o``, row ``r`` holds distance ``o`` at column
    ``u + r + 1 - L``, i.e. at flat offset ``r * (Sk + 1) + u + 1 - L``: a shear, read as an
    ``as_strided`` view with row stride ``Sk + 1`` and no copy. Where the column is negative
    the view reads the end of the previous row, which holds that row's future keys: zeros
    under the causal mask, exactly what a distance beyond the row's position must add. Only
    row 0 has no previous row; it is added separately.
    """
    *lead, rows, seq_k = probs.shape
    probs = probs.contiguous()
    by_u = probs[..., 0, :].new_zeros(probs.shape[:-2] + (seq_k,))
    by_u[..., rows - 1 :] = probs[..., 0, : seq_k - rows + 1]
    if rows > 1:
        sheared = probs.as_strided(
            size=(*lead, rows - 1, seq_k),
            stride=(*probs.stride()[:-2], seq_k + 1, 1),
            storage_offset=probs.storage_offset() + seq_k + 2 - rows,
        )
        by_u += sheared.sum(-2)
    return by_u.flip(-1)


def _head_chunks(q_heads: int, group: int, heads_per_chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` query-head ranges of at most ``heads_per_chunk`` heads, each within one KV
    head or made of whole GQA groups (so a chunk reads one contiguous range of KV heads)."""
    if heads_per_chunk >= group:
        size = (heads_per_chunk // group) * group
    else:
        size = max(divisor for divisor in range(1, group + 1) if group % divisor == 0 and divisor <= heads_per_chunk)
    return [(start, min(q_heads, start + size)) for start in range(0, q_heads, size)]


def probe_last_queries(
    q: torch.Tensor, k: torch.Tensor, *, num_queries: int, block_k: int, scale: float, causal: bool
) -> ProbeSums:
    """Softmax of the last ``num_queries`` queries against all keys, reduced to :class:`ProbeSums`.

    Chunked over query heads so that the full-resolution probe rows of a chunk stay under
    half of :data:`CHUNK_ELEMENTS` floats.
    """
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    rows = min(num_queries, seq_q)
    group = gqa_group(q, k)
    probe = q[:, :, seq_q - rows :]
    # Only the last `rows` keys can lie in a probe row's future.
    tail = torch.arange(rows, device=q.device)
    future = tail[None, :] > tail[:, None]
    # A (1,)-shaped float32 factor: one kernel both scales and upcasts 16-bit logits.
    scale_factor = torch.tensor([scale], dtype=torch.float32, device=q.device)
    heads_per_chunk = max(1, CHUNK_ELEMENTS // (2 * batch * rows * seq_k))
    vertical, slash = [], []
    for start, stop in _head_chunks(q_heads, group, heads_per_chunk):
        kv_start, kv_stop = start // group, max(start // group + 1, stop // group)
        logits = _chunk_logits(probe[:, start:stop], k[:, kv_start:kv_stop]) * scale_factor
        if causal:
            logits[..., seq_k - rows :].masked_fill_(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        del logits
        vertical.append(probs.sum(-2))
        slash.append(_slash_sums(probs) if causal else torch.zeros_like(probs[..., 0, :]))
        del probs
    vertical_sums = torch.cat(vertical, dim=1)
    block_sums = block_sum(vertical_sums, block_k)
    return ProbeSums(vertical=vertical_sums, slash=torch.cat(slash, dim=1), block=block_sums, num_queries=rows)


def _chunk_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` for a head chunk: whole groups, or part of one group sharing a single KV head."""
    if k.shape[1] == 1:
        return torch.matmul(q, k.transpose(-1, -2))
    return grouped_matmul(q, k)


def block_sum(per_key: torch.Tensor, block_k: int) -> torch.Tensor:
    """Sum a per-key tensor ``(…, Sk)`` over KV blocks -> ``(…, n_kv_blocks)``."""
    seq_k = per_key.shape[-1]
    n = num_blocks(seq_k, block_k)
    padded = F.pad(per_key, (0, n * block_k - seq_k))
    return padded.view(*per_key.shape[:-1], n, block_k).sum(-1)


# Sampled query rows ------------------------------------------------------------------
def sampled_query_rows(seq_q: int, block_q: int, every: int, device) -> torch.Tensor:
    """Query rows ``every-1, 2*every-1, ...`` within each query block, plus each block's last row.

    int64, sorted, unique. Sampling restarts at every block, so every query block (even a
    short last one) has at least one row, its last, which sees the most keys.
    """
    n_q = num_blocks(seq_q, block_q)
    block_starts = torch.arange(n_q, device=device) * block_q
    in_block = torch.arange(every - 1, block_q, every, device=device)
    rows = (block_starts[:, None] + in_block[None, :]).reshape(-1)
    last_rows = torch.clamp(block_starts + block_q, max=seq_q) - 1
    rows = torch.cat([rows[rows < seq_q], last_rows])
    return torch.unique(rows)


def max_row_block_probs(
    q_rows: torch.Tensor,
    row_positions: torch.Tensor,
    k: torch.Tensor,
    *,
    row_blocks: torch.Tensor,
    n_q: int,
    block_k: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Exact per-row softmax mass on each KV block, maximized over the rows of each query block.

    q_rows ``(B, Hq, R, D)`` at absolute ``row_positions`` ``(R,)``, k ``(B, Hkv, Sk, D)``;
    ``row_blocks`` ``(R,)`` is each row's query block. Returns float32 ``(B, Hq, n_q, n_kv)``:
    the largest share of its attention that any sampled row of the query block puts on the
    KV block. Chunked over rows (the full-resolution logits of a chunk stay under
    :data:`CHUNK_ELEMENTS`).
    """
    batch, heads, rows, _ = q_rows.shape
    seq_k = k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    key_positions = torch.arange(n_kv * block_k, device=k.device)
    out = torch.zeros((batch, heads, n_q, n_kv), device=k.device)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (4 * batch * heads * n_kv * block_k))
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        logits = grouped_matmul(q_rows[:, :, start:stop], k).float() * scale
        logits = F.pad(logits, (0, n_kv * block_k - seq_k), value=float("-inf"))
        if causal:
            future = key_positions[None, :] > row_positions[start:stop, None]
            logits.masked_fill_(future, float("-inf"))
        block_lse = torch.logsumexp(logits.view(batch, heads, stop - start, n_kv, block_k), dim=-1)
        probs = torch.exp(block_lse - torch.logsumexp(block_lse, dim=-1, keepdim=True))
        index = row_blocks[start:stop].view(1, 1, -1, 1).expand_as(probs)
        out.scatter_reduce_(2, index, probs, reduce="amax")
        del logits, block_lse, probs
    return out


# Vertical + slash -> blocks -----------------------------------------------------------
def _inclusive_counts(prefix: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Number of set entries in ``[low, high]`` from an exclusive prefix count ``(…, L + 1)``.

    ``low``/``high`` broadcast to ``(n_q, n_kv)``; empty ranges (high < low) count 0.
    """
    length = prefix.shape[-1] - 1
    low_c = low.clamp(0, length)
    high_c = (high + 1).clamp(0, length)
    lead = prefix.shape[:-1]
    shape = (*lead, *torch.broadcast_shapes(low.shape, high.shape))
    flat_low = low_c.expand(shape[len(lead) :]).reshape(-1)
    flat_high = high_c.expand(shape[len(lead) :]).reshape(-1)
    upper = prefix.index_select(-1, flat_high).view(shape)
    lower = prefix.index_select(-1, flat_low).view(shape)
    return (upper - lower).clamp(min=0)


def _exclusive_prefix(selected: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(selected.to(torch.int32), dim=-1), (1, 0))


def vertical_slash_block_mask(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    *,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool = True,
) -> torch.Tensor:
    """The blocks that selected key columns and diagonals cross, bool ``(B, H, n_q, n_kv)``.

    ``vertical`` bool ``(B, H, Sk)``: selected key positions. ``slash`` bool ``(B, H, Sk)``:
    selected distances ``o = query position - key position``. Block ``(i, j)`` is covered
    when a selected column in block ``j`` is at or before the block's last query, or when a
    selected distance joins a query of block ``i`` to a key of block ``j``. Counted with
    prefix sums, so the cost is ``O(n_q * n_kv)`` per head whatever the number of lines.
    """
    device = vertical.device
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    # The prefix-count lookups hold a few int32 (n_q, n_kv) tensors per head: a few heads at a time.
    batch, heads = vertical.shape[:2]
    heads_per_chunk = max(1, CHUNK_ELEMENTS // (8 * batch * n_q * n_kv))
    if heads > heads_per_chunk:
        out = torch.empty((batch, heads, n_q, n_kv), dtype=torch.bool, device=device)
        for first in range(0, heads, heads_per_chunk):
            part = slice(first, first + heads_per_chunk)
            out[:, part] = vertical_slash_block_mask(
                vertical[:, part], slash[:, part], seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k,
                causal=causal,
            )  # fmt: skip
        return out
    offset = seq_k - seq_q
    q_first = torch.arange(n_q, device=device) * block_q + offset
    q_last = torch.clamp(q_first - offset + block_q, max=seq_q) - 1 + offset
    k_first = torch.arange(n_kv, device=device) * block_k
    k_last = torch.clamp(k_first + block_k, max=seq_k) - 1

    columns_low = k_first[None, :].expand(n_q, n_kv)
    columns_high = torch.minimum(k_last[None, :], q_last[:, None]) if causal else k_last[None, :].expand(n_q, n_kv)
    crossed_columns = _inclusive_counts(_exclusive_prefix(vertical), columns_low, columns_high) > 0
    if not causal:  # distances are only defined looking back
        return crossed_columns

    distance_low = (q_first[:, None] - k_last[None, :]).clamp(min=0)
    distance_high = q_last[:, None] - k_first[None, :]
    crossed_diagonals = _inclusive_counts(_exclusive_prefix(slash), distance_low, distance_high) > 0
    return crossed_columns | crossed_diagonals


# Patterns ----------------------------------------------------------------------------
def block_mask_to_pattern(
    mask: torch.Tensor, *, seq_q: int, seq_k: int, block_q: int, block_k: int, causal: bool
) -> BlockSparsePattern:
    """A pattern from a bool block mask ``(B, H, n_q, n_kv)``; causal mode drops future blocks, adds diagonals.

    In non-causal mode a row left empty keeps its highest-numbered block, so the result is valid.
    """
    if not causal:
        empty = ~mask.any(-1, keepdim=True)
        if bool(empty.any()):
            last = torch.zeros_like(mask)
            last[..., -1] = True
            mask = mask | (empty & last)
    return BlockSparsePattern.from_mask(
        mask.contiguous(), block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal
    )


def default_scale(q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5
