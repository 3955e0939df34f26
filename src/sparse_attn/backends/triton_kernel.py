"""Triton backend: block-sparse FlashAttention forward.

One program computes one tile of ``BLOCK_M`` query rows of one query head. It walks only
the KV blocks its query block's list names, with the online softmax of FlashAttention-2:
first the blocks every row sees in full (no mask work), then the rest (diagonal blocks and
sequence tails) with the causal / bounds mask. When the key (query) length is a whole
number of pattern blocks, no bounds masks are built on key (query) loads and stores at all. GQA is resolved by index (query head ``h``
reads KV head ``h // group``), so K and V are never expanded. Pattern blocks may be larger
than the kernel tiles: a query block is split over several programs and a KV block over
several inner iterations.

Tiles are read through pointers (K either row-wise or column-wise), or through TMA tensor
descriptors (constexpr ``USE_TMA``; an autotune axis for 16-bit inputs on compute capability
>= 9 with 16-byte aligned addresses and strides, see ``_load_modes``; on H100 it is up to 6 %
faster than pointer loads on some lengths and densities and slower on others). The
descriptors are made on the device (``tl.make_tensor_descriptor``), one per (batch, head)
for Q, K and V with that head's sequence length as the row bound, so TMA returns zeros for
rows past the end and the masks stay those of the pointer path. Device-side rather than
host-side (``triton.tools.tensor_descriptor.TensorDescriptor``) descriptors because their block
shape follows the autotuned ``BLOCK_M`` / ``BLOCK_N`` inside the kernel (a host descriptor's
block shape is fixed when it is built, so every config would need a pre-hook rewriting the
shared argument), the kernel signature and the pointer path stay as they are (no descriptor
arguments to build, even where descriptors are not allowed), and any (B, H, S, D) strides,
including the (B, S, H, D) storage transformers passes, work with one 2-D descriptor per
head. The price: each program writes its descriptors (128 bytes each) to global scratch
from Triton's allocator, which the launcher installs when none is set, and fences them
before use.

On Hopper, :func:`triton_attention` hands fp16/bf16 cases at head_dim 128 (and 64 on denser
patterns) to the warp-specialized Gluon kernel of :mod:`.gluon_hopper`, which is 8-29 % faster
there (``kernel_choice`` / ``SPARSE_ATTN_KERNEL`` pins one kernel; :func:`gluon_skip_reason`
decides). This kernel runs every other case and every other GPU.

Under ``TRITON_INTERPRET=1`` (CPU tests) one small tile configuration runs instead of the
autotuned set, and bf16 products are taken in float32 because the interpreter's bf16
``dot`` is wrong; the GPU path is tested separately (``pytest -m gpu``).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ..geometry import num_blocks
from ..pattern import BlockSparsePattern

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None


# Output allocator; tests replace it to poison outputs so unwritten elements show.
_empty = torch.empty


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unsupported_reason(q: torch.Tensor, pattern: BlockSparsePattern) -> str | None:
    """Why the Triton kernel cannot run this case, or ``None`` when it can."""
    if triton is None:
        return "triton is not installed (pip install 'sparse-attn[triton]')"
    if q.device.type != "cuda" and not interpreting():
        return f"the Triton kernel needs a CUDA device (got {q.device.type}; set TRITON_INTERPRET=1 to interpret it on CPU)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel takes float16, bfloat16 or float32, not {q.dtype}"
    dim = q.shape[-1]
    if dim not in (16, 32, 64, 128, 256):
        return f"the Triton kernel takes head_dim 16, 32, 64, 128 or 256, not {dim}"
    for name in ("block_q", "block_k"):
        block = getattr(pattern, name)
        if block < 16 or block & (block - 1):
            return f"the Triton kernel needs {name} to be a power of two >= 16, got {block}"
    return None


if triton is not None:

    @triton.jit
    def _attend_blocks(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        index_base,
        first_slot,
        last_slot,
        stride_ks,
        stride_vs,
        query_pos,
        seq_k,
        qk_scale,
        offs_n,
        offs_d,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        K_TRANSPOSED: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_TMA: tl.constexpr,
    ):
        """Online-softmax update over the KV blocks in slots ``[first_slot, last_slot)``.

        ``EVEN_K``: the key length is a multiple of the pattern's KV block, so no listed key
        lies past the end and masked blocks need only the causal mask.

        ``USE_TMA``: ``k_base`` and ``v_base`` are tensor descriptors (``tl.make_tensor_descriptor``
        over this KV head's ``(seq_k, HEAD_DIM)`` rows) instead of pointers; ``stride_ks``,
        ``stride_vs``, ``offs_d`` and ``K_TRANSPOSED`` are then unused.
        """
        SUBTILES: tl.constexpr = BLOCK_K // BLOCK_N
        for step in range(first_slot * SUBTILES, last_slot * SUBTILES):
            kv_block = tl.load(index_base + step // SUBTILES)
            key_start = kv_block * BLOCK_K + (step % SUBTILES) * BLOCK_N
            key_pos = key_start + offs_n
            if USE_TMA:
                # k_base / v_base are (seq_k, HEAD_DIM) tensor descriptors: rows at or past
                # seq_k come back as zeros, and the score mask below hides those keys.
                if MASKED and not EVEN_K:
                    in_bounds = key_pos < seq_k
                k_tile = tl.trans(k_base.load([key_start, 0]))
                v = v_base.load([key_start, 0])
            else:
                # K is read either as (N, D) rows and transposed in registers, or directly as a
                # (D, N) tile; which one is faster depends on the tile shape (autotuned).
                k_rows = k_base + key_pos[:, None] * stride_ks + offs_d[None, :]
                k_columns = k_base + key_pos[None, :] * stride_ks + offs_d[:, None]
                v_rows = v_base + key_pos[:, None] * stride_vs + offs_d[None, :]
                if MASKED and not EVEN_K:
                    in_bounds = key_pos < seq_k
                    if K_TRANSPOSED:
                        k_tile = tl.load(k_columns, mask=in_bounds[None, :], other=0.0)
                    else:
                        k_tile = tl.trans(tl.load(k_rows, mask=in_bounds[:, None], other=0.0))
                    v = tl.load(v_rows, mask=in_bounds[:, None], other=0.0)
                else:
                    if K_TRANSPOSED:
                        k_tile = tl.load(k_columns)
                    else:
                        k_tile = tl.trans(tl.load(k_rows))
                    v = tl.load(v_rows)
            if DOT_FP32:
                scores = tl.dot(q.to(tl.float32), k_tile.to(tl.float32), input_precision=PRECISION)
            else:
                scores = tl.dot(q, k_tile, input_precision=PRECISION)
            if MASKED:
                if EVEN_K:
                    visible = key_pos[None, :] <= query_pos[:, None]
                else:
                    visible = in_bounds[None, :]
                    if CAUSAL:
                        visible = visible & (key_pos[None, :] <= query_pos[:, None])
                if CAUSAL or not EVEN_K:
                    scores = tl.where(visible, scores, float("-inf"))
            # m is kept in scaled (log2) units; the scale is folded into one FMA per score.
            m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
            if MASKED:
                # A row with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(scores * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DOT_FP32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _block_sparse_forward(
        Q,
        K,
        V,
        Out,
        Lse,
        KvCounts,
        KvFullCounts,
        KvIndices,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        stride_ob,
        stride_oh,
        stride_os,
        stride_cb,
        stride_ch,
        stride_ib,
        stride_ih,
        stride_iq,
        num_q_heads,
        group,
        pattern_head_divisor,
        seq_q,
        seq_k,
        qk_scale,
        seq_bucket,  # autotuning keys only: ceil(log2(seq_k)) and ceil(log2(mean kept blocks
        work_bucket,  # per query block)), so long or dense cases do not reuse a short/sparse tuning
        HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        WRITE_LSE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        K_TRANSPOSED: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_Q: tl.constexpr,
        USE_TMA: tl.constexpr,
    ):
        batch_head = tl.program_id(0)
        # Heaviest (last) query tiles first: causal rows grow with position.
        tile = tl.num_programs(1) - 1 - tl.program_id(1)
        batch = batch_head // num_q_heads
        head = batch_head % num_q_heads
        kv_head = head // group
        q_block = tile // (BLOCK_Q // BLOCK_M)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        row_in_range = rows < seq_q
        if USE_TMA:
            # Descriptors over this (batch, head)'s rows, bounded by its sequence length, so rows
            # past the end read as zeros (their outputs are not stored; keys past seq_k are
            # masked out of the scores). From here on k_base / v_base are descriptors.
            q_desc = tl.make_tensor_descriptor(
                q_base, shape=[seq_q, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM]
            )
            q = q_desc.load([tile * BLOCK_M, 0])
            k_base = tl.make_tensor_descriptor(
                k_base, shape=[seq_k, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM]
            )
            v_base = tl.make_tensor_descriptor(
                v_base, shape=[seq_k, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM]
            )
        else:
            q_pointers = q_base + rows[:, None] * stride_qs + offs_d[None, :]
            if EVEN_Q:  # the query length is a multiple of the pattern's query block: no row past the end
                q = tl.load(q_pointers)
            else:
                q = tl.load(q_pointers, mask=row_in_range[:, None], other=0.0)

        pattern_head = head // pattern_head_divisor
        count_offset = batch * stride_cb + pattern_head * stride_ch + q_block
        count = tl.load(KvCounts + count_offset)
        full_count = tl.load(KvFullCounts + count_offset)
        index_base = KvIndices + batch.to(tl.int64) * stride_ib + pattern_head * stride_ih + q_block * stride_iq
        query_pos = rows + (seq_k - seq_q)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k_base, v_base, index_base, 0, full_count, stride_ks, stride_vs,
            query_pos, seq_k, qk_scale, offs_n, offs_d,
            BLOCK_K, BLOCK_N, False, CAUSAL, DOT_FP32, PRECISION, K_TRANSPOSED, EVEN_K, USE_TMA,
        )  # fmt: skip
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k_base, v_base, index_base, full_count, count, stride_ks, stride_vs,
            query_pos, seq_k, qk_scale, offs_n, offs_d,
            BLOCK_K, BLOCK_N, True, CAUSAL, DOT_FP32, PRECISION, K_TRANSPOSED, EVEN_K, USE_TMA,
        )  # fmt: skip

        out = acc / l_i[:, None]
        out_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        out_pointers = out_base + rows[:, None] * stride_os + offs_d[None, :]
        if EVEN_Q:
            tl.store(out_pointers, out.to(Out.dtype.element_ty))
        else:
            tl.store(out_pointers, out.to(Out.dtype.element_ty), mask=row_in_range[:, None])
        if WRITE_LSE:
            # Scores were kept in log2 units; the LSE is returned in natural-log units.
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
            tl.store(Lse + batch_head.to(tl.int64) * seq_q + rows, lse, mask=row_in_range)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, per head_dim, for 16-bit inputs on
# Hopper; each is tried with two kinds of loads (see _load_modes): row-wise pointers and TMA
# descriptors where TMA is offered, row-wise and column-wise pointers elsewhere. The head_dim 128 list
# holds the winners of benchmarks/kernel_configs.py on H100 at 32K and 128K (pointer loads).
_HALF_CONFIGS = {
    16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
    128: [(128, 64, 4, 2), (128, 128, 8, 3), (128, 128, 8, 2), (64, 32, 4, 2)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
}
# float32 runs exact (IEEE) products; tiles are small to fit shared memory.
_FLOAT_CONFIGS = {dim: [(64, 32, 4, 2), (32, 32, 4, 2)] for dim in (16, 32, 64, 128)}
_FLOAT_CONFIGS[256] = [(32, 32, 4, 1), (32, 16, 4, 1)]
# K read row-wise (False) and column-wise (True) through pointers: both are autotuned for
# 16-bit inputs where TMA is not offered.
_HALF_K_LAYOUTS = (False, True)
# Pointer loads (False) and TMA descriptor loads (True): both are autotuned for 16-bit inputs
# where _tma_offered says yes (see _load_modes). A TMA config reads K as (N, D) rows only.
_HALF_TMA = (False, True)
# Which kernel the "triton" backend runs on CUDA: "auto" takes the warp-specialized Gluon kernel
# (gluon_hopper.py) where it applies (Hopper, 16-bit, head_dim 64/128, see
# gluon_unsupported_reason; at head_dim 64 only for denser patterns, see below) and this
# module's kernel elsewhere; "triton" always this module's
# kernel; "gluon" the Gluon kernel or a ValueError saying why not. Benchmarks flip it.
kernel_choice = os.environ.get("SPARSE_ATTN_KERNEL", "auto")
# "auto" at head_dim 64 takes the Gluon kernel only from a mean of 17+ kept blocks per query
# block (work bucket 5): on H100 at 32K it was slower at density 0.05 (0.83 vs 0.68 ms), even
# at 0.1 (1.27 / 1.26) and faster from 0.2 (2.19 / 2.43) to dense (9.55 / 10.68 ms)
# (benchmarks/results/h100/kernels_gluon.json). Its fixed cost per program (descriptors,
# barriers, one program per SM) weighs more when each program does little.
_GLUON_MIN_WORK_BUCKET_SMALL_DIM = 5
# Under TRITON_INTERPRET there is no autotuning; tests flip these to cover both K layouts and
# the TMA path (which the interpreter runs for any dtype, when _descriptor_compatible allows).
interpreter_k_transposed = False
interpreter_use_tma = False


def _fitting(candidates, block_q: int, block_k: int):
    fitting = [c for c in candidates if block_q % c[0] == 0 and block_k % c[1] == 0]
    return fitting or [(min(block_q, 64), min(block_k, 32), 4, 2)]


def _descriptor_compatible(x: torch.Tensor) -> bool:
    """Whether the kernel may read this (B, H, S, D) tensor through tensor descriptors.

    The kernel builds one descriptor per (batch, head) at ``x[b, h]`` with strides
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


def _tma_offered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, capability: tuple[int, int] | None) -> bool:
    """Whether TMA configs join the autotuned set: 16-bit inputs, compute capability >= 9
    (Hopper or newer; ``capability`` is ``None`` off CUDA) and descriptor-compatible tensors."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if capability is None or capability[0] < 9:
        return False
    return all(_descriptor_compatible(x) for x in (q, k, v))


def _load_modes(is_float32: bool, tma: bool) -> list[tuple[bool, bool]]:
    """The (K_TRANSPOSED, USE_TMA) pairs to autotune over.

    float32 reads K row-wise through pointers only. 16-bit inputs where TMA is not offered
    (``tma`` False, see :func:`_tma_offered`) take every pointer layout of ``_HALF_K_LAYOUTS``.
    Where it is offered (compute capability >= 9), they take row-wise pointers (if False is in
    ``_HALF_TMA``) and TMA (if True is): on sm_90 the two pointer layouts compile to the same
    machine code, so the column-wise one would only double the tuning time, and the K layout
    means nothing to a descriptor load. On H100 neither kind of load wins everywhere
    (``benchmarks/results/h100/kernels_pointer.log`` and ``kernels_tma.log``: each is up to 6 %
    faster on some lengths and densities), hence both in the autotuned set.
    """
    if is_float32:
        return [(False, False)]
    if not tma or True not in _HALF_TMA:
        return [(transposed, False) for transposed in _HALF_K_LAYOUTS]
    return [(False, False)] * (False in _HALF_TMA) + [(False, True)]


def _kernel_configs(head_dim: int, block_q: int, block_k: int, is_float32: bool, tma: bool) -> list:
    """The autotuner's candidate ``triton.Config`` list (tiles x load modes)."""
    candidates = (_FLOAT_CONFIGS if is_float32 else _HALF_CONFIGS)[head_dim]
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "K_TRANSPOSED": transposed, "USE_TMA": use_tma}, num_warps=w, num_stages=s
        )
        for m, n, w, s in _fitting(candidates, block_q, block_k)
        for transposed, use_tma in _load_modes(is_float32, tma)
    ]


