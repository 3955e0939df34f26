"""NSA's selection-block importance scores from the compressed branch's attention, given its log-sum-exp.

Paper: Jingyang Yuan, Huazuo Gao, Damai Dai, et al., "Native Sparse Attention: Hardware-Aligned
and Natively Trainable Sparse Attention", 2025, arXiv:2502.11089, Section 3.3 (token selection):
the attention probabilities a query gives the compressed keys score the selection blocks, mapped
from compression blocks to selection blocks when the two blockings differ, and summed over the
query heads of a GQA group so that the group selects one set of blocks.

Rule, for a chunk of ``c`` query tokens (token ``t`` at key position ``first_pos + t``), per
batch, KV head ``g`` and selection block ``j``::

    out[b, g, t, j] = sum_{h in group g} sum_{i visible to t}
                      exp(scale * q[b, h, t] . k_cmp[b, g, i] - lse[b, h, t]) * overlap(i, j) / d

Compressed key ``i`` covers key positions ``[i d, i d + l)`` (``l = compress_block``,
``d = compress_stride``) and is visible to position ``p`` iff ``i d + l - 1 <= p``; selection block
``j`` is ``[j l', (j + 1) l')`` (``l' = select_block``). ``lse`` is the natural-log log-sum-exp of
each query row's softmax over its visible compressed keys, as the compressed branch's attention
returns it, so the probabilities are not renormalised here. Paper defaults: l = 32, d = 16, l' = 64.

Choices where the paper leaves room (the same as :mod:`sparse_attn.nn.nsa`'s selection, which this
operator serves):

- The mapping from compression blocks to selection blocks weights block ``i``'s probability by
  ``overlap(i, j) / d``, the number of stride-``d`` pieces the two blocks share (with the defaults
  1 or 2 for each of the compressed blocks overlapping a selection block); the exact indexing of
  the paper's equation 9 could not be checked against the paper's text here.
- A row that sees no compressed key (``lse = -inf``, or ``t`` before the first whole compression
  block) scores 0 everywhere, never NaN; its selection is the caller's business (NSA keeps the
  forced blocks).
- Requires ``l % d == 0`` and ``l' % d == 0`` (the paper's defaults satisfy both): the blocks are
  then unions of stride pieces and the weights are small integers.

Reference: :mod:`.naive` (PyTorch, float32, chunked over KV heads and rows). Kernel: :mod:`.triton`
(one fused pass, ``O(output)`` memory, deterministic), chosen on CUDA when its
``unsupported_reason`` is ``None`` by the rule of :mod:`sparse_attn.ops._dispatch`; a CUDA case the
kernel cannot run falls back to the reference with a warning naming why.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from ...checks import check_int, check_key_like, is_finite_number
from .._dispatch import kernel_for
from .naive import compressed_block_scores as compressed_block_scores_reference
from .naive import visible_count

__all__ = [
    "check_compressed_scores_inputs",
    "compressed_block_scores",
    "compressed_block_scores_reference",
    "visible_count",
]


def check_compressed_scores_inputs(
    q, k_cmp, lse, *, first_pos, compress_block, compress_stride, select_block, n_select, scale
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs form a valid case."""
    check_key_like(q, k_cmp, "k_cmp")
    batch, q_heads, chunk, _ = q.shape
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32, got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on q's device {q.device}, got {lse.device}")
    if tuple(lse.shape) != (batch, q_heads, chunk):
        raise ValueError(f"lse must have shape (batch, q_heads, c) = {(batch, q_heads, chunk)}, got {tuple(lse.shape)}")
    check_int("first_pos", first_pos, minimum=0)
    for name, value in (
        ("compress_block", compress_block),
        ("compress_stride", compress_stride),
        ("select_block", select_block),
        ("n_select", n_select),
    ):
        check_int(name, value)
    for name, value in (("compress_block", compress_block), ("select_block", select_block)):
        if value % compress_stride:
            raise ValueError(f"{name} ({value}) must be a multiple of compress_stride ({compress_stride})")
    if not is_finite_number(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    # The last compressed key any row of the chunk sees must end inside the n_select blocks.
    seen = visible_count(first_pos + chunk - 1, compress_block, compress_stride, k_cmp.shape[2]) if chunk else 0
    if seen and (seen - 1) * compress_stride + compress_block > n_select * select_block:
        raise ValueError(
            f"n_select ({n_select}) blocks of {select_block} keys do not cover compressed key {seen - 1} "
            f"(keys up to {(seen - 1) * compress_stride + compress_block - 1}); pass at least ceil(Sk / select_block)"
        )


def compressed_block_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    *,
    first_pos: int,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    n_select: int,
    scale: float,
) -> torch.Tensor:
    """Float32 ``(B, Hkv, c, n_select)`` selection-block scores (the rule in the module docstring).

    q ``(B, Hq, c, D)``: a chunk of query tokens, token ``t`` at key position ``first_pos + t``;
    k_cmp ``(B, Hkv, n_cmp, D)`` compressed keys in q's dtype (``Hq % Hkv == 0``, any group size);
    lse float32 ``(B, Hq, c)``: each row's natural-log log-sum-exp over its visible compressed keys
    (``-inf`` for a row that sees none). ``n_select`` must cover every compressed key the chunk sees
    (``ceil(Sk / select_block)`` does); blocks no visible key touches get 0.

    Example (equal to NSA's softmax-based scores; ``end = arange(n_cmp) * d + l - 1``)::

        logits = (q.float() @ k_cmp.float().repeat_interleave(G, 1).transpose(-1, -2)) * scale
        logits = logits.masked_fill(end > positions[:, None], float("-inf"))
        scores = compressed_block_scores(q, k_cmp, torch.logsumexp(logits, -1), first_pos=Sk - c,
                                         compress_block=32, compress_stride=16, select_block=64,
                                         n_select=-(-Sk // 64), scale=scale)
    """
    options = dict(
        first_pos=first_pos,
        compress_block=compress_block,
        compress_stride=compress_stride,
        select_block=select_block,
        n_select=n_select,
        scale=scale,
    )
    check_compressed_scores_inputs(q, k_cmp, lse, **options)
    kernel = kernel_for(q, __package__)
    if kernel is not None:
        return kernel.compressed_block_scores_triton(q, k_cmp, lse, **options)
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        reason = importlib.import_module(".triton", __package__).unsupported_reason(q)
        warnings.warn(f"compressed_block_scores: {reason}; using the PyTorch reference", stacklevel=2)
    return compressed_block_scores_reference(q, k_cmp, lse, **options)
