"""The launch ABI the Triton and the Gluon kernel share.

Both kernels take the same leading runtime arguments (tensors, strides, head mapping, lengths,
scale), built once here by :func:`launch_arguments`, and both may read tiles through tensor
descriptors made on the device, which need :func:`descriptor_compatible` tensors and global
scratch from Triton's allocator (:func:`ensure_scratch_allocator`). Outputs come from
:func:`allocate`, which tests replace to poison outputs so unwritten elements show.
"""

from __future__ import annotations

import functools

import torch

from ..pattern import BlockSparsePattern
from ..plan import BlockSparsePlan
from ..utils import dot_in_float32
from . import configs

try:
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = [
    "allocate",
    "descriptor_compatible",
    "ensure_scratch_allocator",
    "heads_per_wave",
    "launch_arguments",
    "lead_blocks",
    "mode_constants",
    "scratch_buffer",
    "streams_per_wave",
]

LOG2_E = 1.4426950408889634


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialized kernel output (every element the kernel computes is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def descriptor_compatible(x: torch.Tensor) -> bool:
    """Whether a kernel may read this (B, H, S, D) tensor through tensor descriptors.

    The kernels build one descriptor per (batch, head) at ``x[b, h]`` with strides
    ``(stride(2), 1)``, so that address and every stride the base offset uses must be a
    multiple of 16 bytes, and rows must be contiguous and not overlap. A stride of a size-1
    dimension never enters an address and is not checked.
    """
    size = x.element_size()
    if x.stride(-1) != 1 or x.data_ptr() % 16:
        return False
    if x.stride(2) < x.shape[3] or (x.stride(2) * size) % 16:
        return False
    return all(x.shape[d] == 1 or (x.stride(d) * size) % 16 == 0 for d in (0, 1))


def scratch_buffer(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for device-side tensor descriptors (128 bytes each, per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Install :func:`scratch_buffer` as Triton's allocator unless one is already set.

    Kernels that build tensor descriptors on the device ask ``triton.set_allocator``'s
    allocator for global scratch at launch and fail without one. Triton 3.6 has no public
    getter, so the current allocator is read from ``triton.runtime._allocation``; an allocator
    the caller set is kept. Should that private module change, ours is installed regardless
    (a launch without any allocator would fail). The allocator is a context variable: a thread
    that has none gets ours on its first descriptor-reading call.
    """
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(scratch_buffer)


def flat_descriptor(x: torch.Tensor, rows: int):
    """A Gluon TMA descriptor over ``x`` (float16/bfloat16, contiguous) flattened to ``(B*H*S, D)``,
    tiles of ``rows`` rows with the default NVMMA shared layout (the one the Gluon kernels allocate)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dim = x.shape[-1]
    element = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([rows, dim], element)
    return TensorDescriptor.from_tensor(x.view(-1, dim), [rows, dim], layout)


def block_list_strides(counts: torch.Tensor, indices: torch.Tensor, pattern_batch: int) -> tuple[int, ...]:
    """The five strides the kernels take for a block list: ``counts`` (batch, head) and
    ``indices`` (batch, head, row), with a batch stride of 0 when the pattern has batch 1 (one
    pattern broadcast over the batch)."""
    broadcast = pattern_batch == 1
    return (
        *(0 if broadcast else counts.stride(0), counts.stride(1)),
        *(0 if broadcast else indices.stride(0), indices.stride(1), indices.stride(2)),
    )


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def heads_per_wave(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many (batch, query head) pairs the block kernels (the Gluon and Triton forwards, the
    Triton backward's dQ pass; its dK/dV pass takes the same streams) issue their work for together.

    A kernel's programs run in launch order, a GPU's worth at a time. Issued query tile by query
    tile with every head of a tile side by side, the programs in flight at once belong to many
    KV heads, a few each; a sparse row's KV blocks are then rarely the ones another program in
    flight reads, so at long context nearly every K/V tile comes from HBM. Issued in waves of a
    few (batch, KV head) streams instead, all query tiles of a wave (heaviest first) before the
    next wave, the programs in flight share their streams' K/V in L2. A wave holds the largest
    number of streams, dividing ``batch * kv_heads``, whose keys and values together take at most
    half the device's L2 cache (at least one stream): short sequences keep the one wave of
    every stream (the order before waves). The query heads of a wave are its streams' GQA
    groups, consecutive in ``batch * q_heads``. Overridden by
    ``kernel_configs(kv_streams_per_wave=...)`` (``0``: one wave of every stream).
    """
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    streams = batch * kv_heads
    asked = configs.current().kv_streams_per_wave
    if asked is None and k.device.type == "cuda":
        stream_bytes = 2 * k.shape[2] * k.shape[3] * k.element_size()
        asked = streams_per_wave(streams, stream_bytes, _l2_bytes(k.device))
    if not asked:  # 0, or off CUDA without an override: one wave
        asked = streams
    return _largest_divisor_at_most(streams, asked) * (q_heads // kv_heads)


def lead_blocks(plan: BlockSparsePlan, *, keys: bool = False) -> int:
    """How many query blocks of the plan's work order the forward kernels (and the backward's dQ
    pass) issue for every (batch, head) pair, heads side by side, before their waves
    (:func:`heads_per_wave`): the heavy ones (:attr:`sparse_attn.plan.BlockSparsePlan.heavy_blocks`),
    at most all but one. ``keys=True``: the same for the KV blocks of the backward's dK/dV pass
    (:attr:`~sparse_attn.plan.BlockSparsePlan.heavy_kv_blocks`, in the transposed lists' work order).

    Within a wave the heaviest query blocks come first, but a wave starts only when the one
    before has been issued: a row far longer than the others (text tokens that attend a whole
    video: 936 blocks against a mean of 26) then starts with its wave, late for the last waves,
    and runs on alone after every other program has finished. Issued first, every head's long
    rows run beside all the waves. ``kernel_configs(heavy_rows_first=False)`` turns the lead off.
    Without waves (one wave of every head) the order is the same either way.
    """
    if configs.current().heavy_rows_first is False:
        return 0
    if keys:
        return min(plan.heavy_kv_blocks, plan.pattern.num_kv_blocks - 1)
    return min(plan.heavy_blocks, plan.pattern.num_q_blocks - 1)


def streams_per_wave(streams: int, stream_bytes: int, l2_bytes: int) -> int:
    """The streams of one wave: the most, dividing ``streams``, whose ``stream_bytes`` each (keys
    and values) take at most half of ``l2_bytes`` together; at least 1."""
    return _largest_divisor_at_most(streams, max(1, l2_bytes // 2 // stream_bytes))


def _largest_divisor_at_most(value: int, limit: int) -> int:
    divisor = max(1, min(limit, value))
    while value % divisor:
        divisor -= 1
    return divisor


def launch_arguments(q, k, v, plan: BlockSparsePlan, *, scale: float, return_lse: bool, lists=None):
    """``(out, lse, args)``: the outputs (from :func:`allocate`) and the leading runtime
    arguments both kernels take, ``Q`` through ``qk_scale`` (``lse`` is ``out`` when not asked
    for; the kernels then never touch it). ``lists``: ``(full_counts, kv_indices)`` to walk
    instead of the plan's full counts and the pattern's lists (the Triton kernel's reordered
    lists for a token rule, :attr:`sparse_attn.plan.BlockSparsePlan.rule_lists`), same shapes."""
    pattern = plan.pattern
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    out = allocate((batch, q_heads, seq_q, dim), q.dtype, q.device)
    lse = allocate((batch, q_heads, seq_q), torch.float32, q.device) if return_lse else out
    full_counts, indices = (plan.full_counts, pattern.kv_indices) if lists is None else lists
    # counts and full counts share one offset computation in the kernels: both contiguous.
    counts = pattern.kv_counts.contiguous()
    indices = indices.contiguous()
    args = (
        *(q, k, v, out, lse, counts, full_counts, indices, plan.work_order),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *block_list_strides(counts, indices, pattern.batch),
        *(q_heads, q_heads // kv_heads, q_heads // pattern.num_heads),
        *(seq_q, seq_k, scale * LOG2_E),
    )
    return out, lse, args


def mode_constants(q: torch.Tensor, k: torch.Tensor, pattern: BlockSparsePattern, *, causal: bool, return_lse: bool):
    """The constexprs the pointer-based Triton kernels share for one case: head dimension, mode,
    whether to write the LSE, float32 dots (and their precision), and whether the query / key
    lengths are whole multiples of the pattern's blocks (no bounds masks)."""
    use_float32_dot = dot_in_float32(q.dtype)
    return dict(
        HEAD_DIM=q.shape[-1],
        CAUSAL=bool(causal),
        WRITE_LSE=bool(return_lse),
        DOT_FP32=use_float32_dot,
        PRECISION="ieee" if use_float32_dot else "tf32",
        EVEN_K=k.shape[2] % pattern.block_k == 0,
        EVEN_Q=q.shape[2] % pattern.block_q == 0,
    )
