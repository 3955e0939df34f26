"""Backends compute exactly the blocks a pattern lists: ``reference``, ``flex``, ``triton``, or ``auto``."""

from __future__ import annotations

import warnings

import torch

from ..pattern import BlockSparsePattern
from .flex import flex_attention_forward, flex_unsupported_reason
from .reference import reference_attention
from .triton_kernel import triton_attention, triton_unsupported_reason

BACKENDS = ("auto", "reference", "flex", "triton")

_RUNNERS = {"reference": reference_attention, "flex": flex_attention_forward, "triton": triton_attention}


def _unsupported_reason(name: str, q: torch.Tensor, pattern: BlockSparsePattern, return_lse: bool) -> str | None:
    if name == "flex":
        return flex_unsupported_reason(q, pattern, return_lse=return_lse)
    if name == "triton":
        return triton_unsupported_reason(q, pattern)
    return None


def resolve_backend(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str:
    """The backend that will run this case; warns (once per reason) when it is not the one asked for."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)) and backend != "reference":
        warnings.warn(
            "inputs require grad and only the reference backend has a backward pass: using the reference backend",
            stacklevel=3,
        )
        return "reference"
    if backend == "auto":
        preferred = ("triton", "flex") if q.device.type == "cuda" else ("flex",)
    else:
        preferred = (backend,)
    reasons = []
    for name in preferred:
        reason = _unsupported_reason(name, q, pattern, return_lse)
        if reason is None:
            if name != preferred[0]:
                warnings.warn(f"{reasons[0]}: using the {name} backend", stacklevel=3)
            return name
        reasons.append(reason)
    if preferred != ("reference",):
        warnings.warn(f"{'; '.join(reasons)}: using the slower reference backend", stacklevel=3)
    return "reference"


def run_backend(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool,
):
    return _RUNNERS[name](q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)


__all__ = ["BACKENDS", "resolve_backend", "run_backend", "reference_attention", "flex_attention_forward", "triton_attention"]