@functools.lru_cache(maxsize=None)
def _autotuned_kernel(head_dim: int, block_q: int, block_k: int, is_float32: bool, tma: bool):
    return triton.autotune(
        configs=_kernel_configs(head_dim, block_q, block_k, is_float32, tma),
        key=["seq_bucket", "work_bucket", "HEAD_DIM", "BLOCK_Q", "BLOCK_K", "CAUSAL", "PRECISION"],
    )(_block_sparse_forward)


def _scratch_buffer(size: int, alignment: int, stream):
    """Global scratch for device-side tensor descriptors (128 bytes each, per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Install :func:`_scratch_buffer` as Triton's allocator unless one is already set.

    Kernels that build tensor descriptors on the device ask ``triton.set_allocator``'s
    allocator for global scratch at launch and fail without one. Triton 3.6 has no public
    getter, so the current allocator is read from ``triton.runtime._allocation``; an allocator
    the caller set is kept. Should that private module change, ours is installed regardless
    (a launch without any allocator would fail). The allocator is a context variable: a thread
    that has none gets ours on its first TMA-capable call.
    """
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(_scratch_buffer)


def _work_bucket(pattern: BlockSparsePattern) -> int:
    """ceil(log2) of the mean number of kept blocks per query block (one host sync per pattern)."""
    cached = pattern.cached_plan("work_bucket")
    if cached is None:
        mean_blocks = float(pattern.kv_counts.float().mean())
        cached = pattern.store_plan("work_bucket", max(math.ceil(mean_blocks) - 1, 1).bit_length())
    return cached


