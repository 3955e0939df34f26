"""One NSA decode step (a single query at the end of the keys), fused: compressed, selected and window branches.

Paper: Jingyang Yuan, Huazuo Gao, Damai Dai, et al., "Native Sparse Attention: Hardware-Aligned
and Natively Trainable Sparse Attention", 2025, arXiv:2502.11089, Section 3 (the three branches,
the selection from the compressed branch's probabilities summed over a GQA group, the gates).
The rule and every choice the paper leaves open are :mod:`sparse_attn.nn.nsa`'s; this operator
computes :meth:`sparse_attn.nn.nsa.NativeSparseAttention.decode_step` for one query per
sequence at key position ``p = Sk - 1``:

* compressed: softmax over the visible compressed tokens (``i d + l - 1 <= p``);
* selected: those probabilities summed over the group, spread over the stride pieces each
  compressed token covers, score the selection blocks ``0 .. p // l'``; the first block, the one
  before the query's and the query's own are forced; the best ``min(n, p // l' + 1)`` are kept
  (only the forced ones before any compressed token is visible), ties to the lower block; the
  kept blocks' keys up to ``p``;
* window: the last ``w`` keys;
* ``out = sum_b sigmoid(q . W[:, :, b] + bias[:, b]) * branch_b`` per query head.

Reference: :mod:`.naive` (dense PyTorch operations; differentiable except through the discrete
choice). Kernel: :mod:`.triton` (four launches, no host synchronisation, no autotuning), chosen
on CUDA when no gradient is to be recorded and its ``unsupported_reason`` is ``None`` (the rule
of :mod:`sparse_attn.ops._dispatch`: a CUDA case the kernel cannot run falls back to the
reference with one warning). With gradients to record the reference runs (it is the
differentiable path).
"""

from __future__ import annotations

import torch

from ...checks import check_int, check_key_like, is_finite_number
from .._dispatch import kernel_for
from .naive import nsa_decode_step_reference, selection_size

__all__ = ["check_nsa_decode_inputs", "nsa_decode_step", "nsa_decode_step_reference", "selection_size"]


def check_nsa_decode_inputs(
    q, k, v, k_cmp, v_cmp, gate_weight, gate_bias, *, scale, compress_block, compress_stride, select_block, top_n,
    window,
) -> None:  # fmt: skip
    """Raise ``TypeError``/``ValueError`` naming the argument unless the inputs form a valid step."""
    check_key_like(q, k, "k")
    for name, x in (("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        check_key_like(q, x, name)
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query per sequence (B, Hq, 1, D), got {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if v_cmp.shape != k_cmp.shape or k_cmp.shape[1] != k.shape[1]:
        raise ValueError(
            f"k_cmp and v_cmp must both have shape (B, Hkv, n_cmp, D) with k's {k.shape[1]} heads, "
            f"got {tuple(k_cmp.shape)} and {tuple(v_cmp.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("k must hold at least one key (the query's own)")
    for name, value in (
        ("compress_block", compress_block),
        ("compress_stride", compress_stride),
        ("select_block", select_block),
        ("top_n", top_n),
    ):
        check_int(name, value)
    check_int("window", window, minimum=0)
    for name, value in (("compress_block", compress_block), ("select_block", select_block)):
        if value % compress_stride:
            raise ValueError(f"{name} ({value}) must be a multiple of compress_stride ({compress_stride})")
    whole = max(0, (k.shape[2] - compress_block) // compress_stride + 1)
    if k_cmp.shape[2] < whole:
        raise ValueError(
            f"k_cmp must hold the {whole} compressed tokens of {k.shape[2]} keys (blocks of {compress_block} every "
            f"{compress_stride}), got {k_cmp.shape[2]}"
        )
    q_heads, dim = q.shape[1], q.shape[3]
    for name, x, shape in (("gate_weight", gate_weight, (q_heads, dim, 3)), ("gate_bias", gate_bias, (q_heads, 3))):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not is_finite_number(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")


def nsa_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *,
    scale: float,
    compress_block: int = 32,
    compress_stride: int = 16,
    select_block: int = 64,
    top_n: int = 16,
    window: int = 512,
) -> torch.Tensor:
    """NSA's output ``(B, Hq, 1, D)`` in q's dtype for one query per sequence at the last key.

    q ``(B, Hq, 1, D)``; k, v ``(B, Hkv, Sk, D)`` (``Hq % Hkv == 0``, any group size); k_cmp, v_cmp
    ``(B, Hkv, n_cmp, D)``: the compressed tokens of k, v (at least every whole block's; extra
    ones are not visible and ignored); gate_weight ``(Hq, D, 3)`` and gate_bias ``(Hq, 3)``: the
    gates' projection (compressed, selected, window; the third unused when ``window = 0``).
    Defaults are the paper's. Inputs are validated (:func:`check_nsa_decode_inputs`).
    """
    options = dict(
        scale=scale,
        compress_block=compress_block,
        compress_stride=compress_stride,
        select_block=select_block,
        top_n=top_n,
        window=window,
    )
    tensors = (q, k, v, k_cmp, v_cmp, gate_weight, gate_bias)
    check_nsa_decode_inputs(*tensors, **options)
    recording = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if not recording:
        group = q.shape[1] // k.shape[1]
        kernel = kernel_for(q, __package__, head_dim=q.shape[3], group=group, top_n=top_n)
        if kernel is not None:
            return kernel.nsa_decode_triton(*tensors, **options)
    return nsa_decode_step_reference(*tensors, **options)
