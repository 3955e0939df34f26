"""The gated sum of NSA's branch outputs in one pass: gates from q and the branches read once.

One program per (batch and head, tile of ``BLOCK_M`` query rows): the rows of q, the head's
gate weights, the gates ``sigmoid(q . W + b)`` (the product rounded to q's dtype, as the
reference's ``einsum``), then each branch's tile weighted and summed in float32 and written in
q's dtype. It reads q and the branches once and writes the output once: about 1.5 ms for three
branches of 64 heads x 64K tokens x 128 in bf16 on an H200, where the PyTorch reference runs a
batched product with three columns and a chain of elementwise kernels over float32
intermediates (about 6 ms; ``benchmarks/results/h200/nsa_prefill_profile_64k_s40.log``).

Backward (:func:`gated_sum_backward_triton`): one pass of the same tiling recomputes the gates
and writes each branch's gradient ``g dO``, q's gradient through the gates
``sum_b d logit_b W[h, :, b]`` and the float32 ``d logit_b = (dO . branch_b) g_b (1 - g_b)``; the
weight's gradient from per-tile float32 partial sums, the bias's from the logit gradients.
``folded=True`` writes, instead of the branches' gradients, two float32 values per row and
branch from which an attention backward gets the gradient of ``g_b dO`` without it being
written (see :func:`gated_sum_backward_triton`).
"""

from __future__ import annotations

import torch

from ...backends import launch
from .._dispatch import head_tile_unsupported_reason

try:
    import triton
    import triton.language as tl

    from .._triton_util import nsa_gate
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["gated_sum_backward_triton", "gated_sum_triton", "unsupported_reason"]


def unsupported_reason(q: torch.Tensor, *, head_dim: int) -> str | None:
    """Why :func:`gated_sum_triton` cannot run this case, or ``None``."""
    reason = head_tile_unsupported_reason(q, head_dim, triton)
    if reason is not None:
        return reason
    return None


