"""Autograd for the kernel backends: one `torch.autograd.Function` over any backend module
with a ``backward`` entry point (``triton``; ``gluon``, whose backward runs the Triton kernels).

The forward runs the backend's forward with the log-sum-exp (always: the backward recomputes
probabilities from it instead of a second softmax) and saves ``q, k, v, out, lse``; the
backward hands them, with the gradients of ``out`` and of the log-sum-exp, to the backend's
``backward``, under the kernel-configuration overrides in force at the forward
(:func:`.configs.kernel_configs`: PyTorch runs the backward of CUDA tensors on its own
thread, which does not see the forward's context). The pattern is data, not a differentiable
input: an estimator's choice of blocks is discrete and gets no gradient. ``reference`` and ``flex`` need none of this: autograd
differentiates them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from ..pattern import BlockSparsePattern
from ..plan import plan_for
from . import configs

__all__ = ["KernelBackward", "forward_for_backward", "kernel_attention"]


@dataclass(frozen=True)
class KernelBackward:
    """What a kernel backend's backward needs besides the tensors: the backend module, the plan,
    the softmax scale and the kernel-configuration overrides in force at the forward."""

    backend: ModuleType
    plan: object
    scale: float
    kernel_configs: object

    def __call__(self, q, k, v, out, lse, dout, dlse, **fused):
        """``(dq, dk, dv)`` from the backend's ``backward`` under the forward's overrides; ``fused``:
        ``delta=`` / ``dq_into=`` for the backends that take them (:func:`.triton_backward.backward`)."""
        with configs.applied(self.kernel_configs):
            return self.backend.backward(q, k, v, out, lse, dout, dlse, self.plan, scale=self.scale, **fused)


def forward_for_backward(q, k, v, pattern: BlockSparsePattern, *, causal: bool, scale: float, backend: ModuleType):
    """``(out, lse, KernelBackward)``: ``backend``'s forward with its log-sum-exp, and what its
    backward needs. A backend whose backward builds host-side plans (the token kernels' transposed
    lists) builds them during the forward instead, from the point the pattern is ready."""
    prepare = getattr(backend, "prepare_backward", None)
    pattern_ready = None
    if prepare is not None and q.device.type == "cuda":
        pattern_ready = torch.cuda.Event()
        pattern_ready.record()
    out, lse = backend.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=True)
    plan = plan_for(pattern, causal=causal)
    if prepare is not None:
        prepare(q, k, plan, pattern_ready)
    return out, lse, KernelBackward(backend, plan, scale, configs.current())


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern: BlockSparsePattern, causal: bool, scale: float, backend: ModuleType):
        out, lse, ctx.run_backward = forward_for_backward(q, k, v, pattern, causal=causal, scale=scale, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ctx.run_backward(q, k, v, out, lse, dout, dlse)
        return dq, dk, dv, None, None, None, None


def kernel_attention(q, k, v, pattern: BlockSparsePattern, *, causal: bool, scale: float, return_lse: bool, backend):
    """``backend.forward`` made differentiable in q, k and v through ``backend.backward``."""
    out, lse = _KernelAttention.apply(q, k, v, pattern, bool(causal), float(scale), backend)
    return (out, lse) if return_lse else out
