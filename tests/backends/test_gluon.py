"""The warp-specialized Gluon Hopper kernel (backends/gluon.py) and how backends choose it.

Gluon has no interpreter, so on CPU the kernel is compiled ahead of time for sm_90 (Triton's
own ptxas included) over its constexpr variants: it must compile, use wgmma and register
reallocation between partitions, and spill nothing. On the GPU (``-m gpu``) it is compared with
the reference backend on NaN-padded inputs and poisoned outputs.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, compile_in_child, poisoned_view, relative_error, text_rows_pattern

import sparse_attn as sa
from sparse_attn.backends import configs, launch, resolve_backend
from sparse_attn.backends import gluon as gluon_backend
from sparse_attn.backends import triton as triton_backend
from sparse_attn.plan import plan_for

needs_gluon = pytest.mark.skipif(gluon_backend.gluon is None, reason="this Triton has no Gluon")


def _compile_for_sm90(**variant):
    """Compile the kernel for sm_90a in a child process; returns ``{"ptx", "report" (ptxas -v),
    "shared" (bytes), "stages"}``."""
    return compile_in_child(Path(__file__).with_name("gluon_sm90_compile.py"), variant)


VARIANTS = [
    dict(),
    dict(dtype="fp16", HEAD_DIM=64, CAUSAL=False, WRITE_LSE=True),
    dict(BLOCK_K=64, EVEN_K=False, EVEN_Q=False),
    dict(BLOCK_Q=256, BLOCK_K=256, WRITE_LSE=True, EVEN_K=False),
    dict(dtype="fp16", HEAD_DIM=64, BLOCK_K=64, CAUSAL=False, EVEN_K=False, EVEN_Q=False),
    dict(HOST_DESC=True),
    dict(dtype="fp16", HEAD_DIM=64, BLOCK_K=64, HOST_DESC=True, WRITE_LSE=True, EVEN_Q=False),
    dict(PERSISTENT=True),
    dict(PERSISTENT=True, dtype="fp16", HEAD_DIM=64, BLOCK_Q=256, WRITE_LSE=True, CAUSAL=False, EVEN_Q=False),
    # A token rule as a box predicate (neighbourhood windows), one-item and persistent.
    dict(BOX=True, CAUSAL=False, EVEN_K=False, EVEN_Q=False, WRITE_LSE=True),
    dict(BOX=True, CAUSAL=False, PERSISTENT=True, dtype="fp16", HEAD_DIM=64, BLOCK_K=64),
    # ... with the warpgroups skipping the steps their rows may not see (BOX=2).
    dict(BOX=2, CAUSAL=False),
    dict(BOX=2, CAUSAL=False, EVEN_K=False, EVEN_Q=False, PERSISTENT=True, dtype="fp16", HEAD_DIM=64, BLOCK_K=64),
    dict(BOX=2, CAUSAL=True, BLOCK_K=256, WRITE_LSE=True),
    dict(BOX=2, CAUSAL=False, BLOCK_N=64, EVEN_K=False),
    # Tall tiles: 192 query rows over three consumer warpgroups, 64-key steps (dense head_dim 64).
    dict(HEAD_DIM=64, CONSUMERS=3, BLOCK_N=64),
    dict(HEAD_DIM=64, CONSUMERS=3, BLOCK_N=64, HOST_DESC=True, EVEN_Q=False, EVEN_K=False, WRITE_LSE=True),
    dict(HEAD_DIM=64, CONSUMERS=3, BLOCK_N=64, CAUSAL=False, dtype="fp16"),
    dict(HEAD_DIM=64, CONSUMERS=3, BLOCK_N=128),
]


@needs_gluon
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_gluon_kernel_compiles_for_sm90_without_spills(variant):
    compiled = _compile_for_sm90(**variant)
    ptx, report = compiled["ptx"], compiled["report"]
    # The K/V ring is as deep as shared memory allows: 3 stages at head_dim 128 with 128-key tiles.
    assert compiled["shared"] <= configs.GLUON_SHARED_BYTES
    head_dim, block_k = variant.get("HEAD_DIM", 128), variant.get("BLOCK_K", 128)
    block_n = variant.get("BLOCK_N", configs.gluon_block_n(block_k))
    assert compiled["stages"] == (3 if (head_dim, block_n) == (128, 128) else 4)
    assert "wgmma.mma_async" in ptx
    # Warp specialization: the partitions hand registers to each other (setmaxnreg).
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and all(stores == "0" and loads == "0" for stores, loads in spills), report
    # Launchable: the launch's registers for every thread fit one multiprocessor's 65,536.
    threads = int(re.search(r"\.reqntid (\d+)", ptx).group(1))
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    assert threads * registers <= 65536, (threads, registers)


def _tensors(dtype=torch.bfloat16, dim=128, transposed=False):
    shape = (1, 100, 4, dim) if transposed else (1, 4, 100, dim)
    x = torch.zeros(shape, dtype=dtype)
    x = x.transpose(1, 2) if transposed else x
    return x, x, x


def test_gluon_unsupported_reasons():
    reason = gluon_backend.cannot_run_reason
    pattern = sa.dense_pattern(seq_q=100)
    if gluon_backend.gluon is None:
        assert "Gluon" in reason(*_tensors(), pattern, (9, 0))
        return
    assert reason(*_tensors(), pattern, (9, 0)) is None
    assert reason(*_tensors(torch.float16, 64, transposed=True), pattern, (9, 0)) is None
    assert "CUDA device" in reason(*_tensors(), pattern, None)
    assert "9.x" in reason(*_tensors(), pattern, (10, 0))
    assert "9.x" in reason(*_tensors(), pattern, (8, 0))
    assert "float16 or bfloat16" in reason(*_tensors(torch.float32), pattern, (9, 0))
    assert "head_dim" in reason(*_tensors(dim=256), pattern, (9, 0))
    assert "block_q" in reason(*_tensors(), sa.dense_pattern(seq_q=100, block_q=64), (9, 0))
    assert "block_k" in reason(*_tensors(), sa.dense_pattern(seq_q=100, block_k=32), (9, 0))
    q, k, _ = _tensors()
    unaligned = torch.zeros(1, 4, 100, 132, dtype=torch.bfloat16)[..., :128]  # rows 264 bytes apart
    assert "aligned" in reason(q, k, unaligned, pattern, (9, 0))


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k): GQA 1-4, odd lengths,
# Sq < Sk (chunked prefill), pattern blocks of 256 (two programs per query block, two key
# steps per block) and block_k 64.
GPU_SHAPES = [
    (2, 4, 1, 1000, 1000, 128, 128, 128),
    (1, 8, 2, 777, 1500, 64, 128, 64),
    (2, 6, 3, 2048, 2048, 128, 256, 128),
    (1, 4, 4, 1500, 4096, 64, 128, 256),
    (1, 32, 8, 4096, 4096, 128, 128, 128),
    (2, 2, 1, 300, 300, 128, 256, 256),
]


@pytest.mark.gpu
@needs_gluon
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_gluon_matches_reference(shape, dtype, causal, poison_outputs):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    seed = random.SystemRandom().randrange(2**31)
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    generator = torch.Generator().manual_seed(seed)
    transposed = GPU_SHAPES.index(shape) % 2 == 1
    q, k, v = (
        poisoned_view(batch, heads, seq, dim, dtype, generator, transposed, device="cuda")
        for heads, seq in ((q_heads, seq_q), (kv_heads, seq_k), (kv_heads, seq_k))
    )
    for density, pattern_heads in ((0.0, kv_heads), (0.4, q_heads), (1.0, 1)):
        pattern = sa.random_pattern(
            batch=batch,
            heads=pattern_heads,
            seq_q=seq_q,
            seq_k=seq_k,
            density=density,
            seed=seed,
            block_q=block_q,
            block_k=block_k,
            causal=causal,
            device="cuda",
        )
        context = f"seed {seed}, density {density}"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to another backend would warn
            out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="gluon", return_lse=True)
            plain = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="gluon")
        ref, ref_lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=True)
        assert torch.isfinite(out).all(), f"unwritten output or a row read past the sequence ({context})"
        assert relative_error(out, ref) <= TOLERANCE[dtype], context
        assert torch.allclose(lse, ref_lse, atol=2e-2), context
        assert torch.equal(plain, out), f"the LSE variant computes different outputs ({context})"


@pytest.mark.gpu
@needs_gluon
def test_gpu_gluon_falls_back_to_triton_where_it_cannot_run():
    q, k, v = (torch.randn(1, 2, 256, 256, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pattern = sa.dense_pattern(seq_q=256, device="cuda")
    with pytest.warns(UserWarning, match="head_dim 64 or 128, not 256: using the triton backend"):
        out = sa.block_sparse_attention(q, k, v, pattern, backend="gluon")
    ref = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    assert relative_error(out, ref) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@needs_gluon
def test_gpu_auto_picks_gluon_on_hopper_and_gluon_takes_what_auto_leaves():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    q, k, v = (torch.randn(1, 4, 2048, dim, device="cuda", dtype=torch.bfloat16) for dim in (128, 128, 128))
    dense = sa.dense_pattern(seq_q=2048, device="cuda")
    assert resolve_backend("auto", q, k, v, dense, causal=True, return_lse=False) == "gluon"
    q64, k64, v64 = (x[..., :64].contiguous() for x in (q, k, v))
    assert resolve_backend("auto", q64, k64, v64, dense, causal=True, return_lse=False) == "gluon"
    # head_dim 64 with a mean under 5 kept blocks per query block (MIN_WORK_BUCKET_SMALL_DIM):
    # auto takes the Triton kernel, backend="gluon" still the Gluon one.
    light = sa.dense_pattern(seq_q=768, device="cuda")
    q64, k64, v64 = (x[:, :, :768] for x in (q64, k64, v64))
    assert resolve_backend("auto", q64, k64, v64, light, causal=True, return_lse=False) == "triton"
    assert resolve_backend("gluon", q64, k64, v64, light, causal=True, return_lse=False) == "gluon"
    assert resolve_backend("triton", q, k, v, dense, causal=True, return_lse=False) == "triton"


def test_gluon_falls_back_with_one_warning_naming_why():
    # This machine has no Hopper GPU (or interprets Triton): the Gluon kernel cannot run.
    q, k, v = (torch.randn(1, 2, 64, 64) for _ in range(3))
    pattern = sa.dense_pattern(seq_q=64, block_q=16, block_k=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sa.block_sparse_attention(q, k, v, pattern, backend="gluon")
    ours = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "Gluon" in message and "using the" in message
    expected = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    assert relative_error(out, expected) <= 1e-4


def test_auto_leaves_light_head_dim_64_patterns_to_the_triton_kernel():
    slower = gluon_backend.slower_than_triton_reason
    q, _, _ = _tensors()
    q64, _, _ = _tensors(dim=64)
    # head_dim 64: the Gluon kernel only from a mean of 5+ kept blocks per query block (bucket 3).
    light = sa.dense_pattern(seq_q=1024)  # 4.5 blocks per query block on average: bucket 3
    lighter = sa.dense_pattern(seq_q=768)  # 3.5: bucket 2
    assert plan_for(light, causal=True).work_bucket == gluon_backend.MIN_WORK_BUCKET_SMALL_DIM
    assert "Triton kernel" in slower(q64, plan_for(lighter, causal=True))
    assert slower(q64, plan_for(light, causal=True)) is None
    assert slower(q, plan_for(lighter, causal=True)) is None


@pytest.mark.parametrize("blocks_per_row, triton", [(1, True), (2, True), (3, False)])
def test_auto_leaves_one_or_two_blocks_per_row_to_the_triton_kernel(blocks_per_row, triton):
    q, _, _ = _tensors()
    pattern = sa.random_pattern(seq_q=128 * 16, density=blocks_per_row / 16, causal=False, seed=0)
    assert int(pattern.kv_counts.min()) == int(pattern.kv_counts.max()) == blocks_per_row
    reason = gluon_backend.slower_than_triton_reason(q, plan_for(pattern, causal=False))
    assert ("Triton kernel" in (reason or "")) == triton


def test_gluon_backend_refuses_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _tensors()
    assert "interpreter" in gluon_backend.unsupported_reason(q, k, v, sa.dense_pattern(seq_q=100), return_lse=False)


@needs_gluon
def test_both_kernels_take_the_same_leading_arguments():
    # launch.launch_arguments builds Q ... qk_scale once for both kernels.
    import inspect

    def names(kernel):
        return list(inspect.signature(kernel.fn).parameters)

    triton_names = names(triton_backend._block_sparse_forward)
    gluon_names = names(gluon_backend._gluon_block_sparse_forward)
    shared = triton_names[: triton_names.index("qk_scale") + 1]
    assert gluon_names[: len(shared)] == shared
    # Then the launch-made descriptors (None where the kernel makes its own), the box predicate's
    # table and guard (unused without a token rule), the launch order's four numbers (tiles per
    # head, heads per wave, the heavy blocks' lead in tiles, all heads), then constexprs.
    after = gluon_names[len(shared) :]
    order = ["num_tiles", "heads_per_wave", "lead_tiles", "all_heads"]
    assert after[:9] == ["QDesc", "KDesc", "VDesc", "BoxTable", "box_guard", *order]
    assert all(name.isupper() for name in after[9:])
    q, k, v = _tensors()
    plan = plan_for(sa.dense_pattern(seq_q=100), causal=True)
    out, lse, args = launch.launch_arguments(q, k, v, plan, scale=0.1, return_lse=False)
    assert len(args) == len(shared) and args[3] is out and lse is out


def test_host_descriptors_only_for_contiguous_inputs_with_whole_key_blocks():
    q, k, v = (torch.zeros(2, 4, 512, 128, dtype=torch.bfloat16) for _ in range(3))
    pattern = sa.dense_pattern(seq_q=512)
    assert gluon_backend.uses_host_descriptors(q, k, v, pattern)
    with sa.backends.kernel_configs(gluon_host_descriptors=False):
        assert not gluon_backend.uses_host_descriptors(q, k, v, pattern)
    assert not gluon_backend.uses_host_descriptors(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, pattern)
    short = (x[:, :, :500] for x in (q, k, v))
    assert not gluon_backend.uses_host_descriptors(*(x.contiguous() for x in short), sa.dense_pattern(seq_q=500))
    with pytest.raises(TypeError, match="gluon_host_descriptors must be a bool"):
        with sa.backends.kernel_configs(gluon_host_descriptors=1):
            pass


def _gpu_case(shape, causal, *, seed, pattern_heads):
    """bf16 q, k, v on the GPU for ``shape`` and a random pattern of density 0.3 with ``pattern_heads`` lists."""
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        for heads, seq in ((q_heads, seq_q), (kv_heads, seq_k), (kv_heads, seq_k))
    )
    pattern = sa.random_pattern(
        batch=batch, heads=pattern_heads, seq_q=seq_q, seq_k=seq_k, density=0.3, seed=seed,
        block_q=block_q, block_k=block_k, causal=causal, device="cuda",
    )  # fmt: skip
    return q, k, v, pattern


@pytest.mark.gpu
@needs_gluon
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 2, 1000, 1024, 128, 128, 128), (3, 6, 3, 777, 2048, 64, 128, 64), (1, 32, 8, 4096, 4096, 128, 128, 128)],
    ids=str,
)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_host_and_device_descriptors_compute_the_same(shape, causal, poison_outputs):
    """Launch-made descriptors over the flattened tensors read the same tiles as per-program ones,
    and the persistent kernel computes each work item as the one-item kernel does: identical
    outputs, including a last query tile that reads into the next head's rows."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    q, k, v, pattern = _gpu_case(shape, causal, seed=3, pattern_heads=shape[2])
    assert gluon_backend.uses_host_descriptors(q, k, v, pattern)
    host, host_lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="gluon", return_lse=True)
    with sa.backends.kernel_configs(gluon_host_descriptors=False):
        device, device_lse = sa.block_sparse_attention(
            q, k, v, pattern, causal=causal, backend="gluon", return_lse=True
        )
    assert torch.equal(host, device) and torch.equal(host_lse, device_lse)
    with sa.backends.kernel_configs(gluon_persistent=True):
        persistent, persistent_lse = sa.block_sparse_attention(
            q, k, v, pattern, causal=causal, backend="gluon", return_lse=True
        )
    assert torch.equal(host, persistent) and torch.equal(host_lse, persistent_lse)
    ref = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference")
    assert relative_error(host, ref) <= TOLERANCE[torch.bfloat16]


