"""The Triton kernel's TMA (tensor descriptor) load path against the reference backend.

On CPU the interpreter runs the path (``kernel_configs(triton_loads=["tma"])``), for any dtype. Inputs are
views into NaN-filled buffers, so a load that reads a row past its head's sequence instead
of zeros turns the output into NaN; outputs are poisoned too, so unwritten rows show.
"""

from __future__ import annotations

import contextvars
import random

import pytest
import torch
import triton
from helpers import TOLERANCE, poisoned_view, relative_error

import sparse_attn as sa
from sparse_attn.backends import configs, kernel_configs, launch
from sparse_attn.backends import triton as triton_backend

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k): GQA 1, 2 and 4, odd
# lengths with Sq < Sk, pattern blocks larger than the interpreter's tiles (several
# sub-tiles per block), head_dim 64, 128 and 256, and one case of whole blocks on both sides.
SHAPES = [
    (2, 3, 3, 45, 45, 64, 32, 32),
    (2, 4, 2, 37, 83, 128, 16, 32),
    (1, 8, 2, 50, 70, 64, 64, 16),
    (1, 2, 1, 20, 41, 256, 16, 16),
    (2, 2, 1, 64, 96, 64, 32, 32),
]


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


class _LaunchSpy:
    """Stands in for ``_block_sparse_forward`` and records each launch's USE_TMA."""

    def __init__(self, kernel):
        self.kernel, self.use_tma = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.use_tma.append(kwargs["USE_TMA"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def tma_spy(monkeypatch, poison_outputs):
    spy = _LaunchSpy(triton_backend._block_sparse_forward)
    monkeypatch.setattr(triton_backend, "_block_sparse_forward", spy)
    with kernel_configs(triton_loads=["tma"]):
        yield spy


def _check(shape, dtype, causal, seed, transposed):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    generator = torch.Generator().manual_seed(seed)
    q = poisoned_view(batch, q_heads, seq_q, dim, dtype, generator, transposed)
    k = poisoned_view(batch, kv_heads, seq_k, dim, dtype, generator, transposed)
    v = poisoned_view(batch, kv_heads, seq_k, dim, dtype, generator, transposed)
    context = f"seed {seed}, {shape}, {dtype}, causal={causal}, transposed={transposed}"
    for density, pattern_heads in ((0.0, kv_heads), (0.4, q_heads), (1.0, kv_heads)):
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
        )
        out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="triton", return_lse=True)
        ref, ref_lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=True)
        assert torch.isfinite(out).all(), f"unwritten output or a row read past the sequence ({context})"
        assert relative_error(out, ref) <= TOLERANCE[dtype], context
        assert torch.allclose(lse, ref_lse, atol=2e-2 if dtype != torch.float32 else 1e-4), context


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_triton_tma_matches_reference(shape, dtype, causal, tma_spy):
    # Half the cases read (B, S, H, D) storage; bf16 products are float32 in the interpreter.
    transposed = (SHAPES.index(shape) + causal) % 2 == 1
    _check(shape, dtype, causal, _fresh_seed(), transposed)
    assert tma_spy.use_tma and all(tma_spy.use_tma)


def test_triton_tma_ignores_the_column_flag(tma_spy):
    # The column-wise K layout means nothing to descriptor loads: the TMA path still runs.
    with kernel_configs(triton_loads=["columns", "tma"]):
        _check((2, 4, 2, 29, 50, 64, 16, 16), torch.bfloat16, True, _fresh_seed(), transposed=True)
    assert tma_spy.use_tma and all(tma_spy.use_tma)


def test_triton_tma_falls_back_to_pointers_on_unaligned_strides(tma_spy):
    # fp16 rows 68 elements apart (136 bytes): no descriptor may describe them.
    seed = _fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 40, 68, generator=generator).half()[..., :64] for _ in range(3))
    pattern = sa.random_pattern(heads=2, seq_q=40, density=0.6, seed=seed, block_q=16, block_k=16)
    out = sa.block_sparse_attention(q, k, v, pattern, backend="triton")
    ref = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    assert relative_error(out, ref) <= TOLERANCE[torch.float16], f"seed {seed}"
    assert tma_spy.use_tma == [False]


