"""The last-query probe in PyTorch: the reference of the kernel in :mod:`.triton`, and what runs off CUDA.

Full-resolution scores exist only for the probe rows, a few query heads at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...geometry import num_blocks
from .._chunking import CHUNK_ELEMENTS
from ..gqa import gqa_group, grouped_matmul, head_chunks, kv_heads_of

__all__ = ["ProbeSums", "block_sum", "probe_last_queries"]


@dataclass(frozen=True)
class ProbeSums:
    """Exact attention of the last ``num_queries`` queries, reduced (float32, summed over those queries).

    ``vertical[b, h, t]``: mass on key ``t``; ``slash[b, h, o]``: mass on the diagonal at
    distance ``o = query position - key position``; ``block[b, h, j]``: mass on KV block ``j``.
    Each query's softmax sums to 1, so each reduction sums to ``num_queries``.
    """

    vertical: torch.Tensor
    slash: torch.Tensor | None  # None where only vertical and block sums were asked for
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


def probe_last_queries(
    q: torch.Tensor, k: torch.Tensor, *, num_queries: int, block_k: int, scale: float, causal: bool
) -> ProbeSums:
    """Softmax of the last ``num_queries`` queries against all keys, reduced to :class:`ProbeSums`.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``; the sums are ``(B, Hq, Sk)`` (vertical, slash)
    and ``(B, Hq, n_kv)`` (block). Chunked over query heads so that the full-resolution probe
    rows of a chunk stay under half of ``CHUNK_ELEMENTS`` floats.
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
    for heads in head_chunks(q_heads, group, heads_per_chunk):
        logits = _chunk_logits(probe[:, heads.start : heads.stop], k[:, kv_heads_of(heads, group)]) * scale_factor
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
