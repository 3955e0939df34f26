"""The `Backend` protocol: the signature every backend module implements.

A backend is a module of this package (``reference``, ``flex``, ``triton``, ``gluon``) with a
``name``, a capability check and entry points; :mod:`sparse_attn.backends` imports it the
first time a call considers it. Entry points take the pattern and read what they precompute
about it from its plan (:func:`sparse_attn.plan.plan_for`), built once per (pattern, causal).
Every backend is differentiable in q, k and v: ``reference`` and ``flex`` through autograd
itself, the kernel backends (``triton``, ``gluon``) through an optional ``backward`` entry point
that :mod:`.autograd` wraps in one ``torch.autograd.Function``. Decode entry points join this
protocol in the same way when the first backend implements them.
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

    def gradient_unsupported_reason(self, q: torch.Tensor) -> str | None:
        """Why this backend cannot differentiate the case (inputs that require grad), or ``None``.

        A backend with a ``backward(q, k, v, out, lse, dout, dlse, plan, *, scale)`` entry point
        (returning ``dq, dk, dv``) is differentiated through it; one without is differentiated
        by autograd through its forward."""
