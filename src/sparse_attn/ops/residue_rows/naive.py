"""NSA's residue regrouping in PyTorch: the reference, the CPU path and the lse path (strided copies)."""

from __future__ import annotations

import torch

__all__ = ["from_residues_reference", "to_residues_reference"]


def _fill_rows(grid: torch.Tensor, tokens: torch.Tensor, front: int, stride: int, skip: int, *, to_grid: bool):
    """Copy between ``grid`` ``(B, H, R, d, ...)`` (rows ``skip`` to ``skip + R``, cell ``[r, j]`` at padded
    index ``r * d + j``) and ``tokens`` ``(B, H, S, ...)`` (token ``t`` at padded index ``front + t``), in one
    strided copy for the rows wholly inside the sequence and small ones for at most two partial
    rows. ``to_grid``: grid cells that hold no token are set to 0 (the other way, tokens outside
    the rows are not touched)."""
    rows, seq = grid.shape[2], tokens.shape[2]
    p_lo, p_hi = max(skip * stride, front), min((skip + rows) * stride, front + seq)
    if p_lo >= p_hi:
        if to_grid:
            grid.zero_()
        return
    first, last = p_lo // stride, (p_hi - 1) // stride  # rows holding tokens
    full_lo, full_hi = -(-p_lo // stride), p_hi // stride  # rows holding a token in every cell

    def copy(cells: torch.Tensor, span: torch.Tensor) -> None:
        (cells if to_grid else span).copy_(span if to_grid else cells)

    if to_grid:
        grid[:, :, : first - skip].zero_()
        grid[:, :, last + 1 - skip :].zero_()
        for row in {first, last} - set(range(full_lo, full_hi)):
            grid[:, :, row - skip].zero_()
    if full_lo < full_hi:
        span = tokens[:, :, full_lo * stride - front : full_hi * stride - front]
        copy(grid[:, :, full_lo - skip : full_hi - skip], span.unflatten(2, (full_hi - full_lo, stride)))
    for row in sorted({first, last} - set(range(full_lo, full_hi))):
        lo, hi = max(p_lo, row * stride), min(p_hi, (row + 1) * stride)
        copy(grid[:, :, row - skip, lo - row * stride : hi - row * stride], tokens[:, :, lo - front : hi - front])


def to_residues_reference(x: torch.Tensor, front: int, rows: int, stride: int, skip: int = 0) -> torch.Tensor:
    """``(B, H, S, D)`` -> ``(B * d, H, rows - skip, D)``: the token at padded index ``front + t`` goes to
    batch entry ``b * d + (front + t) % d``, row ``(front + t) // d - skip`` (zeros where no token is).
    One pass over ``x`` (no padded copy first)."""
    batch, heads, _, dim = x.shape
    out = x.new_empty(batch, stride, heads, rows - skip, dim)
    _fill_rows(out.permute(0, 2, 3, 1, 4), x, front, stride, skip, to_grid=True)
    return out.view(batch * stride, heads, rows - skip, dim)


def from_residues_reference(
    x: torch.Tensor, front: int, seq: int, stride: int, skip: int = 0, fill: float = 0.0
) -> torch.Tensor:
    """The inverse of :func:`to_residues_reference` on ``(B * d, H, rows - skip, ...)`` (a trailing head_dim or
    none): ``(B, H, seq, ...)``, tokens whose row is before ``skip`` set to ``fill``. One pass."""
    batch, heads = x.shape[0] // stride, x.shape[1]
    grid = x.unflatten(0, (batch, stride)).movedim(1, 3)  # (B, H, rows - skip, d, ...)
    out = x.new_empty(batch, heads, seq, *x.shape[3:])
    before = min(seq, max(0, skip * stride - front))  # tokens in rows before `skip`
    after = max(before, min(seq, (skip + x.shape[2]) * stride - front))  # tokens past the rows (none in use)
    out[:, :, :before] = fill
    out[:, :, after:] = fill
    _fill_rows(grid, out, front, stride, skip, to_grid=False)
    return out
