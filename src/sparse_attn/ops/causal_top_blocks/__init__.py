"""Per query token, the top-n causally visible key blocks by score, with forced first and local blocks.

The list-building step of token-level block selection (NSA's selected branch, arXiv:2502.11089,
Section 3.3: "1 initial block and 2 local blocks" always attended, the top-n blocks by importance
score beside them): it turns a chunk of float32 block scores straight into a
:class:`~sparse_attn.pattern.BlockSparsePattern`'s lists (``block_q = 1``), ascending, with their
counts, so no boolean mask, cumulative sum or search over all ``(row, block)`` pairs is made.

Rule, for row ``t`` (the query at key position ``p = first_pos + t``) of each batch and head,
``own = p // block``:

- blocks ``j > own`` are not eligible (causal);
- forced blocks, ranked first: ``j < initial`` and ``own - local < j <= own`` (``local >= 1``, so
  the query's own block, which holds its causal diagonal, is always listed);
- the other blocks ``j <= own`` are ranked by ``scores[..., t, j]`` when ``p >= ranked_from``
  (earlier rows rank nothing and keep only their forced blocks); a score of ``-inf`` or NaN is
  not eligible;
- the best ``top_n`` eligible blocks by rank are listed (ties: the lower block index first, so
  the result is deterministic), in ascending block order, zeros past the count.

Reference: :mod:`.naive` (a stable sort). Kernel: :mod:`.triton` (one launch; rows of up to
:data:`.triton.MAX_BLOCKS` blocks), chosen on CUDA by the rule of :mod:`sparse_attn.ops._dispatch`;
longer rows fall back to the reference with a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

from ...checks import check_int
from .._dispatch import kernel_for
from .naive import causal_top_blocks_reference

__all__ = ["causal_top_blocks", "causal_top_blocks_reference"]


def _check_output(name: str, tensor, shape: tuple[int, ...], device) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on the scores' device {device}, got {tensor.device}")
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def causal_top_blocks(
    scores: torch.Tensor,
    *,
    first_pos: int,
    block: int,
    top_n: int,
    initial: int = 0,
    local: int = 1,
    ranked_from: int = 0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_n`` block lists (the rule in the module docstring) of float32 ``scores`` ``(B, H, c, n_blocks)``.

    Returns ``indices`` int32 ``(B, H, c, top_n)`` and ``counts`` int32 ``(B, H, c)``; with
    ``out=(indices, counts)`` (e.g. slices of a whole pattern's tensors) they are written there.

    Example (NSA's selection of one chunk of rows)::

        indices, counts = causal_top_blocks(block_scores, first_pos=start, block=64, top_n=16,
                                            initial=1, local=2, ranked_from=31)
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype != torch.float32 or scores.dim() != 4:
        raise ValueError(f"scores must be a float32 (B, H, c, n_blocks) tensor, got {scores.dtype} {tuple(scores.shape)}")
    check_int("first_pos", first_pos, minimum=0)
    check_int("block", block)
    check_int("top_n", top_n)
    check_int("initial", initial, minimum=0)
    check_int("local", local)
    check_int("ranked_from", ranked_from, minimum=0)
    batch, heads, rows, n_blocks = scores.shape
    last = first_pos + rows - 1
    if rows and n_blocks <= last // block:
        raise ValueError(f"scores has {n_blocks} blocks; row {rows - 1} (position {last}) needs {last // block + 1}")
    if out is None:
        out = (
            torch.empty((batch, heads, rows, top_n), dtype=torch.int32, device=scores.device),
            torch.empty((batch, heads, rows), dtype=torch.int32, device=scores.device),
        )
    indices, counts = out
    _check_output("out[0] (indices)", indices, (batch, heads, rows, top_n), scores.device)
    _check_output("out[1] (counts)", counts, (batch, heads, rows), scores.device)
    options = dict(first_pos=first_pos, block=block, top_n=top_n, initial=initial, local=local, ranked_from=ranked_from)
    kernel = kernel_for(scores, __package__)
    if kernel is not None:
        kernel.causal_top_blocks_triton(scores, indices, counts, **options)
        return indices, counts
    if scores.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        reason = importlib.import_module(".triton", __package__).unsupported_reason(scores)
        warnings.warn(f"causal_top_blocks: {reason}; using the PyTorch reference", stacklevel=2)
    reference_indices, reference_counts = causal_top_blocks_reference(scores, **options)
    indices.copy_(reference_indices)
    counts.copy_(reference_counts)
    return indices, counts
