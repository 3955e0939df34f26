"""The `Backend` protocol: the signature every backend module implements.

A backend is a module of this package (``reference``, ``flex``, ``triton``, ``gluon``) with a
``name``, a capability check and entry points; :mod:`sparse_attn.backends` imports it the
first time a call considers it. Entry points take the pattern and read what they precompute
about it from its plan (:func:`sparse_attn.plan.plan_for`), built once per (pattern, causal).
Today every backend has a forward pass; the backward and decode entry points join this
protocol as methods of the same shape when the first backend implements them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..pattern import BlockSparsePattern

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """What :func:`sparse_attn.backends.run_backend` calls. Tensors as in :func:`sparse_attn.block_sparse_attention`:
    ``q`` ``(B, Hq, Sq, D)``, ``k`` and ``v`` ``(B, Hkv, Sk, D)``, checked and fitting ``pattern``."""

    name: str

    def unsupported_reason(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
    ) -> str | None:
        """Why this backend cannot run the case (a sentence for a warning), or ``None`` when it can."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: BlockSparsePattern,
        *,
        causal: bool,
        scale: float,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``out`` ``(B, Hq, Sq, D)`` in q's dtype, and with ``return_lse`` the natural-log
        log-sum-exp of each query's scores, float32 ``(B, Hq, Sq)``."""
