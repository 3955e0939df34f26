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
float16/bfloat16, head_dim a multiple of 8 up to 128 (at 256 FA4's Hopper tiles are 80 keys
wide and refuse 128-key blocks), ``block_q`` a multiple of 64 and ``block_k`` a multiple of 16.

Log-sum-exp: with ``return_lse=True``, PyTorch 2.11's FlexAttention returned FA4's (natural
log) LSE multiplied by ln 2, as if it were in log2 units (measured on an H200: a ratio of
0.6931 on every row); PyTorch 2.13's source converts only the Triton backend's. So the LSE is
divided by ln 2 on 2.11, taken as is from 2.13 on, and refused (fallback) on other versions,
which were not checked.

Gradients: the flash-attention issue 2623 reports wrong block-sparse gradients at head_dim 64
on sm_90. With this FA4 (4.0.0b36) the GPU tests measured head_dim 64 and 128 gradients
matching the reference (relative error 2.5e-3 in bf16 at 1024 tokens, GQA 4, density 0.4), so
nothing is refused; the tests keep checking it.

Dense patterns: a pattern that keeps every block the mode allows (density exactly 1, no token
rule) runs FA4's dense kernel (``flash_attn.cute.flash_attn_func``) instead of the
block-sparse path. Its Hopper tiles differ where the block-sparse path is held to the
pattern's 128-row blocks: at head_dim 64 FA4 takes 192 x 128 tiles (three consumer warpgroups)
for dense attention but falls back to 128 x 128 when the query block is not a multiple of 192
(``_tile_size_fwd_sm90`` in FA4's interface, read for this). Measured in one run on the H200
(``kernels_fa4_s51.json``, 32/8 heads, bf16, causal): FA4 dense 13.18 / 213.1 ms at 32K / 128K
(head_dim 128) and 8.08 / 130.3 (head_dim 64), against the FLASH path on the dense pattern
13.32 / 236.2 and 9.28 / 146.1, and our Gluon kernel 13.91 / 221.0 and 9.46 / 149.4. The
dense call itself (strided views, no copies) runs at FA4's own dense speed: 13.23 / 217.87 ms and
7.99 / 127.71 through this backend against FA4 dense called directly on its own layout 13.33 /
215.23 and 8.06 / 128.72, same run (``kernels_fa4_dense_route_s52.json``; our Gluon kernel there
13.85 / 222.83 and 9.47 / 150.55); the GPU tests' density-1 cases match the reference.

``auto`` (:func:`slower_than_ours_reason`) takes this backend only for case classes measured
faster than our kernels (:data:`FASTER_CASES`), and only from a shape's second call: FA4 is
compiled per shape (seconds each), so a shape seen once (a serving workload with ever-new
lengths) never pays that, while repeated shapes (training steps, benchmarks, fixed-length
batches) move to FA4. Compiling more than FlexAttention's limit of shapes falls back to our
kernels, not to the reference backend.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

from ..compensated_pattern import CompensatedPattern
from ..masked_pattern import token_rule_of
from ..pattern import BlockSparsePattern
from ..plan import BlockSparsePlan, plan_for
from ..utils import device_capability
from . import flex

name = "flash4"

# The options that send FlexAttention's lowering to FA4's CuTe-DSL kernels.
_FLASH_OPTIONS = {"BACKEND": "FLASH"}

# The case classes where FA4 was measured faster than our kernels on Hopper, so ``auto`` takes
# it there: (phase, head_dim, seq_k range [lo, hi), pattern density range [lo, hi)).
# Phase "forward" is inference, "training" forward + backward. From
# benchmarks/results/h200/kernels.json and training.json (see ``docs/h200.md``); empty until measured.
FASTER_CASES: tuple[tuple[str, int, tuple[int, int], tuple[float, float]], ...] = (
    # Forward, head_dim 128, 32K: faster at every density before our kernels issued their work in
    # L2-sized waves (0.92 vs 1.04 ms at 0.05, 13.7 vs 14.6 dense); with waves ours took 0.91 /
    # 1.61 / 2.98 / 13.89 ms at 0.05 / 0.1 / 0.2 / dense against FA4's 0.92 / 1.64 / 2.99 / 13.73
    # from the earlier run (kernels_waves_auto.json vs kernels_fa4.json): level, kept for FA4.
    # At 128K FA4 was faster up to density 0.2 (12.8 vs 13.2 ms at 0.05) before the waves; with
    # them ours is 3-9 % faster there (12.13 vs 12.75 ms at 0.05, 45.81 vs 49.42 at 0.2), so 128K
    # forwards stay on our kernels.
    ("forward", 128, (0, 65536), (0.0, 1.01)),
    # Forward, head_dim 64, 32K: level or faster from density 0.2 up (2.01 vs 2.04 ms at 0.2,
    # 9.28 vs 9.46 dense), slower below (0.66 vs 0.62 ms at 0.05, 1.11 vs 1.09 at 0.1: same run,
    # kernels_fa4_s51.json, thirty-first session; the earlier run had FA4 ahead at 0.05 too).
    ("forward", 64, (0, 65536), (0.15, 1.01)),
    # Forward, head_dim 64, 128K, dense: 146.06 vs 149.35 ms; level from 0.05 to 0.2 (8.12 vs
    # 8.11, 15.66 vs 15.71, 30.60 vs 30.47), so patterns stay on our kernels (same run).
    ("forward", 64, (65536, 196608), (0.5, 1.01)),
    # Forward, head_dim 128, 128K, dense patterns (which run FA4's dense kernel, see the module
    # docstring): 213.1 ms against our 221.0 (the FLASH path took 236.2 there; same run); through
    # this backend 217.87 against our 222.83 (kernels_fa4_dense_route_s52.json).
    ("forward", 128, (65536, 196608), (1.0, 1.01)),
    # Forward + backward, head_dim 128, 32K and 128K: 1.4-1.8x faster than ours at every density
    # (7.3 vs 10.6 ms at 32K density 0.1; 96.6 vs 165.5 at 128K) before our Gluon backward; with it,
    # at 32K, 4.11 / 6.94 / 11.79 / 49.78 ms (densities 0.05 / 0.1 / 0.2 / dense, the dense one
    # through FA4's dense kernel) against 4.15 / 7.16 / 13.72 / 60.69 (training_fa4_s52.json).
    ("training", 128, (0, 196608), (0.0, 1.01)),
    # Forward + backward, head_dim 64, 32K: 2.37 / 4.02 / 6.95 / 28.63 ms against our 2.60 / 4.56 /
    # 8.71 / 39.96 (same run); 128K not measured.
    ("training", 64, (0, 65536), (0.0, 1.01)),
)

# Shapes auto has seen (insertion-ordered, oldest dropped first): FA4 from a shape's second call.
_SEEN_SHAPES: dict[tuple, None] = {}
_SEEN_SHAPES_KEPT = 4096


@functools.cache
def installed() -> str | None:
    """Why FA4 cannot be imported here (a sentence), or ``None`` when its modules are installed."""
    for module, package in (("cutlass", "nvidia-cutlass-dsl"), ("flash_attn.cute", "flash-attn-4")):
        try:
            # find_spec of "flash_attn.cute" imports the flash_attn package; an older FlashAttention
            # installed under that name may fail to import in any way: then FA4 is not usable.
            found = importlib.util.find_spec(module) is not None
        except Exception:
            found = False
        if not found:
            return f"FlashAttention-4 is not installed (no module {module!r}; pip install {package})"
    return None


def _lse_correction() -> float | None:
    """What to multiply FlexAttention's FLASH log-sum-exp by to get natural-log units on this
    PyTorch, or ``None`` where that was not checked (see the module docstring)."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version == (2, 11):
        return 1.0 / math.log(2.0)
    if version >= (2, 13):
        return 1.0
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
    if dim % 8 or dim > 128:
        return f"the flash4 backend takes head_dim a multiple of 8 up to 128, not {dim}"
    if pattern.block_q % 64 or pattern.block_k % 16:
        return (
            "FlashAttention-4's block-sparse path needs block_q a multiple of 64 and block_k a multiple of 16, "
            f"got {pattern.block_q} x {pattern.block_k}"
        )
    if return_lse and _lse_correction() is None:
        return f"the flash4 backend's log-sum-exp was not checked on PyTorch {torch.__version__}"
    return None


def keeps_every_block(pattern: BlockSparsePattern, *, causal: bool) -> bool:
    """Whether ``pattern`` is plain dense attention: no token rule, no compensated blocks, and
    every block the mode allows kept (density exactly 1: a valid pattern's lists are unique, so
    that is every causally visible block, or every block without ``causal``; one host sync,
    cached on the plan)."""
    if token_rule_of(pattern) is not None or isinstance(pattern, CompensatedPattern):
        return False
    return plan_for(pattern, causal=causal).density == 1.0


def _dense_attention(q, k, v, *, causal: bool, scale: float, return_lse: bool):
    """FA4's dense kernel on ``(B, Hq, Sq, D)`` tensors: transposed views in its ``(B, S, H, D)``
    layout (FA4 reads strided, 16-byte-aligned layouts without a copy), GQA native, causal
    aligned to the last query as ours (``Sq < Sk``: query ``i`` at position ``Sk - Sq + i``), its
    log-sum-exp in natural-log units ``(B, Hq, Sq)``. The output is a transposed view of FA4's
    ``(B, Sq, Hq, D)`` result (as SDPA's fused kernels return), differentiable through FA4's
    own backward."""
    from flash_attn.cute import flash_attn_func

    out, lse = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,
        return_lse=return_lse,
    )
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


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
    :func:`sparse_attn.block_sparse_attention`; differentiable through FlexAttention's autograd.
    A pattern that keeps every block (:func:`keeps_every_block`) runs FA4's dense kernel instead
    (see the module docstring)."""
    if keeps_every_block(pattern, causal=causal):
        return _dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    result = flex.attend(
        q,
        k,
        v,
        pattern,
        causal=causal,
        scale=scale,
        return_lse=return_lse,
        kernel_options=dict(_FLASH_OPTIONS),
        on_recompile_limit=("gluon or triton", _our_kernels),
    )
    if not return_lse:
        return result
    out, lse = result
    correction = _lse_correction()
    return out, (lse if correction == 1.0 else lse * correction)


def _our_kernels(q, k, v, pattern, *, causal: bool, scale: float, return_lse: bool):
    """Our fastest kernel for the case, for when FlexAttention has compiled too many shapes."""
    from . import get_backend, run_backend

    name = (
        "gluon"
        if get_backend("gluon").unsupported_reason(q, k, v, pattern, return_lse=return_lse) is None
        else "triton"
    )
    return run_backend(name, q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)


def slower_than_ours_reason(q: torch.Tensor, k: torch.Tensor, plan: BlockSparsePlan, *, needs_grad: bool) -> str | None:
    """Why ``auto`` does not take FA4 for this case, or ``None`` when it does: its class must be in
    :data:`FASTER_CASES` and its shape seen before (see the module docstring)."""
    phase = "training" if needs_grad else "forward"
    pattern = plan.pattern
    density = plan.density
    measured = any(
        case_phase == phase
        and dim == q.shape[-1]
        and seq_lo <= pattern.seq_k < seq_hi
        and density_lo <= density < density_hi
        for case_phase, dim, (seq_lo, seq_hi), (density_lo, density_hi) in FASTER_CASES
    )
    if not measured:
        return f"FlashAttention-4 was not measured faster than our kernels for this {phase} case"
    shape = (tuple(q.shape), tuple(k.shape), q.dtype, plan.causal, pattern.num_heads, needs_grad)
    if shape not in _SEEN_SHAPES:
        _SEEN_SHAPES[shape] = None
        if len(_SEEN_SHAPES) > _SEEN_SHAPES_KEPT:
            _SEEN_SHAPES.pop(next(iter(_SEEN_SHAPES)))
        return (
            "first call at this shape: FlashAttention-4 compiles per shape, so a shape seen once stays on our kernels"
        )
    return None


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend does not differentiate this case, or ``None``: FlexAttention's FLASH
    backward (FA4's) runs every case the forward takes (see the module docstring)."""
    return None
