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

:func:`causal_top_blocks_gated` takes the scores as dot products of queries with one key per block
(MoBA's gate, ``q · mean(K[block])``, arXiv:2502.13189), summed over the query heads that share a
list, and computes them inside the kernel, so no score tensor is written at all.

Reference: :mod:`.naive` (a stable sort). Kernel: :mod:`.triton` (one launch; rows of up to
:data:`.triton.MAX_BLOCKS` blocks, and for the gated form up to :data:`.triton.MAX_GATED_KEYS`
pooled-key elements), chosen on CUDA by the rule of :mod:`sparse_attn.ops._dispatch`; longer rows
fall back to the reference (the gated form: to float32 products and :func:`causal_top_blocks`)
with a warning. The gated kernel takes 16-bit queries' products in their dtype (the block keys
rounded to it, float32 accumulation), so near-ties can rank differently than in float32.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

from ...checks import check_int
from .._chunking import CHUNK_ELEMENTS
from .._dispatch import kernel_for
from ..gqa import grouped_matmul
from .naive import causal_top_blocks_reference

__all__ = ["causal_top_blocks", "causal_top_blocks_gated", "causal_top_blocks_reference"]


def _check_output(name: str, tensor, shape: tuple[int, ...], device) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on the scores' device {device}, got {tensor.device}")
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_rule(rows: int, n_blocks: int, *, first_pos, block, top_n, initial, local, ranked_from) -> None:
    check_int("first_pos", first_pos, minimum=0)
    check_int("block", block)
    check_int("top_n", top_n)
    check_int("initial", initial, minimum=0)
    check_int("local", local)
    check_int("ranked_from", ranked_from, minimum=0)
    last = first_pos + rows - 1
    if rows and n_blocks <= last // block:
        raise ValueError(f"scores have {n_blocks} blocks; row {rows - 1} (position {last}) needs {last // block + 1}")


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
        raise ValueError(
            f"scores must be a float32 (B, H, c, n_blocks) tensor, got {scores.dtype} {tuple(scores.shape)}"
        )
    batch, heads, rows, n_blocks = scores.shape
    _check_rule(rows, n_blocks, first_pos=first_pos, block=block, top_n=top_n, initial=initial, local=local,
                ranked_from=ranked_from)  # fmt: skip
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


def causal_top_blocks_gated(
    q: torch.Tensor,
    keys: torch.Tensor,
    *,
    heads_per_list: int = 1,
    first_pos: int,
    block: int,
    top_n: int,
    initial: int = 0,
    local: int = 1,
    ranked_from: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_top_blocks` of the scores ``sum_{h in list} q_h · keys[kv(h)]``, computed in the kernel.

    q ``(B, Hq, c, D)``; keys ``(B, Hkv, n_blocks, D)`` float32 (one key per block, e.g.
    :func:`sparse_attn.ops.pooling.mean_pool_blocks` of K), ``Hq % Hkv == 0``; ``heads_per_list``
    is 1 (a list per query head) or the GQA group size (a list per KV head, its query heads'
    scores summed). Returns ``indices`` int32 ``(B, Hq / heads_per_list, c, top_n)`` and ``counts``.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(keys, torch.Tensor):
        raise TypeError(f"q and keys must be torch.Tensors, got {type(q).__name__} and {type(keys).__name__}")
    if q.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"q and keys must be 4-D (B, H, rows, D), got {tuple(q.shape)} and {tuple(keys.shape)}")
    if keys.dtype != torch.float32:
        raise TypeError(f"keys must be float32, got {keys.dtype}")
    if keys.device != q.device:
        raise ValueError(f"keys must be on q's device {q.device}, got {keys.device}")
    batch, q_heads, rows, dim = q.shape
    if keys.shape[0] != batch or keys.shape[3] != dim or keys.shape[1] < 1 or q_heads % keys.shape[1]:
        raise ValueError(f"keys {tuple(keys.shape)} do not match q {tuple(q.shape)} (same batch and D, Hq % Hkv == 0)")
    group = q_heads // keys.shape[1]
    if heads_per_list not in (1, group):
        raise ValueError(f"heads_per_list must be 1 or the GQA group size {group}, got {heads_per_list!r}")
    options = dict(first_pos=first_pos, block=block, top_n=top_n, initial=initial, local=local, ranked_from=ranked_from)
    _check_rule(rows, keys.shape[2], **options)
    heads = q_heads // heads_per_list
    out = (
        torch.empty((batch, heads, rows, top_n), dtype=torch.int32, device=q.device),
        torch.empty((batch, heads, rows), dtype=torch.int32, device=q.device),
    )
    kernel = kernel_for(q, __package__, keys=keys)
    if kernel is not None:
        kernel.causal_top_blocks_gated_triton(q, keys, *out, heads_per_list=heads_per_list, **options)
        return out
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        reason = importlib.import_module(".triton", __package__).unsupported_reason(q, keys=keys)
        warnings.warn(f"causal_top_blocks_gated: {reason}; scoring with float32 matmuls", stacklevel=2)
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * q_heads * (keys.shape[2] + dim)))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        with torch.autocast(q.device.type, enabled=False):  # float32 products, whatever the caller's autocast
            scores = grouped_matmul(q[:, :, start:stop].float(), keys)
        if heads_per_list > 1:
            scores = scores.unflatten(1, (heads, heads_per_list)).sum(2)
        causal_top_blocks(
            scores,
            **dict(options, first_pos=first_pos + start),
            out=(out[0][:, :, start:stop], out[1][:, :, start:stop]),
        )
    return out
