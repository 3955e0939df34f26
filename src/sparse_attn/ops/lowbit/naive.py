"""Low-bit quantisation emulated in PyTorch (the implementation; there is no fused kernel)."""

from __future__ import annotations

import torch

from .._chunking import CHUNK_ELEMENTS

__all__ = ["FORMATS", "dequantize", "quantize", "quantize_per_head", "sequence_mean"]

# The largest code magnitude of each format: symmetric int4 uses [-7, 7] (the released SALE
# kernel's range; -8 is left unused so that negation is exact); e4m3 tops out at 448.
_LEVELS = {"int4": 7.0, "fp8": 448.0}
_CODE_DTYPES = {"int4": torch.int8, "fp8": torch.float8_e4m3fn}
FORMATS = tuple(_LEVELS)


def sequence_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence (dim 2) per batch and head: float32 ``(B, H, 1, D)``."""
    return x.mean(dim=2, keepdim=True, dtype=torch.float32)


def quantize(x: torch.Tensor, fmt: str, *, center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantisation of ``x - center`` (``x`` ``(B, H, S, D)``): ``(codes, scale)``.

    Each token gets its own scale ``absmax / levels`` (an all-zero token keeps scale 1 and zero
    codes). ``"int4"``: codes int8 in ``[-7, 7]``, rounded to nearest (ties to even);
    ``"fp8"``: codes ``float8_e4m3fn`` (a round-to-nearest-even cast). ``scale`` is float32
    ``(B, H, S)``. ``center`` broadcasts to ``x`` (e.g. :func:`sequence_mean`). Tokens are
    processed a chunk at a time, so float32 temporaries stay within ``CHUNK_ELEMENTS``.
    """
    if fmt not in _LEVELS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    batch, heads, length, dim = x.shape
    codes = torch.empty(x.shape, dtype=_CODE_DTYPES[fmt], device=x.device)
    scale = torch.empty((batch, heads, length), dtype=torch.float32, device=x.device)
    tokens = max(1, CHUNK_ELEMENTS // max(1, 2 * batch * heads * dim))
    for start in range(0, length, tokens):
        # A copy even for float32 input: the steps below work in place.
        part = x[:, :, start : start + tokens].to(torch.float32, copy=True)
        if center is not None:
            part -= center
        codes[:, :, start : start + tokens], step = _encode(part, fmt, dims=(-1,))
        scale[:, :, start : start + tokens] = step
    return codes, scale


def _encode(part: torch.Tensor, fmt: str, *, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of float32 ``part`` (divided in place) with one scale ``absmax / levels`` per slice over
    ``dims`` (1 where the slice is all zero): ``(codes, scale)``, the scale without those dims."""
    absmax = part.abs().amax(dim=dims, keepdim=True)
    step = torch.where(absmax > 0, absmax / _LEVELS[fmt], torch.ones_like(absmax))
    part /= step
    if fmt == "int4":
        part = torch.round(part).clamp_(-_LEVELS[fmt], _LEVELS[fmt])
    return part.to(_CODE_DTYPES[fmt]), step.squeeze(dims)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` in float32: ``(B, H, S, D)`` from codes and a ``(B, H, S)`` scale."""
    return codes.float() * scale[..., None]


def quantize_per_head(
    x: torch.Tensor, fmt: str = "fp8", *, center: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head) symmetric quantisation of ``x - center`` (``x`` ``(B, H, S, D)``): ``(codes, scale)``.

    One scale per head, ``absmax / levels`` over all its tokens (an all-zero head keeps scale 1),
    so a product of codes needs one multiplication by both heads' scales, which a scoring kernel
    folds into its softmax scale. ``scale`` is float32 ``(B, H)``; codes as in :func:`quantize`.
    fp8's exponent keeps tokens far below the head's maximum representable (e4m3 spans 2^-9 to
    448), which is what makes one scale per head usable for it; int4 has no exponent and is
    better served by :func:`quantize`. Heads are processed a few at a time, so float32
    temporaries stay within ``CHUNK_ELEMENTS``.
    """
    if fmt not in _LEVELS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    batch, heads, length, dim = x.shape
    codes = torch.empty(x.shape, dtype=_CODE_DTYPES[fmt], device=x.device)
    scale = torch.empty((batch, heads), dtype=torch.float32, device=x.device)
    per_head = max(1, batch * length * dim)
    step_heads = max(1, CHUNK_ELEMENTS // per_head)
    for start in range(0, heads, step_heads):
        part = x[:, start : start + step_heads].to(torch.float32, copy=True)
        if center is not None:
            part -= center[:, start : start + step_heads]
        codes[:, start : start + step_heads], scale[:, start : start + step_heads] = _encode(part, fmt, dims=(2, 3))
    return codes, scale
