"""Backends compute exactly the blocks a pattern lists: ``reference``, ``flex``, ``triton``, ``gluon``, or ``auto``.

Each backend is one module implementing :class:`.base.Backend` (``name``,
``unsupported_reason``, ``forward``), imported the first time a call considers it, so
``import sparse_attn`` loads no kernel module and no Triton.

Choice (:func:`resolve_backend`):

* ``auto`` on CUDA: ``gluon`` where it applies (Hopper, fp16/bf16, head_dim 128, or 64 on
  patterns dense enough for it to win; why not is logged at debug level on the
  ``sparse_attn.backends`` logger, since that is the normal case elsewhere), else ``triton``,
  else ``flex``. On CPU: ``reference``. Compiled FlexAttention is faster on CPU once compiled,
  but ``torch.compile`` specializes on every new input shape, and each specialization costs
  seconds (tens of seconds with a cold compile cache), which a library called at many lengths
  pays again and again; the reference backend compiles nothing, so no call stalls.
  ``backend="flex"`` still runs FlexAttention on CPU for callers with fixed shapes.
* ``auto`` on CUDA with FlashAttention-4 installed: ``flash4`` for the case classes (head_dim,
  length, density, forward or training) where it was measured faster than our kernels
  (:func:`.flash4.slower_than_ours_reason`); elsewhere the choice above.
* ``gluon``: the Gluon kernel; where it cannot run, ``triton``, else ``flex``.
* ``flash4``: FlashAttention-4 through FlexAttention's FLASH backend; where it cannot run
  (not installed, not Hopper/Blackwell ...), ``gluon``, ``triton``, else ``flex``.
* ``triton``, ``flex``, ``reference``: that backend.
* A pattern with a token-level rule (:mod:`sparse_attn.masked_pattern`): on CUDA, a rule that is
  a box predicate (:mod:`sparse_attn.rule_predicate`: neighbourhood windows) runs on ``gluon``
  for ``auto``, ``gluon`` and ``flash4`` (one warning) where the Gluon kernel can run the case;
  other rules run on ``flex`` for ``auto`` (measured faster than the Triton kernel's bitmasks);
  ``triton`` by name runs every rule (predicate or bitmasks); where no kernel can, ``flex``
  (CUDA) or ``reference``. See :func:`sparse_attn.masked_pattern.backend_for_token_rule`.
* A backend that cannot run the case falls back to the next one and finally to ``reference``
  with one warning naming why. Inputs that require grad count as part of the case: every
  backend differentiates in q, k and v (``triton`` with the Triton backward kernels, ``gluon``
  with the same or, at head_dim 128 on Hopper, the Gluon passes of :mod:`.gluon_backward`;
  ``reference`` and ``flex`` through autograd) except ``flex`` on CPU, which falls back.

Kernel tuning (tiles, load modes, Gluon stages) is overridden with :func:`kernel_configs`.
"""

from __future__ import annotations

import importlib
import logging
import warnings

import torch

from ..masked_pattern import backend_for_token_rule
from ..pattern import BlockSparsePattern
from ..plan import plan_for
from .autograd import kernel_attention
from .base import Backend
from .configs import kernel_configs

__all__ = [
    "BACKENDS",
    "Backend",
    "fusable_backward_module",
    "get_backend",
    "kernel_configs",
    "plan_ahead",
    "resolve_backend",
    "resolve_own_kernel",
    "run_backend",
]

BACKENDS = ("auto", "reference", "flex", "triton", "gluon", "flash4")

logger = logging.getLogger(__name__)


def get_backend(name: str) -> Backend:
    """The backend module called ``name`` (imported on first use)."""
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def _backend_module(name: str, pattern: BlockSparsePattern):
    """The module that runs backend ``name`` on ``pattern``: query blocks below 16 rows on the
    ``triton`` backend go to the token-granular kernel (:mod:`.triton_tokens`)."""
    if name == "triton" and pattern.block_q < 16:
        return importlib.import_module(f"{__name__}.triton_tokens")
    return get_backend(name)


def fusable_backward_module(backend: str, q, k, v, pattern: BlockSparsePattern, *, causal: bool):
    """The kernel module that would run this checked case (``backend`` resolved as
    :func:`resolve_backend` does, warnings included) when its ``backward`` takes a precomputed
    ``delta=`` and adds q's gradient into ``dq_into=`` (:func:`.triton_backward.backward`; marked by
    ``BACKWARD_TAKES_DELTA``), else ``None``. For callers that fuse several attentions' backward
    with their own (:mod:`sparse_attn.nn.nsa_fused`)."""
    name = resolve_backend(backend, q, k, v, pattern, causal=causal, return_lse=False)
    module = _backend_module(name, pattern)
    return module if getattr(module, "BACKWARD_TAKES_DELTA", False) else None


def plan_ahead(backend, q, k, v, pattern: BlockSparsePattern, *, causal: bool) -> None:
    """Start now the host decisions that the kernel which would run this checked case makes from
    ``pattern``'s data (the token kernels' query tile, :func:`.triton_tokens.plan_ahead`):
    ``backend`` a name (resolved as :func:`resolve_backend` does) or the backend module already
    resolved. What they read is computed and copied to the host behind an event, so the later
    call waits for that event only, not for work queued in between. A caller that queues work
    independent of ``pattern`` before that call keeps the device busy while the host decides
    (NSA's module launches its window branch there). Nothing for backends without such decisions."""
    if isinstance(backend, str):
        backend = _backend_module(resolve_backend(backend, q, k, v, pattern, causal=causal, return_lse=False), pattern)
    ahead = getattr(backend, "plan_ahead", None)
    if ahead is not None:
        ahead(q, k, pattern)


