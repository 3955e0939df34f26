"""NSA's selected and sliding-window branches and the gated sum as one differentiable step.

:class:`~sparse_attn.nn.nsa.NativeSparseAttention` runs each branch through
:func:`sparse_attn.block_sparse_attention` and sums them with :func:`sparse_attn.ops.gated_sum.gated_sum`,
each an autograd node of its own. Their backward then repeats work that one node can share:

* each branch's attention backward computes ``delta = rowsum(dO_b * O_b)`` in a pass over its
  output and output gradient (1 GiB each at 64 query heads x 64K tokens x 128 in bf16), while the
  gated sum's backward already reads ``dO`` and every branch's output to take the gates'
  gradients (``dO . O_b``): it writes ``delta_b = g_b (dO . O_b)`` beside them
  (:func:`sparse_attn.ops.gated_sum.triton.gated_sum_backward_triton` ``(deltas=True)``);
* q receives four gradients (the gates', the selected, window and compressed branches'), which
  autograd sums in three passes of ``(B, Hq, Sq, D)`` each: here the gates' gradient is the buffer
  the window branch's dQ pass and then the selected branch's add into in their stores
  (``dq_into=``), so q gets two gradients (this step's and the compressed branch's), one sum.

What runs is otherwise the same: the same forward kernels, the same backward kernels (dK/dV and
dQ passes), the same gated-sum kernels. It runs where all of them are kernels that take these
arguments (:func:`sparse_attn.backends.fusable_backward_module`: the ``triton``, ``gluon`` and
token-granular backends on CUDA) and a gradient is to be taken; elsewhere the module takes its
per-branch path. The compressed branch stays its own node: its queries are regrouped by
residue, so its dQ is in another layout.

The gradients differ from the per-branch path's only by rounding: ``delta_b`` is computed in
float32 from ``dO`` and the gate rather than from ``g_b dO`` rounded to the input dtype.
"""

from __future__ import annotations

import torch

from .. import api
from ..backends import configs, fusable_backward_module
from ..backends.autograd import forward_for_backward
from ..ops._dispatch import kernel_for
from ..pattern import BlockSparsePattern, check_pattern_fits

__all__ = ["fused_sparse_branches"]


def fused_sparse_branches(module, q, k, v, compressed, selected: BlockSparsePattern, window: BlockSparsePattern,
                          scale: float) -> torch.Tensor | None:  # fmt: skip
    """NSA's output (``module``'s gates over ``compressed``, the selected branch over ``selected``
    and the window branch over ``window``) as one autograd node, or ``None`` where it does not
    apply (no gradient to take, off CUDA, or a branch or the gated sum not on a kernel that takes
    a fused backward): the caller then runs the branches one by one."""
    weight, bias = module.gate_weight, module.gate_bias
    if q.device.type != "cuda" or not torch.is_grad_enabled():
        return None
    if not any(x.requires_grad for x in (q, k, v, compressed, weight, bias)):
        return None
    if api.padded_head_dim(q, v, module.backend) is not None:
        return None
    gate_kernel = kernel_for(q, "sparse_attn.ops.gated_sum", head_dim=q.shape[3])
    if gate_kernel is None:
        return None
    runs = []
    for pattern, rows in ((selected, module.selected_token_rows()), (window, None)):
        check_pattern_fits(pattern, q, k)
        pattern.ensure_valid(causal=True)
        with configs.kernel_configs(token_rows=rows):
            backend = fusable_backward_module(module.backend, q, k, v, pattern, causal=True)
        layout = getattr(pattern, "layout", None)
        if backend is None or not (layout is None or layout.is_identity):
            return None
        runs.append((pattern, backend, rows))
    return _FusedSparseBranches.apply(q, k, v, compressed, weight, bias, runs, gate_kernel, scale)


class _FusedSparseBranches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, compressed, weight, bias, runs, gate_kernel, scale):
        outputs, backwards = [], []
        for pattern, backend, rows in runs:
            with configs.kernel_configs(token_rows=rows):  # None changes nothing
                out, lse, run_backward = forward_for_backward(
                    q, k, v, pattern, causal=True, scale=scale, backend=backend
                )
            outputs += [out, lse]
            backwards.append(run_backward)
        selected, _, window, _ = outputs
        ctx.save_for_backward(q, k, v, compressed, weight, bias, *outputs)
        ctx.backwards, ctx.gate_kernel = backwards, gate_kernel
        return gate_kernel.gated_sum_triton(q, (compressed, selected, window), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, compressed, weight, bias, selected, selected_lse, window, window_lse = ctx.saved_tensors
        dq, d_branches, d_weight, d_bias, deltas = ctx.gate_kernel.gated_sum_backward_triton(
            q, (compressed, selected, window), weight, bias, grad_out, deltas=True
        )
        d_compressed, d_selected, d_window = d_branches
        run_selected, run_window = ctx.backwards
        # dq holds the gates' gradient; each branch's dQ pass adds its own into it.
        _, dk, dv = run_window(q, k, v, window, window_lse, d_window, None, delta=deltas[2], dq_into=dq)
        _, dk_selected, dv_selected = run_selected(
            q, k, v, selected, selected_lse, d_selected, None, delta=deltas[1], dq_into=dq
        )
        dk += dk_selected
        dv += dv_selected
        return dq, dk, dv, d_compressed, d_weight, d_bias, None, None, None