def _qkv(dtype=torch.bfloat16, batch=2, seq=100, dim=128, transposed=False):
    shape = (batch, seq, 4, dim) if transposed else (batch, 4, seq, dim)
    x = torch.zeros(shape, dtype=dtype)
    x = x.transpose(1, 2) if transposed else x
    return x, x, x


def test_descriptor_compatibility():
    compatible = launch.descriptor_compatible
    assert compatible(_qkv()[0])
    assert compatible(_qkv(transposed=True)[0])
    assert compatible(_qkv(dim=16, seq=1)[0])
    assert compatible(torch.zeros(2, 4, 101, 128, dtype=torch.bfloat16)[:, :, 1:])  # starts 256 B in
    unaligned_address = torch.zeros(2 * 4 * 100 * 128 + 1, dtype=torch.bfloat16)[1:].view(2, 4, 100, 128)
    assert not compatible(unaligned_address)
    unaligned_rows = torch.zeros(2, 4, 100, 68, dtype=torch.bfloat16)[..., :64]  # 136 B apart
    assert not compatible(unaligned_rows)
    assert not compatible(_qkv()[0].transpose(2, 3))  # last stride not 1
    overlapping_rows = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16).expand(2, 4, 100, 64)
    assert not compatible(overlapping_rows)
    padded_batch = torch.zeros(2, 4 * 100 * 64 + 8, dtype=torch.bfloat16)[:, : 4 * 100 * 64].view(2, 4, 100, 64)
    assert compatible(padded_batch)  # batch stride 25608 elements: 51216 B, a multiple of 16
    odd_batch = torch.zeros(2, 4 * 100 * 64 + 3, dtype=torch.bfloat16)[:, : 4 * 100 * 64].view(2, 4, 100, 64)
    assert not compatible(odd_batch)  # 51206 B
    assert compatible(odd_batch[:1])  # a size-1 dimension's stride never enters an address


def test_tma_offered_only_for_16_bit_on_hopper_with_aligned_tensors():
    offered = triton_backend.tma_offered
    assert offered(*_qkv(torch.bfloat16), capability=(9, 0))
    assert offered(*_qkv(torch.float16, transposed=True), capability=(10, 0))
    assert not offered(*_qkv(torch.float32), capability=(9, 0))
    assert not offered(*_qkv(torch.bfloat16), capability=(8, 0))
    assert not offered(*_qkv(torch.bfloat16), capability=(8, 9))
    assert not offered(*_qkv(torch.bfloat16), capability=None)
    q, k, _ = _qkv(torch.float16, dim=64)
    v = torch.zeros(2, 4, 100, 68, dtype=torch.float16)[..., :64]
    assert not offered(q, k, v, capability=(9, 0))


def _modes(candidate_set):
    return [(transposed, use_tma) for *_, transposed, use_tma in candidate_set]


def test_autotune_configs_offer_tma_only_where_allowed():
    candidates = triton_backend.candidates
    half = list(configs.TRITON_HALF_TILES[128])
    # Where TMA is offered it takes the column-wise pointer layout's place (same code on sm_90).
    with_tma = candidates(128, 128, 128, is_float32=False, tma=True)
    assert _modes(with_tma) == [(False, False), (False, True)] * len(half)
    assert [tuple(c[:4]) for c in with_tma[::2]] == half
    assert _modes(candidates(128, 128, 128, is_float32=False, tma=False)) == [(False, False), (True, False)] * len(half)
    for tma in (False, True):
        assert set(_modes(candidates(64, 64, 64, is_float32=True, tma=tma))) == {(False, False)}
    with kernel_configs(triton_loads=["tma"]):
        assert set(_modes(candidates(64, 128, 128, is_float32=False, tma=True))) == {(False, True)}
        # TMA alone asked for but not allowed: the pointer layouts rather than no configs at all.
        assert set(_modes(candidates(64, 128, 128, is_float32=False, tma=False))) == {(False, False), (True, False)}
    with kernel_configs(triton_loads=["columns"]):
        assert set(_modes(candidates(64, 128, 128, is_float32=False, tma=True))) == {(True, False)}