def _auto_skips_gluon(q, k, v, pattern: BlockSparsePattern, *, causal: bool) -> str | None:
    """Why ``auto`` does not run the Gluon kernel on this CUDA case, or ``None`` when it does."""
    gluon = get_backend("gluon")
    reason = gluon.unsupported_reason(q, k, v, pattern, return_lse=False)
    if reason is None:
        reason = gluon.slower_than_triton_reason(q, plan_for(pattern, causal=causal))
    return reason


def _auto_kernel(q, k, v, pattern: BlockSparsePattern, *, causal: bool, needs_grad: bool) -> str | None:
    """``auto``'s pick among the fast CUDA kernels (``flash4`` where installed and measured faster
    for the case class, else ``gluon``), or ``None`` to try ``triton`` then ``flex``. Logged at debug level."""
    flash4 = get_backend("flash4")
    skipped = flash4.unsupported_reason(q, k, v, pattern, return_lse=False)
    if skipped is None and needs_grad:
        skipped = flash4.gradient_unsupported_reason(q)
    if skipped is None:
        skipped = flash4.slower_than_ours_reason(q, k, plan_for(pattern, causal=causal), needs_grad=needs_grad)
    if skipped is None:
        logger.debug("backend auto: flash4")
        return "flash4"
    logger.debug("backend auto: not flash4, %s", skipped)
    skipped = _auto_skips_gluon(q, k, v, pattern, causal=causal)
    if skipped is None:
        logger.debug("backend auto: gluon")
        return "gluon"
    logger.debug("backend auto: not gluon, %s", skipped)
    return None


def resolve_backend(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    return_lse: bool,
) -> str:
    """The backend that will run this case; warns (once per reason) when it is not the one asked for."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = backend_for_token_rule(backend, q, k, v, pattern, return_lse=return_lse)
    if backend == "auto":
        if q.device.type != "cuda":
            preferred = ("reference",)
        else:
            chosen = _auto_kernel(q, k, v, pattern, causal=causal, needs_grad=_needs_grad(q, k, v))
            if chosen is not None:
                return chosen
            preferred = ("triton", "flex")
    elif backend == "gluon":
        preferred = ("gluon", "triton", "flex")
    elif backend == "flash4":
        preferred = ("flash4", "gluon", "triton", "flex")
    else:
        preferred = (backend,)
    needs_grad = _needs_grad(q, k, v)
    reasons = []
    for name in preferred:
        module = _backend_module(name, pattern)
        reason = module.unsupported_reason(q, k, v, pattern, return_lse=return_lse)
        if reason is None and needs_grad:
            reason = module.gradient_unsupported_reason(q)
        if reason is None:
            if name != preferred[0]:
                warnings.warn(f"{reasons[0]}: using the {name} backend", stacklevel=3)
            return name
        reasons.append(reason)
    if preferred != ("reference",):
        warnings.warn(f"{'; '.join(reasons)}: using the slower reference backend", stacklevel=3)
    return "reference"


def resolve_own_kernel(
    backend: str, q, k, v, pattern: BlockSparsePattern, *, kernel: str, lacks: str, kernel_label: str,
    reference_label: str, return_lse: bool,
) -> str:  # fmt: skip
    """The routing of a pattern kind that only its own kernel (module ``kernel`` of this package)
    and its own PyTorch reference compute (BLASST's skip rule, psa/sla's compensation):
    ``"triton"`` or ``"reference"``. ``reference`` asked for, or ``auto`` off CUDA: the reference;
    ``flex``: the reference with one warning (FlexAttention ``lacks`` it); the kernel where it can
    run the case (with one warning for ``gluon`` / ``flash4``, which lack it too), else the
    reference with one warning naming why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or (backend == "auto" and q.device.type != "cuda"):
        return "reference"
    if backend == "flex":
        warnings.warn(f"the flex backend {lacks}: using {reference_label}", stacklevel=5)
        return "reference"
    module = importlib.import_module(f"{__name__}.{kernel}")
    reason = module.unsupported_reason(q, k, v, pattern, return_lse=return_lse)
    if reason is None and _needs_grad(q, k, v):
        reason = module.gradient_unsupported_reason(q)
    if reason is not None:
        warnings.warn(f"{reason}: using {reference_label} (slower)", stacklevel=5)
        return "reference"
    if backend in ("gluon", "flash4"):
        warnings.warn(f"the {backend} backend {lacks}: using {kernel_label}", stacklevel=5)
    return "triton"


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))


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
    """Run backend ``name`` (a resolved name, not ``auto``) on a checked case; differentiable
    in q, k and v (kernel backends through :mod:`.autograd`, the others through autograd itself)."""
    module = _backend_module(name, pattern)
    if _needs_grad(q, k, v) and hasattr(module, "backward"):
        return kernel_attention(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse, backend=module)
    return module.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