if triton is not None:

    @triton.jit
    def _branch_tile(X, b, h, rows, row_ok, stride_b, stride_h, stride_s, HEAD_DIM: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        pointers = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + rows.to(tl.int64)[:, None] * stride_s
        return tl.load(pointers + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)

    @triton.jit(do_not_specialize=["seq"])
    def _gated_sum(
        Q, A, B, C, W, Bias, Out, heads, seq,
        stride_qb, stride_qh, stride_qs, stride_ab, stride_ah, stride_as, stride_bb, stride_bh, stride_bs,
        stride_cb, stride_ch, stride_cs, stride_ob, stride_oh, stride_os,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, NUM_BRANCHES: tl.constexpr, NUM_GATES: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1) // heads
        h = tl.program_id(1) % heads
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seq
        offs_d = tl.arange(0, HEAD_DIM)
        q_pointers = (
            Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows.to(tl.int64)[:, None] * stride_qs
        )
        q = tl.load(q_pointers + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        out = (
            _branch_tile(A, b, h, rows, row_ok, stride_ab, stride_ah, stride_as, HEAD_DIM)
            * nsa_gate(q, W, Bias, h, 0, NUM_GATES, HEAD_DIM)[:, None]
        )
        out += (
            _branch_tile(B, b, h, rows, row_ok, stride_bb, stride_bh, stride_bs, HEAD_DIM)
            * nsa_gate(q, W, Bias, h, 1, NUM_GATES, HEAD_DIM)[:, None]
        )
        if NUM_BRANCHES == 3:
            out += (
                _branch_tile(C, b, h, rows, row_ok, stride_cb, stride_ch, stride_cs, HEAD_DIM)
                * nsa_gate(q, W, Bias, h, 2, NUM_GATES, HEAD_DIM)[:, None]
            )
        out_pointers = (
            Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows.to(tl.int64)[:, None] * stride_os
        )
        tl.store(out_pointers + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _gate_grads(X, DX, Dot, LogGate, dout, gate, offsets, row_index, row_ok, HEAD_DIM: tl.constexpr,
                    FOLD: tl.constexpr):  # fmt: skip
        """One branch's backward on a tile: ``dX = g dO`` stored (unless ``FOLD``: then the float32
        ``dO . X`` and ``log g`` per row instead), and ``d logit = (dO . X) g (1 - g)`` returned."""
        offs_d = tl.arange(0, HEAD_DIM)
        x = tl.load(X + offsets[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        dot = tl.sum(dout * x, 1)
        if FOLD:
            tl.store(Dot + row_index, dot, mask=row_ok)
            tl.store(LogGate + row_index, tl.log(gate), mask=row_ok)
        else:
            tl.store(DX + offsets[:, None] + offs_d[None, :], (dout * gate[:, None]).to(DX.dtype.element_ty),
                     mask=row_ok[:, None])  # fmt: skip
        return dot * gate * (1.0 - gate)

    @triton.jit(do_not_specialize=["seq"])
    def _gated_sum_backward(
        Q, A, B, C, W, Bias, DOut, DA, DB, DC, DQ, DLogits, DWeight, DotA, DotB, DotC, LogA, LogB, LogC, heads,
        seq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, NUM_BRANCHES: tl.constexpr, NUM_GATES: tl.constexpr,
        FOLD: tl.constexpr,
    ):  # fmt: skip
        """Contiguous ``(B, H, S, D)`` tensors: the branches' gradients, q's gradient through the gates
        (``sum_b d logit_b W[h, :, b]``), the float32 ``d logit`` ``(B, H, S, NUM_GATES)`` (0 for unused
        gates) and this tile's float32 share of the weight's gradient, ``DWeight[b, h, tile] = sum over
        its rows of q d logit`` ``(D, NUM_GATES)`` (0 for unused gates). ``FOLD``: no branch gradient;
        per branch the float32 ``(B, H, S)`` ``dO . branch`` (``DotA``, ...) and ``log g`` (``LogA``, ...)."""
        bh = tl.program_id(1)
        h = bh % heads
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seq
        offs_d = tl.arange(0, HEAD_DIM)
        offsets = (bh.to(tl.int64) * seq + rows) * HEAD_DIM
        q = tl.load(Q + offsets[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        dout = tl.load(DOut + offsets[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        logit_rows = DLogits + (bh.to(tl.int64) * seq + rows) * NUM_GATES
        w_base = W + h * (HEAD_DIM * NUM_GATES) + offs_d * NUM_GATES
        weight_part = (
            DWeight + ((bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * HEAD_DIM + offs_d) * NUM_GATES
        )
        q_rows = q.to(tl.float32)
        row_index = bh.to(tl.int64) * seq + rows
        d_logit = _gate_grads(
            A, DA, DotA, LogA, dout, nsa_gate(q, W, Bias, h, 0, NUM_GATES, HEAD_DIM), offsets, row_index, row_ok,
            HEAD_DIM, FOLD,
        )  # fmt: skip
        tl.store(logit_rows, d_logit, mask=row_ok)
        tl.store(weight_part, tl.sum(q_rows * d_logit[:, None], 0))
        dq = d_logit[:, None] * tl.load(w_base).to(q.dtype).to(tl.float32)[None, :]
        d_logit = _gate_grads(
            B, DB, DotB, LogB, dout, nsa_gate(q, W, Bias, h, 1, NUM_GATES, HEAD_DIM), offsets, row_index, row_ok,
            HEAD_DIM, FOLD,
        )  # fmt: skip
        tl.store(logit_rows + 1, d_logit, mask=row_ok)
        tl.store(weight_part + 1, tl.sum(q_rows * d_logit[:, None], 0))
        dq += d_logit[:, None] * tl.load(w_base + 1).to(q.dtype).to(tl.float32)[None, :]
        if NUM_BRANCHES == 3:
            d_logit = _gate_grads(
                C, DC, DotC, LogC, dout, nsa_gate(q, W, Bias, h, 2, NUM_GATES, HEAD_DIM), offsets, row_index, row_ok,
                HEAD_DIM, FOLD,
            )  # fmt: skip
            tl.store(logit_rows + 2, d_logit, mask=row_ok)
            tl.store(weight_part + 2, tl.sum(q_rows * d_logit[:, None], 0))
            dq += d_logit[:, None] * tl.load(w_base + 2).to(q.dtype).to(tl.float32)[None, :]
        for unused in tl.static_range(NUM_BRANCHES, NUM_GATES):
            tl.store(logit_rows + unused, tl.zeros([BLOCK_M], dtype=tl.float32), mask=row_ok)
            tl.store(weight_part + unused, tl.zeros([HEAD_DIM], dtype=tl.float32))
        tl.store(DQ + offsets[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def gated_sum_triton(
    q: torch.Tensor, branches: tuple[torch.Tensor, ...], weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """:func:`.naive.gated_sum_reference` in one kernel: same arguments and result (no gradient)."""
    batch, heads, seq, dim = q.shape
    reason = unsupported_reason(q, head_dim=dim)
    if reason is not None:
        raise ValueError(f"the gated-sum kernel cannot run this case: {reason}")
    q, *branches = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, *branches))
    weight, bias = weight.contiguous(), bias.contiguous()
    out = launch.allocate((batch, heads, seq, dim), q.dtype, q.device)
    third = branches[2] if len(branches) == 3 else branches[1]
    block_m = 32 if dim == 256 else 64
    _gated_sum[(triton.cdiv(seq, block_m), batch * heads)](
        q, branches[0], branches[1], third, weight, bias, out, heads, seq,
        *q.stride()[:3], *branches[0].stride()[:3], *branches[1].stride()[:3], *third.stride()[:3],
        *out.stride()[:3], HEAD_DIM=dim, BLOCK_M=block_m, NUM_BRANCHES=len(branches), NUM_GATES=weight.shape[2],
        num_warps=4,
    )  # fmt: skip
    return out


def gated_sum_backward_triton(
    q: torch.Tensor,
    branches: tuple[torch.Tensor, ...],
    weight: torch.Tensor,
    bias: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    folded: bool = False,
) -> tuple:
    """``(dq, dbranches, dweight, dbias)`` of :func:`gated_sum_triton`'s output for ``grad_out``.

    ``folded=True`` returns ``(dq, dweight, dbias, dots, log_gates)`` instead: no branch gradient
    ``g_b dO`` is written; per branch ``b``, float32 ``(B, H, S)``, ``dots[b] = rowsum(dO * branch_b)``
    and ``log_gates[b] = log g_b``. A branch that is an attention output ``O_b = softmax(S_b) V``
    (log-sum-exp ``lse_b``) gets the gradients of ``g_b dO`` from its attention backward run on
    ``dO`` itself with ``lse_b - log_gates[b]`` and ``delta = dots[b]``: its probabilities are then
    ``g_b P``, so ``dV = (g_b P)^T dO`` and ``dS = g_b P * (dO V^T - dO . O_b)``, the gated
    gradient's ``P * (g_b dO V^T - g_b dO . O_b)``. :mod:`sparse_attn.nn.nsa_fused` does this, and
    the three ``(B, H, S, D)`` gradients are neither written nor read.

    One kernel writes the branches' gradients (or the folded values), q's (through the gates),
    each gate's logit gradient and each row tile's share of the weight's gradient, in float32;
    the weight's and bias's gradients are then sums over the batch and the tiles / positions
    (deterministic; float32 where the reference's autograd takes the weight's product in q's
    dtype). A ``torch.einsum`` for the weight's gradient took 1.8 ms at 64 heads x 64K on the
    H200 (a batched product with three columns), about as long as this whole kernel."""
    batch, heads, seq, dim = q.shape
    q, grad_out, *branches = (x.contiguous() for x in (q, grad_out, *branches))
    weight, bias = weight.contiguous(), bias.contiguous()
    gates = weight.shape[2]
    dq = launch.allocate(q.shape, q.dtype, q.device)
    d_logits = launch.allocate((batch, heads, seq, gates), torch.float32, q.device)
    # The outputs the mode does not write are stand-in pointers.
    if folded:
        grads = [dq] * len(branches)
        dots, log_gates = ([launch.allocate(q.shape[:3], torch.float32, q.device) for _ in branches] for _ in range(2))
    else:
        grads = [launch.allocate(x.shape, x.dtype, x.device) for x in branches]
        dots = log_gates = [d_logits] * len(branches)
    block_m = 32 if dim == 256 else 64
    tiles = triton.cdiv(seq, block_m)
    weight_parts = launch.allocate((batch, heads, tiles, dim, gates), torch.float32, q.device)
    last = len(branches) - 1  # the third branch's arguments: the second's again when there are two
    _gated_sum_backward[(tiles, batch * heads)](
        q, branches[0], branches[1], branches[last], weight, bias, grad_out, grads[0], grads[1], grads[last], dq,
        d_logits, weight_parts, dots[0], dots[1], dots[last], log_gates[0], log_gates[1], log_gates[last], heads,
        seq, HEAD_DIM=dim, BLOCK_M=block_m, NUM_BRANCHES=len(branches), NUM_GATES=gates, FOLD=folded, num_warps=4,
    )  # fmt: skip
    d_weight = weight_parts.sum((0, 2)).to(weight.dtype)
    d_bias = d_logits.sum((0, 2)).to(bias.dtype)
    if folded:
        return dq, d_weight, d_bias, tuple(dots), tuple(log_gates)
    return dq, tuple(grads), d_weight, d_bias
