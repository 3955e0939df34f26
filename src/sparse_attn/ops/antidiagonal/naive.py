"""Strided antidiagonal block scoring (XAttention) in PyTorch: the reference of :mod:`.triton` and the CPU path."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...geometry import num_blocks, query_block_positions
from .._chunking import CHUNK_ELEMENTS
from ..block_rows import query_block_range
from ..gqa import grouped_matmul
from ..lowbit import quantize_per_head, sequence_mean

__all__ = [
    "SCORE_PRECISIONS",
    "Fp8Keys",
    "antidiagonal_block_probs_reference",
    "antidiagonal_visibility",
    "cells_to_block_probs",
    "fp8_keys",
    "fp8_query_rows",
    "strided_cells",
]

# "input": products in the inputs' dtype (float32 accumulation); "fp8": e4m3 codes of q and of
# centred k with one scale per head (see fp8_keys).
SCORE_PRECISIONS = ("input", "fp8")


@dataclass(frozen=True)
class Fp8Keys:
    """Keys for fp8 scoring: e4m3 ``codes`` ``(B, Hkv, Sk, D)`` of ``k - mean(k)`` and their
    float32 per-head ``scale`` ``(B, Hkv)`` (``k - mean ≈ codes * scale``)."""

    codes: torch.Tensor
    scale: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, :, None, None]


def fp8_keys(k: torch.Tensor) -> Fp8Keys:
    """``k`` ``(B, Hkv, Sk, D)`` centred and quantised for fp8 scoring; made once per estimate.

    Centring is exact for antidiagonal scoring: it subtracts ``sum_i q[.] · mean`` from every
    score of a query cell, the same for all its key cells, and each query cell's scores go
    through a softmax over key cells. It shrinks the range the 3-bit mantissa must cover when
    keys share a large common component (as RoPE-rotated keys of real models do). One
    exception: a last key cell cut short by the sequence end is padded with zeros in centred
    space (keys equal to the mean) where 16-bit scoring pads with zero keys, so that cell's
    scores differ by the padded rows' ``q · mean`` (only when ``Sk`` is not a multiple of the
    stride; in causal scoring that cell is on the last query block's diagonal, always kept).
    """
    codes, scale = quantize_per_head(k, "fp8", center=sequence_mean(k))
    return Fp8Keys(codes, scale)


def fp8_query_rows(q_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``(B, Hq, rows, D)`` (the rows one call scores) as e4m3 codes and a float32
    ``(B, Hq)`` scale; not centred (a query offset changes scores per key cell)."""
    return quantize_per_head(q_rows, "fp8")


def check_score_precision(score_precision: str, keys: Fp8Keys | None, k: torch.Tensor) -> None:
    if score_precision not in SCORE_PRECISIONS:
        raise ValueError(f"score_precision must be one of {SCORE_PRECISIONS}, got {score_precision!r}")
    if keys is None:
        return
    if score_precision != "fp8":
        raise ValueError("keys_fp8 is only used with score_precision='fp8'")
    if not isinstance(keys, Fp8Keys) or keys.codes.shape != k.shape or keys.scale.shape != k.shape[:2]:
        raise ValueError(f"keys_fp8 must be fp8_keys(k) for k of shape {tuple(k.shape)}")


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
    """Per query cell, the last query position, and per key cell, the first key position (int64).

    A key cell is visible from a query cell when its first key is at or before the query
    cell's last query (the cell pair's antidiagonal then reaches at least one past key).
    """
    _, last_query = query_block_positions(seq_q, seq_k, stride, device)
    first_key = torch.arange(num_blocks(seq_k, stride), device=device) * stride
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
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
    score_precision: str = "input",
    keys_fp8: Fp8Keys | None = None,
) -> torch.Tensor:
    """XAttention's block importance of query blocks ``q_blocks`` (default: all), float32 ``(B, Hq, len(q_blocks), n_kv)``.

    Each cell pair scores ``scale / stride * (antidiagonal sum)``; each query cell's scores
    are softmax-normalized over its visible key cells, summed per KV block, and averaged
    over the query cells of the query block; rows sum to 1. Chunked over query cells (one
    pass, no ``Sq x Sk`` tensor: cells are ``stride``x coarser on each side); only the cells
    of ``q_blocks`` are scored. Block sizes must be multiples of ``stride``.

    ``score_precision="fp8"`` scores what an fp8 kernel sees: the range's queries quantised
    per head (:func:`fp8_query_rows`) and the keys centred and quantised per head
    (``keys_fp8``, default :func:`fp8_keys` of ``k``), dequantised to float32 here.
    """
    check_score_precision(score_precision, keys_fp8, k)
    seq_q, seq_k = q.shape[2], k.shape[2]
    rows = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    cells_per_q_block = block_q // stride
    first_cell = rows.start * cells_per_q_block
    q_rows = q[:, :, rows.start * block_q : rows.stop * block_q]
    if score_precision == "fp8":
        codes, q_scale = fp8_query_rows(q_rows)
        q_rows = codes.float() * q_scale[:, :, None, None]
        k = (keys_fp8 or fp8_keys(k)).dequantized()
    # Query blocks start on cell boundaries, so the range's queries are whole cells of their own.
    query_cells = strided_cells(q_rows, stride, reverse=True)
    key_cells = strided_cells(k, stride, reverse=False)
    last_query, first_key = antidiagonal_visibility(seq_q, seq_k, stride, causal=causal, device=q.device)
    last_query = last_query[first_cell : first_cell + query_cells.shape[2]]
    batch, q_heads = q.shape[:2]
    k_cells = key_cells.shape[2]
    cells_per_kv_block = block_k // stride
    n_kv = num_blocks(seq_k, block_k)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (4 * batch * q_heads * k_cells))
    # Whole query blocks per chunk keeps the block sums local to a chunk.
    rows_per_chunk = max(cells_per_q_block, rows_per_chunk - rows_per_chunk % cells_per_q_block)
    pieces = []
    for start in range(0, query_cells.shape[2], rows_per_chunk):
        stop = min(query_cells.shape[2], start + rows_per_chunk)
        logits = grouped_matmul(query_cells[:, :, start:stop], key_cells).float() * (scale / stride)
        visible = first_key[None, :] <= last_query[start:stop, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        padded = F.pad(probs, (0, n_kv * cells_per_kv_block - k_cells))
        cell_probs = padded.view(batch, q_heads, stop - start, n_kv, cells_per_kv_block).sum(-1)
        pieces.append(cells_to_block_probs(cell_probs, cells_per_q_block))
        del logits, probs, padded, cell_probs
    return torch.cat(pieces, dim=2)
