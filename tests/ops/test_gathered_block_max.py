"""Gathered block maxima: the Triton kernel against the reference, the reference against dense
products, its chunking and working memory, the cases the kernel refuses, GPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sparse_attn.geometry import num_blocks
from sparse_attn.ops.gathered_block_max import gathered_block_max
from sparse_attn.ops.gathered_block_max import naive as gathered_naive
from sparse_attn.ops.gathered_block_max import triton as gathered_triton


def random_case(batch, q_heads, kv_heads, seq_q, seq_k, dim, block_k, rows, chunks, dtype, seed, device="cpu"):
    """q, k and lists of ``chunks`` KV blocks per query block, some absent (with units out of range)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq_q, dim, generator=generator).to(device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_k, dim, generator=generator).to(device=device, dtype=dtype)
    n_kv = num_blocks(seq_k, block_k)
    units = torch.randint(0, n_kv, (batch, q_heads, rows, chunks), generator=generator)
    units[..., 0] = n_kv - 1  # the last, partial KV block
    present = torch.rand(batch, q_heads, rows, chunks, generator=generator) > 0.3
    present[..., 0] = True
    outside = torch.where(torch.rand(units.shape, generator=generator) > 0.5, n_kv + 3, -2)
    units = torch.where(present, units, outside)
    return q, k, units.to(device), present.to(device)


def dense_block_max(q, k, units, present, q_blocks, block_q, block_k):
    """The definition, one (batch, head, query block, unit) at a time in float64."""
    group = q.shape[1] // k.shape[1]
    out = torch.full(units.shape, float("-inf"), dtype=torch.float64)
    for b, h, r, c in torch.nonzero(present).tolist():
        row = q_blocks[r] * block_q
        unit = int(units[b, h, r, c])
        rows = q[b, h, row : row + block_q].double()
        keys = k[b, h // group, unit * block_k : (unit + 1) * block_k].double()
        out[b, h, r, c] = (rows @ keys.T).max()
    return out


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k, q_blocks, chunks, dtype",
    [
        (2, 6, 2, 77, 130, 64, 16, 16, range(2, 5), 3, torch.float32),  # GQA 3, Sq < Sk, head-dim slices
        (1, 2, 2, 77, 77, 32, 32, 16, range(0, 3), 4, torch.bfloat16),  # whole query tile resident
        (1, 4, 2, 50, 130, 16, 16, 32, range(1, 4), 3, torch.float32),  # GQA 2, block_k 32
        (1, 2, 1, 20, 45, 16, 8, 8, range(0, 3), 2, torch.float16),  # blocks smaller than the tile
        (2, 6, 3, 77, 130, 64, 16, 16, (4, 0, 2, 4), 3, torch.float32),  # a tuple of blocks, any order
    ],
)
def test_kernel_matches_reference(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k, q_blocks, chunks, dtype, monkeypatch
):
    q, k, units, present = random_case(
        batch, q_heads, kv_heads, seq_q, seq_k, dim, block_k, len(q_blocks), chunks, dtype, seed=seq_k + dim
    )
    geometry = dict(q_blocks=q_blocks, block_q=block_q, block_k=block_k)
    expected = gathered_naive.gathered_block_max(q, k, units, present, **geometry)
    # The output is poisoned: the kernel must write every element.
    monkeypatch.setattr(gathered_triton, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    got = gathered_triton.gathered_block_max_triton(q, k, units, present, **geometry)
    assert got.dtype == torch.float32 and got.shape == units.shape
    assert not got.isnan().any()
    assert torch.equal(got == float("-inf"), ~present)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("q_blocks", [range(1, 5), (4, 1, 3)], ids=["range", "tuple"])
def test_reference_is_the_definition(q_blocks):
    block_q, block_k = 16, 16
    q, k, units, present = random_case(2, 6, 2, 77, 130, 16, block_k, len(q_blocks), 5, torch.float32, seed=3)
    got = gathered_block_max(q, k, units, present, q_blocks=q_blocks, block_q=block_q, block_k=block_k)
    expected = dense_block_max(q, k, units, present, q_blocks, block_q, block_k)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage that an operation creates (views of existing storages excluded)."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {x.untyped_storage().data_ptr() for x in existing}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in self.existing:
                self.existing.add(leaf.untyped_storage().data_ptr())
                self.largest = max(self.largest, leaf.untyped_storage().nbytes())
        return out


def test_reference_gathers_only_the_listed_blocks_in_chunks(monkeypatch):
    q_blocks, block_q, block_k, chunks = range(3, 20), 16, 16, 3
    q, k, units, present = random_case(1, 4, 2, 1000, 2048, 32, block_k, len(q_blocks), chunks, torch.bfloat16, 4)
    geometry = dict(q_blocks=q_blocks, block_q=block_q, block_k=block_k)
    whole = gathered_block_max(q, k, units, present, **geometry)
    # One query block per piece: its gathered keys and products, far less than a float32 copy of k.
    per_block = 4 * chunks * block_k * (2 * 32 + block_q + 2)
    monkeypatch.setattr(gathered_naive, "CHUNK_ELEMENTS", per_block)
    with _LargestAllocation([q, k, units, present]) as allocations:
        chunked = gathered_block_max(q, k, units, present, **geometry)
    assert torch.equal(chunked, whole)
    assert allocations.largest <= 4 * per_block < k.numel() * 4 // 8


def test_kernel_refuses_what_it_cannot_take():
    q = torch.zeros(1, 2, 16, 64)
    assert unsupported(q, torch.zeros(1, 1, 16, 64), 16, 16) is None
    assert "head_dim" in unsupported(torch.zeros(1, 2, 16, 96), torch.zeros(1, 1, 16, 96), 16, 16)
    assert "blocks" in unsupported(q, torch.zeros(1, 1, 16, 64), 256, 16)
    assert "one dtype" in unsupported(q, torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16), 16, 16)
    assert "float16" in unsupported(q.double(), torch.zeros(1, 1, 16, 64, dtype=torch.float64), 16, 16)


def unsupported(q, k, block_q, block_k):
    return gathered_triton.unsupported_reason(q, k=k, block_q=block_q, block_k=block_k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 128), (torch.float16, 256), (torch.float32, 64)])
def test_kernel_matches_reference_on_gpu(dtype, dim):
    seq, block = 8192, 128
    q_blocks = range(0, seq // block)
    q, k, units, present = random_case(1, 8, 2, seq, seq, dim, block, len(q_blocks), 8, dtype, seed=5, device="cuda")
    geometry = dict(q_blocks=q_blocks, block_q=block, block_k=block)
    expected = gathered_naive.gathered_block_max(q, k, units, present, **geometry)
    got = gathered_block_max(q, k, units, present, **geometry)  # the kernel on CUDA
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