def _full_counts(pattern: BlockSparsePattern, *, causal: bool) -> torch.Tensor:
    """Per query block, how many leading list entries every query row sees in full.

    A block is full when it lies inside the key sequence and, in causal mode, ends at or
    before the first query of the block. Lists are sorted, so full blocks come first.
    """
    cached = pattern.cached_plan(("full_counts", causal))
    if cached is not None:
        return cached
    n_full_blocks = pattern.seq_k // pattern.block_k
    threshold = torch.full((pattern.num_q_blocks,), n_full_blocks, dtype=torch.int64, device=pattern.device)
    if causal:
        first_query = torch.arange(pattern.num_q_blocks, device=pattern.device) * pattern.block_q + (
            pattern.seq_k - pattern.seq_q
        )
        threshold = torch.minimum(threshold, (first_query + 1) // pattern.block_k)
    slots = torch.arange(pattern.max_kv, device=pattern.device)
    used = slots < pattern.kv_counts[..., None]
    full = (pattern.kv_indices < threshold[:, None]) & used
    counts = full.sum(-1, dtype=torch.int32).contiguous()
    return pattern.store_plan(("full_counts", causal), counts)


def gluon_skip_reason(q, k, v, pattern: BlockSparsePattern, capability: tuple[int, int] | None) -> str | None:
    """``None`` when the "triton" backend should run the Gluon kernel, else why it runs this one.

    Follows ``kernel_choice``: under "gluon" a case the Gluon kernel cannot run is a ValueError.
    """
    if kernel_choice not in ("auto", "triton", "gluon"):
        raise ValueError(f"kernel_choice (SPARSE_ATTN_KERNEL) must be 'auto', 'triton' or 'gluon', got {kernel_choice!r}")
    if kernel_choice == "triton":
        return "kernel_choice is 'triton'"
    from .gluon_hopper import gluon_unsupported_reason

    reason = gluon_unsupported_reason(q, k, v, pattern, capability)
    if reason is not None and kernel_choice == "gluon":
        raise ValueError(f"kernel_choice is 'gluon' but {reason}")
    if reason is None and kernel_choice == "auto" and q.shape[-1] < 128:
        if _work_bucket(pattern) < _GLUON_MIN_WORK_BUCKET_SMALL_DIM:
            return "at head_dim 64 sparse patterns run faster on the Triton kernel"
    return reason


def launch_arguments(q, k, v, pattern: BlockSparsePattern, *, causal: bool, scale: float, return_lse: bool):
    """``(out, lse, args)``: the outputs (from ``_empty``, so tests can poison them) and the
    leading runtime arguments both kernels take, ``Q`` through ``qk_scale`` (``lse`` is ``out``
    when not asked for; the kernel then never touches it)."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    out = _empty((batch, q_heads, seq_q, dim), dtype=q.dtype, device=q.device)
    lse = _empty((batch, q_heads, seq_q), dtype=torch.float32, device=q.device) if return_lse else out
    # counts and full_counts share one offset computation in the kernels: both contiguous.
    counts = pattern.kv_counts.contiguous()
    indices = pattern.kv_indices.contiguous()
    full_counts = _full_counts(pattern, causal=causal)
    pattern_batch_stride = 0 if pattern.batch == 1 else counts.stride(0)
    index_batch_stride = 0 if pattern.batch == 1 else indices.stride(0)
    args = (
        q, k, v, out, lse, counts, full_counts, indices,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        pattern_batch_stride, counts.stride(1),
        index_batch_stride, indices.stride(1), indices.stride(2),
        q_heads, q_heads // kv_heads, q_heads // pattern.num_heads,
        seq_q, seq_k, scale * 1.4426950408889634,
    )  # fmt: skip
    return out, lse, args


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool = False,
):
    """Block-sparse attention with the Triton kernel. Shapes as in :func:`sparse_attn.block_sparse_attention`."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
    if capability is not None and not interpreting():
        if gluon_skip_reason(q, k, v, pattern, capability) is None:
            from .gluon_hopper import gluon_attention

            return gluon_attention(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
    batch, q_heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    out, lse, args = launch_arguments(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
    args += (max(seq_k - 1, 1).bit_length(), _work_bucket(pattern))  # the autotuning keys
    is_float32 = q.dtype == torch.float32
    dot_in_float32 = is_float32 or (interpreting() and q.dtype == torch.bfloat16)
    precision = "ieee" if dot_in_float32 else "tf32"
    constants = dict(
        HEAD_DIM=dim,
        BLOCK_Q=pattern.block_q,
        BLOCK_K=pattern.block_k,
        CAUSAL=bool(causal),
        WRITE_LSE=bool(return_lse),
        DOT_FP32=dot_in_float32,
        PRECISION=precision,
        EVEN_K=seq_k % pattern.block_k == 0,
        EVEN_Q=seq_q % pattern.block_q == 0,
    )
    n_q_blocks = num_blocks(seq_q, pattern.block_q)
    if interpreting():
        block_m, block_n = min(pattern.block_q, 32), min(pattern.block_k, 16)
        grid = (batch * q_heads, n_q_blocks * (pattern.block_q // block_m))
        use_tma = interpreter_use_tma and all(_descriptor_compatible(x) for x in (q, k, v))
        _block_sparse_forward[grid](
            *args,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            K_TRANSPOSED=interpreter_k_transposed and not use_tma,
            USE_TMA=use_tma,
            **constants,
        )
    else:
        tma = _tma_offered(q, k, v, capability) and True in _HALF_TMA
        if tma:
            _ensure_scratch_allocator()
        kernel = _autotuned_kernel(dim, pattern.block_q, pattern.block_k, is_float32, tma)

        def grid(meta):
            return (batch * q_heads, n_q_blocks * (pattern.block_q // meta["BLOCK_M"]))

        kernel[grid](*args, **constants)
    if return_lse:
        return out, lse
    return out