def test_tall_tiles_run_dense_head_dim_64_patterns_unless_told_not_to():
    """192-row query tiles (three consumer warpgroups) take head_dim-64 patterns that keep every
    block and have no token rule, by default and when asked; never when told not to."""
    dense = sa.dense_pattern(seq_q=1000)
    plan = plan_for(dense, causal=True)
    sparse = sa.random_pattern(heads=2, seq_q=4096, density=0.3, seed=1)
    q64, q128 = torch.zeros(1, 2, 1000, 64), torch.zeros(1, 2, 1000, 128)
    assert gluon_backend.TALL_TILES_BY_DEFAULT and gluon_backend._tall_tiles(q64, dense, plan, False)
    with sa.backends.kernel_configs(gluon_tall_tiles=False):
        assert not gluon_backend._tall_tiles(q64, dense, plan, False)
    for asked in (None, True):
        with sa.backends.kernel_configs(gluon_tall_tiles=asked):
            assert gluon_backend._tall_tiles(q64, dense, plan, False)
            assert not gluon_backend._tall_tiles(q128, dense, plan, False)
            assert not gluon_backend._tall_tiles(q64, dense, plan, True)
            assert not gluon_backend._tall_tiles(q64, sparse, plan_for(sparse, causal=True), False)
            narrow = sa.dense_pattern(seq_q=1000, block_k=64)  # 128-key steps would span two blocks
            assert not gluon_backend._tall_tiles(q64, narrow, plan_for(narrow, causal=True), False)
    with pytest.raises(TypeError, match="gluon_tall_tiles"):
        with sa.backends.kernel_configs(gluon_tall_tiles=1):
            pass


