"""NSA's step after compression as one differentiable node: the compressed, selected and window
branches and the gated sum.

:class:`~sparse_attn.nn.nsa.NativeSparseAttention` runs each branch through
:func:`sparse_attn.block_sparse_attention` and sums them with :func:`sparse_attn.ops.gated_sum.gated_sum`,
each an autograd node of its own. Their backward then repeats work that one node can share:

* the gated sum's backward writes each branch's output gradient ``dO_b = g_b dO`` (1 GiB each
  at 64 query heads x 64K tokens x 128 in bf16), and each branch's attention backward computes
  ``delta = rowsum(dO_b * O_b)`` in a pass over it and its output, while the gated sum's backward
  already reads ``dO`` and every branch's output to take the gates' gradients (``dO . O_b``).
  Here it writes, per row and branch, ``dO . O_b`` and ``log g_b`` instead
  (:func:`sparse_attn.ops.gated_sum.triton.gated_sum_backward_triton` ``(folded=True)``), and each
  branch's backward runs on ``dO`` itself with its log-sum-exp less ``log g_b`` (probabilities
  ``g_b P``) and ``delta = dO . O_b``, which gives exactly the gradients of ``g_b dO``: no
  ``dO_b`` is written or read (the compressed branch's values regrouped by residue like its rows);
* q receives four gradients (the gates', the selected, window and compressed branches'), which
  autograd sums in three passes of ``(B, Hq, Sq, D)`` each: here the gates' gradient is the buffer
  the window branch's dQ pass and then the selected branch's add into in their stores
  (``dq_into=``), and the compressed branch's dQ is regrouped back into it
  (:func:`sparse_attn.ops.residue_rows.triton.regroup_triton` ``(add_to=)``).

What runs is otherwise the same: the same forward kernels and regroupings, the selection between
the compressed branch and the selected one (no gradient), the same backward passes. The node runs
where every part is a kernel that takes these arguments
(:func:`sparse_attn.backends.fusable_backward_module`: the ``triton``, ``gluon`` and token-granular
backends on CUDA) and a gradient is to be taken; elsewhere the module takes its per-branch path.
Where no query sees a compressed token (short sequences) the compressed branch stays outside
the node (its output, zeros, an input).

The gradients differ from the per-branch path's only by rounding: the gate enters each branch's
backward in float32 through its probabilities (rounded with them to the input dtype for the
products) rather than through ``g_b dO`` rounded to the input dtype, and q's gradient is summed
in the kernels' stores (float32 adds of values rounded to q's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import api
from ..backends import configs, fusable_backward_module
from ..backends.autograd import forward_for_backward
from ..ops._dispatch import kernel_for
from ..ops.residue_rows.naive import to_residues_reference
from ..pattern import BlockSparsePattern, check_pattern_fits
from ..utils import interpreting

__all__ = ["fused_nsa"]


@dataclass
class _Compressed:
    """The compressed branch inside the node: its regrouped inputs (no gradient: the node
    differentiates them itself), pattern and kernel module, its rows' geometry
    (:meth:`NativeSparseAttention.residue_geometry`) and the regrouping kernel (for the backward)."""

    grouped: torch.Tensor
    k_rep: torch.Tensor
    v_rep: torch.Tensor
    pattern: BlockSparsePattern
    backend: object
    geometry: tuple
    regroup: object  # ops.residue_rows.triton
    n_cmp: int


@dataclass
class _Spec:
    module: object
    scale: float
    gate_kernel: object
    selected_backend: object
    window: BlockSparsePattern
    window_backend: object
    compressed: _Compressed | None = None
    selected: BlockSparsePattern | None = None  # given when the compressed branch is outside the node


def fused_nsa(module, q, k, v, k_cmp, v_cmp, scale: float, compressed_branch) -> torch.Tensor | None:
    """NSA's output for ``module`` from ``q``, ``k``, ``v`` and the compressed tokens ``k_cmp``,
    ``v_cmp`` as one autograd node, or ``None`` where it does not apply (no gradient to take, off
    CUDA, no window branch, or a part not on a kernel that takes a fused backward): the caller then
    runs the branches one by one. ``compressed_branch``: the module's own
    ``(q, k_cmp, v_cmp) -> (out, lse)``, run where no query sees a compressed token."""
    weight, bias = module.gate_weight, module.gate_bias
    # (On CPU only under Triton's interpreter, where the tests run it with the kernel backends named.)
    runs_here = q.device.type == "cuda" or interpreting()
    if not runs_here or not torch.is_grad_enabled() or not module.window or q.shape[2] < 2:
        return None
    if not any(x.requires_grad for x in (q, k, v, k_cmp, v_cmp, weight, bias)):
        return None
    if api.padded_head_dim(q, v, module.backend) is not None:
        return None
    gate_kernel = kernel_for(q, "sparse_attn.ops.gated_sum", head_dim=q.shape[3])
    if gate_kernel is None:
        return None
    from .nsa import _pads_rows, window_pattern  # nsa imports this module

    seq_q, seq_k = q.shape[2], k.shape[2]
    window = window_pattern(seq_q, seq_k, module.window, device=q.device)
    window_backend = _fusable(module.backend, q, k, v, window, None)
    # The selection's kind of pattern (one token per list, per KV head), for choosing its kernel.
    stand_in = _selection_stand_in(module, q, seq_k)
    selected_backend = _fusable(module.backend, q, k, v, stand_in, module.selected_token_rows())
    if window_backend is None or selected_backend is None:
        return None
    spec = _Spec(module, scale, gate_kernel, selected_backend, window, window_backend)
    geometry = module.residue_geometry(seq_q, seq_k, k_cmp.shape[2], pads=_pads_rows(q, k_cmp, v_cmp))
    regroup = kernel_for(q, "sparse_attn.ops.residue_rows")
    if geometry is not None and regroup is not None:
        spec.compressed = _compressed_inputs(module, q, k_cmp, v_cmp, geometry, regroup)
    if spec.compressed is None or spec.compressed.backend is None:
        # The compressed branch on its own (an input of the node); the selection from its lse.
        spec.compressed = None
        compressed, lse = compressed_branch(q, k_cmp, v_cmp)
        with torch.no_grad():
            spec.selected = module.selection(q.detach(), k_cmp.detach(), lse.detach(), seq_k, scale)
        return _FusedNSA.apply(q, k, v, compressed, None, None, weight, bias, spec)
    return _FusedNSA.apply(q, k, v, None, k_cmp, v_cmp, weight, bias, spec)


def _fusable(backend: str, q, k, v, pattern, rows):
    check_pattern_fits(pattern, q, k)
    layout = getattr(pattern, "layout", None)
    if not (layout is None or layout.is_identity):
        return None
    with configs.kernel_configs(token_rows=rows):  # None changes nothing
        return fusable_backward_module(backend, q, k, v, pattern, causal=True)


def _selection_stand_in(module, q, seq_k: int) -> BlockSparsePattern:
    """A pattern of the selection's kind (``block_q = 1``, ``select_block`` keys, one list per KV
    head, each token's own block) for resolving its backend before the selection exists."""
    batch, _, seq_q, _ = q.shape
    own = (torch.arange(seq_q, device=q.device) + seq_k - seq_q) // module.select_block
    indices = own.to(torch.int32).view(1, 1, seq_q, 1).expand(batch, module.num_kv_heads, seq_q, 1)
    counts = torch.ones((batch, module.num_kv_heads, seq_q), dtype=torch.int32, device=q.device)
    pattern = BlockSparsePattern(
        kv_counts=counts, kv_indices=indices, block_q=1, block_k=module.select_block, seq_q=seq_q, seq_k=seq_k
    )
    pattern._cache[("validated", True)] = True  # valid by construction: each token's own block
    return pattern


