"""FlexAttention backend: PyTorch's compiled FlexAttention driven by the pattern as a ``BlockMask``.

The fast path on CPU and the "what users would pick instead" baseline on GPU. The
compiled function is created once; ``torch.compile`` then specializes once per shape
(the ``mask_mod`` objects are cached per geometry so they never force a recompile).

Dynamo's default of 8 specializations per function is too few for a library called at
many lengths, and past it Dynamo silently runs FlexAttention *eagerly*, which
materializes the full score matrix (and, in PyTorch 2.13, mishandles sequence tails).
So calls raise the limit and turn "limit hit" into an error, which this backend answers
by falling back to the reference backend with a warning.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..pattern import BlockSparsePattern
from .reference import reference_attention

_SPECIALIZATION_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_unsupported_reason(q: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool) -> str | None:
    """Why FlexAttention cannot run this case, or ``None`` when it can."""
    if q.device.type == "cpu" and return_lse:
        return "FlexAttention on CPU cannot return the log-sum-exp"
    if q.device.type not in ("cpu", "cuda"):
        return f"FlexAttention does not run on {q.device.type}"
    if q.dtype == torch.float64:
        return "FlexAttention does not take float64"
    if q.device.type == "cuda" and (pattern.block_q % 16 or pattern.block_k % 16):
        return "FlexAttention on CUDA needs block sizes that are multiples of 16"
    return None


def _kernel_options(q: torch.Tensor, pattern: BlockSparsePattern) -> dict | None:
    if q.device.type != "cuda":
        return None
    if q.dtype == torch.float32 and q.shape[-1] > 128:
        # float32 tiles at head_dim 256 overflow shared memory unless they are small.
        return {"BLOCK_M": min(pattern.block_q, 32), "BLOCK_N": min(pattern.block_k, 32)}
    # Flex's CUDA kernel tiles must divide the block mask's blocks; its defaults are 128.
    if pattern.block_q >= 128 and pattern.block_k >= 128:
        return None
    return {"BLOCK_M": min(pattern.block_q, 128), "BLOCK_N": min(pattern.block_k, 128)}


def flex_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool = False,
    block_mask=None,
):
    """Block-sparse attention through FlexAttention. ``block_mask`` may be passed to reuse one."""
    if block_mask is None:
        expand = pattern.num_heads not in (1, q.shape[1])
        num_q_heads = q.shape[1] if expand else None
        # Planned once per pattern and reused by later calls (building it costs a few kernels).
        block_mask = pattern.cached_plan(("block_mask", causal, num_q_heads))
        if block_mask is None:
            block_mask = pattern.store_plan(
                ("block_mask", causal, num_q_heads), pattern.to_block_mask(causal=causal, num_q_heads=num_q_heads)
            )
    flex = _compiled_flex_attention()
    group = q.shape[1] // k.shape[1]
    limits = dict(
        recompile_limit=_SPECIALIZATION_LIMIT,
        accumulated_recompile_limit=8 * _SPECIALIZATION_LIMIT,
        fail_on_recompile_limit_hit=True,
    )
    try:
        with torch._dynamo.config.patch(**limits):
            result = flex(
                q,
                k,
                v,
                block_mask=block_mask,
                scale=scale,
                enable_gqa=group > 1,
                return_lse=return_lse,
                kernel_options=_kernel_options(q, pattern),
            )
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        warnings.warn(
            f"FlexAttention was compiled for more than {_SPECIALIZATION_LIMIT} shapes: using the reference backend",
            stacklevel=3,
        )
        return reference_attention(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
    if return_lse:
        out, lse = result
        return out, lse.float()
    return result
