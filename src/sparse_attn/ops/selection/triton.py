"""Sort-free row selection in Triton (reference: the sort-based rules of :mod:`.naive`).

Two rules, one program per row of up to :data:`MAX_ROW` entries held in registers:

* :func:`cumulative_mass_mask_triton`: the fewest highest entries whose sum reaches ``threshold``
  of the row's sum, the count clamped to ``[minimum, maximum]``;
* :func:`topk_by_rank_mask_triton`: the ``keep_count[row]`` entries ranked highest.

Both bisect over the entries' order-preserving integer keys (a float's bits, negative floats
reflected) instead of sorting. For the mass rule, the value ``v`` of the last kept entry is
the smallest key whose strictly-larger entries sum to less than the target; the count is the
entries above ``v`` plus as many entries equal to ``v`` as keep their preceding mass short of
the target. The selection then keeps the entries above the count's cut and the first ties by
index, which is exactly the reference's stable-sort order. (When the mass rule's count is its
own, not clamped by the budget, and takes a tie at ``v``, that cut is ``v`` itself and the
second bisection, the one that finds the cut, is skipped.) Sums are reduced in a different
order than the reference's sequential scan, so a row whose running mass lands within float
rounding of the target may keep one entry more or fewer than the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import device_unsupported_reason

__all__ = ["MAX_ROW", "cumulative_mass_mask_triton", "topk_by_rank_mask_triton", "unsupported_reason"]

# Longest row one program holds (float32 entries in registers).
MAX_ROW = 8192
# Output allocator; tests replace it to poison outputs so unwritten entries show.
_empty = torch.empty


def unsupported_reason(scores: torch.Tensor) -> str | None:
    """Why the selection kernel cannot take these rows, or ``None``."""
    reason = device_unsupported_reason(scores)
    if reason is not None:
        return reason
    if scores.dim() < 1 or scores.numel() == 0:
        return "needs at least one non-empty row"
    if scores.shape[-1] > MAX_ROW:
        return f"takes rows of at most {MAX_ROW} entries, got {scores.shape[-1]}"
    return None


@triton.jit
def _order_keys(x):
    """int32 keys ordered as the float32 values (negative floats' bits reflected)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _select_row(
    Scores,
    KeepCount,
    Out,
    n,
    threshold,
    minimum,
    maximum,
    MASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(Scores + row * n + offs, mask=valid, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in a sort
    keys = tl.where(valid, _order_keys(x), -2147483647 - 1).to(tl.int64)
    lowest = tl.min(tl.where(valid, keys, 2147483647), 0)
    highest = tl.max(keys, 0)

    if MASS:
        # Entries are masses (non-negative). keep = the entries reached before the running
        # mass, highest first, gets to threshold x total.
        x = tl.where(valid, x, 0.0)
        target = threshold * tl.sum(x, 0)
        # Smallest key v with sum(x[key > v]) < target (bisection over [lowest, highest]).
        lo = lowest
        hi = highest
        for _ in range(34):
            mid = lo + (hi - lo) // 2
            above = tl.sum(tl.where(keys > mid, x, 0.0), 0)
            short = above < target
            hi = tl.where(short & (lo < hi), mid, hi)
            lo = tl.where(short | (lo >= hi), lo, mid + 1)
        cut = lo
        greater = keys > cut
        mass_above = tl.sum(tl.where(greater, x, 0.0), 0)
        count_above = tl.sum(greater.to(tl.int32), 0)
        ties = tl.sum((valid & (keys == cut)).to(tl.int32), 0)
        value = tl.max(tl.where(keys == cut, x, 0.0), 0)
        # Ties (in index order) are kept while their preceding mass is short of the target.
        needed = tl.where(value > 0, tl.math.ceil((target - mass_above) / tl.where(value > 0, value, 1.0)), 0.0)
        tie_count = tl.minimum(tl.maximum(needed, 0.0), ties.to(tl.float32)).to(tl.int32)
        unclamped = tl.where(target > 0, count_above + tie_count, 0)
        keep = tl.maximum(unclamped, minimum)
        if maximum >= 0:
            keep = tl.minimum(keep, maximum)
        # When the count is the mass rule's own (not clamped) and takes at least one tie at
        # `cut`, `cut` is already the smallest key with fewer than `keep` entries above it (the
        # entries above it are fewer; one key lower, the ties alone make `keep`): the second
        # bisection would return it, so it is skipped.
        search = (keep != unclamped) | (tie_count == 0)
    else:
        keep = tl.load(KeepCount + row).to(tl.int32)
        cut = lowest - 1  # the compiler needs `cut` defined before the bisection below assigns it
        search = True

    if search:
        # Smallest key u with fewer than `keep` entries above it (bisection over [lowest - 1,
        # highest]): every entry above u is kept, then the first ties at u by index.
        lo = lowest - 1
        hi = highest
        for _ in range(34):
            mid = lo + (hi - lo) // 2
            above = tl.sum((keys > mid).to(tl.int32), 0)
            few = above < keep
            hi = tl.where(few & (lo < hi), mid, hi)
            lo = tl.where(few | (lo >= hi), lo, mid + 1)
        cut = lo
    greater = valid & (keys > cut)
    tie = valid & (keys == cut)
    tie_rank = tl.cumsum(tie.to(tl.int32), 0)
    count_above = tl.sum(greater.to(tl.int32), 0)
    selected = (greater | (tie & (tie_rank <= keep - count_above))) & (keep > 0)
    tl.store(Out + row * n + offs, selected.to(tl.uint8), mask=valid)


def _launch(scores: torch.Tensor, keep_count: torch.Tensor | None, *, threshold: float, minimum: int, maximum: int):
    reason = unsupported_reason(scores)
    if reason is not None:
        raise ValueError(f"the Triton selection kernel cannot take these rows: {reason}")
    shape = scores.shape
    n = shape[-1]
    flat = scores.reshape(-1, n).float().contiguous()
    rows = flat.shape[0]
    out = _empty((rows, n), dtype=torch.uint8, device=scores.device)
    counts = flat if keep_count is None else keep_count.reshape(-1).to(torch.int32).contiguous()  # unused by MASS
    block = max(16, triton.next_power_of_2(n))
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _select_row[(rows,)](
        flat,
        counts,
        out,
        n,
        float(threshold),
        int(minimum),
        int(maximum),
        MASS=keep_count is None,
        BLOCK=block,
        num_warps=warps,
    )
    return out.view(torch.bool).view(shape)


def cumulative_mass_mask_triton(
    scores: torch.Tensor, threshold: float, *, minimum: int = 1, maximum: int | None = None
) -> torch.Tensor:
    """Same rule as :func:`.naive.cumulative_mass_mask_reference` (non-negative ``scores``), in the kernel."""
    return _launch(scores, None, threshold=threshold, minimum=minimum, maximum=-1 if maximum is None else maximum)


def topk_by_rank_mask_triton(ranking: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Same rule as :func:`.naive.topk_by_rank_mask_reference`, in the kernel."""
    if keep_count.shape != ranking.shape[:-1]:
        raise ValueError(f"keep_count must have shape {tuple(ranking.shape[:-1])}, got {tuple(keep_count.shape)}")
    return _launch(ranking, keep_count, threshold=0.0, minimum=0, maximum=-1)