def _compressed_inputs(module, q, k_cmp, v_cmp, geometry, regroup) -> _Compressed:
    """The compressed branch's kernel inputs (:meth:`NativeSparseAttention.residue_operands`)
    without gradient; ``backend`` ``None`` where its kernel takes no fused backward."""
    with torch.no_grad():
        grouped, k_rep, v_rep, pattern = module.residue_operands(q, k_cmp, v_cmp, geometry)
    backend = _fusable(module.backend, grouped, k_rep, v_rep, pattern, None)
    return _Compressed(grouped, k_rep, v_rep, pattern, backend, geometry, regroup, k_cmp.shape[2])


class _FusedNSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, compressed, k_cmp, v_cmp, weight, bias, spec: _Spec):
        module, scale, inside = spec.module, spec.scale, spec.compressed
        seq_q, seq_k = q.shape[2], k.shape[2]
        saved = []
        if inside is not None:
            out, lse, ctx.compressed_backward = forward_for_backward(
                inside.grouped, inside.k_rep, inside.v_rep, inside.pattern, causal=True, scale=scale,
                backend=inside.backend,
            )  # fmt: skip
            saved += [out, lse]
            compressed, lse = module.from_residue_rows(out, lse, inside.geometry, seq_q)
            selected_pattern = module.selection(q, k_cmp, lse, seq_k, scale)
        else:
            selected_pattern = spec.selected
        # The selected branch's tile choice started, then the window branch, independent of the
        # selection: the device runs it while the host waits for the choice and builds the lists.
        module.plan_selected_ahead(q, k, v, selected_pattern, spec.selected_backend)
        window, window_lse, run_window = forward_for_backward(
            q, k, v, spec.window, causal=True, scale=scale, backend=spec.window_backend
        )
        with configs.kernel_configs(token_rows=module.selected_token_rows()):  # None changes nothing
            selected, selected_lse, run_selected = forward_for_backward(
                q, k, v, selected_pattern, causal=True, scale=scale, backend=spec.selected_backend
            )
        ctx.save_for_backward(q, k, v, compressed, weight, bias, selected, selected_lse, window, window_lse, *saved)
        ctx.backwards, ctx.spec = (run_selected, run_window), spec
        return spec.gate_kernel.gated_sum_triton(q, (compressed, selected, window), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, compressed, weight, bias, selected, selected_lse, window, window_lse, *saved = ctx.saved_tensors
        spec = ctx.spec
        # No branch gradient g_b dO: each branch's backward takes dO with its log-sum-exp less log g_b
        # and delta dO . O_b (ops.gated_sum.triton.gated_sum_backward_triton(folded=True)).
        grad_out = grad_out.contiguous()
        dq, d_weight, d_bias, dots, log_gates = spec.gate_kernel.gated_sum_backward_triton(
            q, (compressed, selected, window), weight, bias, grad_out, folded=True
        )
        run_selected, run_window = ctx.backwards
        # dq holds the gates' gradient; each branch's dQ pass adds its own into it.
        _, dk, dv = run_window(q, k, v, window, window_lse - log_gates[2], grad_out, None, delta=dots[2], dq_into=dq)
        _, dk_selected, dv_selected = run_selected(
            q, k, v, selected, selected_lse - log_gates[1], grad_out, None, delta=dots[1], dq_into=dq
        )
        dk += dk_selected
        dv += dv_selected
        inside = spec.compressed
        if inside is None:  # the compressed output is an input of the node: its gradient g dO
            d_compressed = (grad_out * log_gates[0].exp()[..., None]).to(compressed.dtype)
            return dq, dk, dv, d_compressed, None, None, d_weight, d_bias, None
        out, lse = saved
        front, rows, skipped, lead, tail = inside.geometry
        stride, skip = spec.module.compress_stride, skipped - lead
        # dO, delta and log g regrouped as the queries were; the lead rows' outputs were discarded
        # (their tokens see no compressed token), so their gradient is 0 there, not the tokens'.
        d_out = inside.regroup.regroup_triton(
            grad_out, to_residue=True, front=front, stride=stride, skip=skip, rows=rows + tail
        )
        delta, log_gate = (
            to_residues_reference(x[..., None], front, rows + tail, stride, skip)[..., 0]
            for x in (dots[0], log_gates[0])
        )
        if lead:
            d_out[:, :, :lead] = 0
            delta[:, :, :lead] = 0
        dq_grouped, dk_rep, dv_rep = ctx.compressed_backward(
            inside.grouped, inside.k_rep, inside.v_rep, out, lse - log_gate, d_out, None, delta=delta.contiguous()
        )
        inside.regroup.regroup_triton(
            dq_grouped, to_residue=False, front=front, stride=stride, skip=skip, rows=q.shape[2], add_to=dq
        )
        batch = q.shape[0]
        dk_cmp, dv_cmp = (x.view(batch, stride, *x.shape[1:]).sum(1)[:, :, : inside.n_cmp] for x in (dk_rep, dv_rep))
        return dq, dk, dv, None, dk_cmp, dv_cmp, d_weight, d_bias, None