def test_kernel_config_overrides_nest_and_reset():
    with kernel_configs(triton_tiles=[(64, 32, 4, 2)], triton_loads=["rows"]):
        assert triton_backend.candidates(64, 128, 128, is_float32=False, tma=True) == ((64, 32, 4, 2, False, False),)
        with kernel_configs(triton_loads=["tma"], gluon_stages=2):
            assert configs.current().triton_tiles == ((64, 32, 4, 2),)
            assert triton_backend.candidates(64, 128, 128, is_float32=False, tma=True) == ((64, 32, 4, 2, False, True),)
            assert configs.gluon_stages(128, 128) == 2
        assert configs.current().triton_loads == ("rows",) and configs.current().gluon_stages is None
        # Tiles that do not divide the pattern's blocks are dropped (a small default if none does).
        assert triton_backend.candidates(64, 16, 16, is_float32=False, tma=False)[0][:2] == (16, 16)
    assert configs.current() == configs.NO_OVERRIDES
    assert configs.gluon_stages(128, 128) == 3 and configs.gluon_stages(64, 64) == 4
    for bad in (
        dict(triton_loads=["fast"]),
        dict(triton_loads=[]),
        dict(triton_tiles=[(64, 32)]),
        dict(gluon_stages=9),
    ):
        with pytest.raises(ValueError):
            with kernel_configs(**bad):
                pass


def test_scratch_allocator_installed_only_when_none_is_set():
    from triton.runtime import _allocation

    def install_and_read():
        launch.ensure_scratch_allocator()
        return _allocation._allocator.get()

    def users_allocator(size, alignment, stream):
        raise AssertionError("not called here")

    def with_user_allocator():
        triton.set_allocator(users_allocator)
        return install_and_read()

    # Fresh contexts: the allocator is a context variable, so nothing leaks into other tests.
    assert contextvars.Context().run(install_and_read) is launch.scratch_buffer
    assert contextvars.Context().run(with_user_allocator) is users_allocator


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [(2, 32, 8, 1000, 1500, 128, 128, 128), (2, 4, 1, 777, 777, 256, 64, 64), (1, 8, 8, 513, 513, 64, 128, 64)]
    + SHAPES,
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_tma_path_matches_reference(shape, dtype, causal, poison_outputs):
    """Only TMA configs autotuned (compute capability >= 9): compiled descriptor loads against the reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    generator = torch.Generator().manual_seed(17)
    q, k, v = (
        poisoned_view(batch, heads, seq, dim, dtype, generator, transposed=causal, device="cuda")
        for heads, seq in ((q_heads, seq_q), (kv_heads, seq_k), (kv_heads, seq_k))
    )
    pattern = sa.random_pattern(
        batch=batch,
        heads=kv_heads,
        seq_q=seq_q,
        seq_k=seq_k,
        density=0.4,
        seed=17,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device="cuda",
    )
    with kernel_configs(triton_loads=["tma"]):
        out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="triton", return_lse=True)
        # The launcher offered TMA (same cached autotuner, already run) and a TMA config ran.
        candidate_set = triton_backend.candidates(dim, block_q, block_k, is_float32=False, tma=True)
    ref, ref_lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=True)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    assert torch.allclose(lse, ref_lse, atol=2e-2)
    kernel = triton_backend.autotuned_kernel(candidate_set)
    assert getattr(kernel, "best_config", None) is not None and kernel.best_config.kwargs["USE_TMA"]
