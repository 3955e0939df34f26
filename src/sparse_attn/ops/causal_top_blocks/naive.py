"""Causal top-n block lists in plain PyTorch: the reference of :mod:`.triton` and the CPU path.

Ranking (shared with the kernel, so the lists are equal): per row, forced blocks score ``+inf``,
blocks that are not eligible ``-inf`` (never listed), the others their score (a ``+inf`` score as
the largest finite float, below the forced blocks); ranked by score,
ties to the lower block index (a stable descending sort), ``-0.0`` counted as ``+0.0``. The top
``top_n`` eligible blocks are listed in ascending block order.
"""

from __future__ import annotations

import torch

__all__ = ["causal_top_blocks_reference", "ranking_scores"]


def ranking_scores(
    scores: torch.Tensor, *, first_pos: int, block: int, initial: int, local: int, ranked_from: int
) -> torch.Tensor:
    """Float32 ``scores`` with forced blocks at ``+inf`` and blocks that are not eligible at ``-inf``
    (the rule of :func:`sparse_attn.ops.causal_top_blocks.causal_top_blocks`)."""
    rows, n_blocks = scores.shape[-2:]
    position = torch.arange(rows, device=scores.device) + first_pos
    own = (position // block)[:, None]
    column = torch.arange(n_blocks, device=scores.device)
    forced = ((column < initial) | (column > own - local)) & (column <= own)
    scores = scores.float() + 0.0
    ranked = (column <= own) & (position >= ranked_from)[:, None] & (scores > float("-inf"))  # NaN: not ranked
    # A ranked +inf counts as the largest finite float, so forced blocks come first.
    ranking = torch.where(ranked, scores.clamp(max=torch.finfo(torch.float32).max), float("-inf"))
    return torch.where(forced, float("inf"), ranking)


def causal_top_blocks_reference(
    scores: torch.Tensor, *, first_pos: int, block: int, top_n: int, initial: int, local: int, ranked_from: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_attn.ops.causal_top_blocks.causal_top_blocks` by a stable sort; same arguments and results.

    Memory: a float32 copy of ``scores`` and its sort order (int64), chunked by the caller.
    """
    ranking = ranking_scores(
        scores, first_pos=first_pos, block=block, initial=initial, local=local, ranked_from=ranked_from
    )
    keep = min(top_n, scores.shape[-1])
    order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :keep]
    listed = torch.gather(ranking, -1, order) > float("-inf")
    counts = listed.sum(-1, dtype=torch.int32)
    big = torch.iinfo(torch.int32).max
    ascending = torch.sort(torch.where(listed, order, big), dim=-1).values
    indices = torch.where(ascending == big, 0, ascending).to(torch.int32)
    if keep < top_n:
        indices = torch.nn.functional.pad(indices, (0, top_n - keep))
    return indices.contiguous(), counts