@pytest.mark.gpu
@needs_gluon
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 2, 1000, 1000), (1, 6, 3, 4160, 4160), (2, 4, 4, 777, 2048), (1, 32, 8, 4096, 4096)],
    ids=str,
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_n", [64, 128])
def test_gpu_tall_tiles_compute_the_one_item_kernels_rows(shape, causal, block_n, poison_outputs, monkeypatch):
    """Dense head_dim-64 patterns in 192-row tiles (64- or 128-key steps) against the reference,
    and their LSE against the 128-row tiles' (the same sums in another order), ragged lengths,
    GQA, Sq < Sk, launch-made and per-program descriptors."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    monkeypatch.setattr(gluon_backend, "TALL_TILES_BLOCK_N", block_n)
    batch, q_heads, kv_heads, seq_q, seq_k = shape
    generator = torch.Generator(device="cuda").manual_seed(17)
    q = torch.randn(batch, q_heads, seq_q, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = (torch.randn(batch, kv_heads, seq_k, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
            for _ in range(2))  # fmt: skip
    pattern = sa.dense_pattern(seq_q=seq_q, seq_k=seq_k, causal=causal, device="cuda")
    with sa.backends.kernel_configs(gluon_tall_tiles=False):
        base, base_lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="gluon", return_lse=True)
    ref = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference")
    results = []
    for host in (None, False):
        with sa.backends.kernel_configs(gluon_tall_tiles=True, gluon_host_descriptors=host):
            tall, tall_lse = sa.block_sparse_attention(
                q, k, v, pattern, causal=causal, backend="gluon", return_lse=True
            )
        assert not tall.isnan().any() and relative_error(tall, ref) <= TOLERANCE[torch.bfloat16], host
        torch.testing.assert_close(tall_lse, base_lse, rtol=1e-5, atol=1e-5)
        results.append((tall, tall_lse))
    # Launch-made and per-program descriptors read the same tiles.
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_persistent_kernel_takes_light_work_items_unless_told():
    light = plan_for(sa.random_pattern(heads=2, seq_q=4096, density=0.1, seed=1), causal=True)
    heavy = plan_for(sa.dense_pattern(seq_q=16384), causal=True)
    assert light.work_bucket <= gluon_backend.PERSISTENT_MAX_WORK_BUCKET < heavy.work_bucket
    for waves in (False, True):
        assert gluon_backend._persistent(light, waves) and not gluon_backend._persistent(heavy, waves)
        with sa.backends.kernel_configs(gluon_persistent=False):
            assert not gluon_backend._persistent(light, waves)
        with sa.backends.kernel_configs(gluon_persistent=True):
            assert gluon_backend._persistent(heavy, waves)


def test_persistent_kernel_leaves_uneven_rows_in_waves_to_one_program_per_item():
    # 32 query blocks of 2-3 kept blocks, and one that keeps all 33 (a text row beside a video).
    counts = torch.full((1, 1, 33), 2, dtype=torch.int32)
    counts[..., ::2] = 3
    counts[..., -1] = 33
    indices = torch.arange(33, dtype=torch.int32).expand(1, 1, 33, 33).contiguous()
    pattern = sa.BlockSparsePattern(counts, indices, block_q=128, block_k=128, seq_q=33 * 128, seq_k=33 * 128)
    uneven = plan_for(pattern, causal=False)
    even = plan_for(sa.random_pattern(heads=2, seq_q=4096, density=0.1, seed=1, causal=False), causal=False)
    assert uneven.row_imbalance > gluon_backend.PERSISTENT_MAX_ROW_IMBALANCE >= even.row_imbalance
    assert uneven.work_bucket <= gluon_backend.PERSISTENT_MAX_WORK_BUCKET
    assert gluon_backend._persistent(uneven, waves=False) and not gluon_backend._persistent(uneven, waves=True)
    assert gluon_backend._persistent(even, waves=True)
    with sa.backends.kernel_configs(gluon_persistent=True):
        assert gluon_backend._persistent(uneven, waves=True)


@pytest.mark.gpu
@needs_gluon
@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1024, 128, 128, 128), (3, 6, 3, 777, 2048, 64, 128, 64)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_launch_waves_change_no_result(shape, causal, poison_outputs):
    """Waves of (batch, KV head) streams only reorder work items: every wave size gives the
    one-wave output and LSE bit for bit, on the one-item and the persistent kernel, with
    launch-made and per-program descriptors."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    q, k, v, pattern = _gpu_case(shape, causal, seed=5, pattern_heads=shape[1])
    ref = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference")
    for persistent in (False, True):
        for host in (None, False):
            results = []
            for streams in (0, 1, 2, 3):
                with sa.backends.kernel_configs(
                    kv_streams_per_wave=streams, gluon_persistent=persistent, gluon_host_descriptors=host
                ):
                    results.append(
                        sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="gluon", return_lse=True)
                    )
            assert relative_error(results[0][0], ref) <= TOLERANCE[torch.bfloat16]
            for out, lse in results[1:]:
                assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1]), (persistent, host)


