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

from types import ModuleType

import torch

from ..pattern import BlockSparsePattern
from ..plan import plan_for
from . import configs

__all__ = ["kernel_attention"]


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern: BlockSparsePattern, causal: bool, scale: float, backend: ModuleType):
        # A backend whose backward builds host-side plans (the token kernels' transposed lists)
        # builds them during the forward instead, from the point the pattern is ready.
        prepare = getattr(backend, "prepare_backward", None)
        pattern_ready = None
        if prepare is not None and q.device.type == "cuda":
            pattern_ready = torch.cuda.Event()
            pattern_ready.record()
        out, lse = backend.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.backend = plan_for(pattern, causal=causal), scale, backend
        if prepare is not None:
            prepare(q, k, ctx.plan, pattern_ready)
        ctx.kernel_configs = configs.current()
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        with configs.applied(ctx.kernel_configs):
            dq, dk, dv = ctx.backend.backward(q, k, v, out, lse, dout, dlse, ctx.plan, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def kernel_attention(q, k, v, pattern: BlockSparsePattern, *, causal: bool, scale: float, return_lse: bool, backend):
    """``backend.forward`` made differentiable in q, k and v through ``backend.backward``."""
    out, lse = _KernelAttention.apply(q, k, v, pattern, bool(causal), float(scale), backend)
    return (out, lse) if return_lse else out
