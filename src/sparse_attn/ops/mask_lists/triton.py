"""Mask rows to column lists in Triton: one program per row writes each kept column at its prefix count.

Reference: :func:`.naive.mask_rows_to_lists_reference`, whose running count (an int32 copy of
the mask) and per-slot binary search over it cost far more traffic than the lists they give
(at 1M tokens a causal block mask holds 2^31 entries per 32 heads). Here the row is read once
in steps of ``BLOCK`` columns: a step's kept columns go to ``carry + cumsum - 1`` of the output
row, ``carry`` the kept columns before the step. The counts come from one reduction beforehand
(the output's width, the largest count, is needed to allocate it); a second loop of the
program writes the padding zeros after the row's count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import device_unsupported_reason

__all__ = ["mask_rows_to_lists_triton", "unsupported_reason"]

_BLOCK = 1024
_empty = torch.empty  # the output's allocator: the tests poison it


def unsupported_reason(mask: torch.Tensor) -> str | None:
    """Why the kernel cannot convert ``mask`` (a row without columns, or the device), or ``None``."""
    if mask.dim() < 1 or mask.shape[-1] == 0:
        return "needs rows of at least one column"
    return device_unsupported_reason(mask)


@triton.jit
def _row_lists(Mask, Columns, n, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    carry = 0
    for start in range(0, n, BLOCK):
        columns = start + offs
        kept = tl.load(Mask + row * n + columns, mask=columns < n, other=0).to(tl.int32)
        slots = carry + tl.cumsum(kept, 0) - 1
        tl.store(Columns + row * width + slots, columns, mask=kept != 0)
        carry += tl.sum(kept, 0)
    for start in range(0, width, BLOCK):  # the padding after the row's count
        slots = start + offs
        tl.store(
            Columns + row * width + slots, tl.zeros([BLOCK], dtype=tl.int32), mask=(slots >= carry) & (slots < width)
        )


def mask_rows_to_lists_triton(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`.naive.mask_rows_to_lists_reference`, with the kernel."""
    reason = unsupported_reason(mask)
    if reason is not None:
        raise ValueError(f"the Triton mask-to-lists kernel cannot convert this mask: {reason}")
    shape, n = mask.shape[:-1], mask.shape[-1]
    rows = mask.reshape(-1, n).contiguous().view(torch.uint8)
    counts = rows.sum(-1, dtype=torch.int32)
    width = int(counts.max()) if counts.numel() else 0
    columns = _empty((rows.shape[0], width), dtype=torch.int32, device=mask.device)
    if width:
        _row_lists[(rows.shape[0],)](rows, columns, n, width, BLOCK=min(_BLOCK, triton.next_power_of_2(n)))
    return counts.view(shape), columns.view(*shape, width)
