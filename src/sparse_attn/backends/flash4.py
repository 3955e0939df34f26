"""FlashAttention-4 backend: the plan's ``BlockMask`` run by FlexAttention's FLASH backend.

FlexAttention (PyTorch 2.9+) can lower a ``BlockMask`` to FlashAttention-4's CuTe-DSL kernels
(``kernel_options={"BACKEND": "FLASH"}``) instead of its own Triton template: a Hopper
(sm_90) forward and backward, and Blackwell ones. This backend is that path, fed by the same
plan-made ``BlockMask`` as :mod:`.flex` (full blocks in the ``full_kv_*`` lists, the partial
ones with the causal / bounds ``mask_mod``), so the pattern is converted once per (pattern,
causal, heads) and cached on the pattern.

It runs only where its optional pieces are installed: the ``flash-attn-4`` package (module
``flash_attn.cute``) and NVIDIA's CUTLASS DSL (module ``cutlass``, from
``nvidia-cutlass-dsl``), ``pip install "sparse-attn[flash4]"``. Elsewhere (no GPU, no FA4, CPU
users, CI) it reports why in :func:`unsupported_reason` and a call naming it falls back to the
reference backend with one warning; ``auto`` considers it only where it is installed (see
:func:`sparse_attn.backends.resolve_backend`).

Scope (checked in :func:`unsupported_reason`): CUDA compute capability 9.x or 10.x,
float16/bfloat16, head_dim a multiple of 8 up to 256 on 9.x (up to 128 on 10.x, FA4's own
limits), ``block_q`` a multiple of 64 and ``block_k`` a multiple of 16 (FA4's Hopper tile
must divide the mask's blocks; its tile_n is shrunk to ``block_k`` when that is smaller).

Gradients: FA4's block-sparse backward on sm_90 returned wrong gradients at head_dim 64
(Dao-AILab/flash-attention issue 2623, FA4 4.0.0b-series); :func:`gradient_unsupported_reason`
therefore refuses head_dim < 128 on sm_90 and the call falls back to the next backend with a
warning. Whether the installed version still has the bug is checked by the GPU tests
(``tests/backends/test_flash4.py``), which compare FA4's gradients with the reference backend.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..pattern import BlockSparsePattern
from ..plan import BlockSparsePlan
from ..utils import device_capability
from . import flex

name = "flash4"

# The options that send FlexAttention's lowering to FA4's CuTe-DSL kernels.
_FLASH_OPTIONS = {"BACKEND": "FLASH"}

# The case classes where FA4 was measured faster than our kernels on Hopper, so ``auto`` takes
# it there: (phase, head_dim, seq_k range [lo, hi), pattern density range [lo, hi)).
# Phase "forward" is inference, "training" forward + backward. From
# benchmarks/results/h200/kernels.json and training.json (see the README); empty until measured.
FASTER_CASES: tuple[tuple[str, int, tuple[int, int], tuple[float, float]], ...] = ()


@functools.cache
def installed() -> str | None:
    """Why FA4 cannot be imported here (a sentence), or ``None`` when its modules are installed."""
    for module, package in (("cutlass", "nvidia-cutlass-dsl"), ("flash_attn.cute", "flash-attn-4")):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"FlashAttention-4 is not installed (no module {module!r}; pip install {package})"
    return None


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str | None:
    """Why FA4 through FlexAttention cannot run this case, or ``None`` when it can."""
    if q.device.type != "cuda":
        return "the flash4 backend needs a CUDA device"
    capability = device_capability(q.device)
    if capability is None or capability[0] not in (9, 10):
        return f"FlashAttention-4 runs on compute capability 9.x and 10.x, not {capability}"
    missing = installed()
    if missing is not None:
        return missing
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-4 takes float16 and bfloat16, not {q.dtype}"
    dim = q.shape[-1]
    max_dim = 256 if capability[0] == 9 else 128
    if dim % 8 or dim > max_dim:
        return f"FlashAttention-4 on compute capability {capability[0]}.x takes head_dim a multiple of 8 up to {max_dim}, not {dim}"
    if pattern.block_q % 64 or pattern.block_k % 16:
        return (
            "FlashAttention-4's block-sparse path needs block_q a multiple of 64 and block_k a multiple of 16, "
            f"got {pattern.block_q} x {pattern.block_k}"
        )
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool = False,
):
    """Block-sparse attention through FlexAttention's FLASH backend. Shapes as in
    :func:`sparse_attn.block_sparse_attention`; differentiable through FlexAttention's autograd."""
    return flex.attend(
        q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse, kernel_options=dict(_FLASH_OPTIONS)
    )


def slower_than_ours_reason(q: torch.Tensor, plan: BlockSparsePlan, *, needs_grad: bool) -> str | None:
    """Why ``auto`` does not take FA4 for this case (it was not measured faster than our kernels
    for its class in :data:`FASTER_CASES`), or ``None`` when it does."""
    phase = "training" if needs_grad else "forward"
    pattern = plan.pattern
    density = plan.density
    for case_phase, dim, (seq_lo, seq_hi), (density_lo, density_hi) in FASTER_CASES:
        if (
            case_phase == phase
            and dim == q.shape[-1]
            and seq_lo <= pattern.seq_k < seq_hi
            and density_lo <= density < density_hi
        ):
            return None
    return f"FlashAttention-4 was not measured faster than our kernels for this {phase} case"


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend does not differentiate this case, or ``None`` (see the module docstring)."""
    capability = device_capability(q.device)
    if capability is not None and capability[0] == 9 and q.shape[-1] < 128:
        return (
            "FlashAttention-4's block-sparse backward on sm_90 returned wrong gradients below head_dim 128 "
            "(flash-attention issue 2623)"
        )
    return None