@pytest.mark.gpu
@needs_gluon
@pytest.mark.parametrize("backend", ["gluon", "triton"])
def test_gpu_heavy_rows_lead_changes_no_result(backend, poison_outputs):
    """Heavy query blocks (two trailing rows that keep every KV block, as text tokens beside a
    video) issued for every head before the waves, or within them: the same output and LSE bit
    for bit, in one wave and in waves, and the reference's output."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    batch, q_heads, kv_heads, seq, dim, block = 2, 8, 2, 40 * 128, 128, 128
    generator = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (
        torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        for heads in (q_heads, kv_heads, kv_heads)
    )
    pattern = text_rows_pattern(q_heads, seq, block, device="cuda")
    assert plan_for(pattern, causal=False).heavy_blocks == 2
    ref = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference")
    results = {}
    for streams in (0, 1):
        for lead in (True, False):
            with sa.backends.kernel_configs(kv_streams_per_wave=streams, heavy_rows_first=lead, gluon_persistent=False):
                results[streams, lead] = sa.block_sparse_attention(
                    q, k, v, pattern, causal=False, backend=backend, return_lse=True
                )
    first = results[0, True]
    assert relative_error(first[0], ref) <= TOLERANCE[torch.bfloat16]
    for key, (out, lse) in results.items():
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1]), key


def test_box_rules_skip_unseen_steps_unless_told_and_take_the_asked_step_width():
    assert gluon_backend._box_mode(False, 4096, 4096) == 0
    assert gluon_backend._box_mode(True, 4096, 4096) == 2
    assert gluon_backend._box_mode(True, 4032, 4096) == 2  # queries start 64 keys in
    assert gluon_backend._box_mode(True, 4000, 4096) == 1  # 96: rows straddle the summaries' groups
    with configs.kernel_configs(rule_skip_steps=False):
        assert gluon_backend._box_mode(True, 4096, 4096) == 1
    assert configs.gluon_block_n(128, rule=True) == 128 and configs.gluon_block_n(192, rule=True) == 64
    with configs.kernel_configs(gluon_rule_block_n=64):
        assert configs.gluon_block_n(128, rule=True) == 64
        assert configs.gluon_block_n(128) == 128  # patterns without a rule keep their steps
    with configs.kernel_configs(gluon_rule_block_n=128):
        assert configs.gluon_block_n(192, rule=True) == 64  # 128 does not divide the block
    for bad in (32, True, "64"):
        with pytest.raises(ValueError, match="gluon_rule_block_n"):
            with configs.kernel_configs(gluon_rule_block_n=bad):
                pass
    with pytest.raises(TypeError, match="rule_skip_steps"):
        with configs.kernel_configs(rule_skip_steps="yes"):
            pass
