"""Paged decode operator: the split-K kernel (interpreter) and the reference against a float64 oracle
over the contiguous K/V, dense decode against SDPA, bad input, GPU sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, relative_error

from helpers_paged import dense_selection, oracle, paged_case, random_selection
from sparse_attn.ops.paged_decode import paged_decode
from sparse_attn.ops.paged_decode.naive import paged_decode_reference
from sparse_attn.ops.paged_decode.triton import choose_num_splits, paged_decode_triton

# (seq_lens, q_heads, kv_heads, head_dim, page_size, select_block, dtype, num_splits)
KERNEL_CASES = [
    ((37, 70), 4, 2, 64, 16, 16, torch.float32, 3),  # GQA 2, partial last pages, 3 splits
    ((50,), 6, 2, 64, 16, 16, torch.bfloat16, 1),  # group 3 (non-power-of-2), one split writes the output
    ((33, 19, 64), 12, 4, 64, 32, 32, torch.float16, 2),  # 12/4 heads, batch 3, page 32
    ((90,), 8, 1, 128, 64, 64, torch.float32, 2),  # group 8, page 64, head_dim 128
    ((41, 23), 6, 3, 64, 16, 1, torch.float32, 2),  # token-level selection (Double Sparsity / TidalDecode)
    ((29,), 2, 2, 256, 16, 4, torch.bfloat16, 2),  # head_dim 256, group 1, 4-token blocks
]


def _run_kernel(case, selected, counts, select_block, num_splits):
    return paged_decode_triton(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, selected, counts,
        scale=case.q.shape[-1] ** -0.5, select_block=select_block, num_splits=num_splits,
    )  # fmt: skip


@pytest.mark.parametrize("seq_lens, q_heads, kv_heads, dim, page_size, select_block, dtype, splits", KERNEL_CASES)
def test_kernel_matches_oracle_on_random_selections(
    seq_lens, q_heads, kv_heads, dim, page_size, select_block, dtype, splits, poison_outputs
):
    case = paged_case(seq_lens, q_heads, kv_heads, dim, page_size, dtype=dtype, seed=sum(seq_lens))
    selected, counts = random_selection(case, kv_heads, select_block, seed=dim, past_end=True)
    out, lse = _run_kernel(case, selected, counts, select_block, splits)
    expected_out, expected_lse = oracle(case, selected, counts, select_block)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert relative_error(out, expected_out) <= TOLERANCE[dtype]
    assert torch.allclose(lse.double(), expected_lse, atol=1e-3 if dtype == torch.float32 else 2e-2)
    reference_out, reference_lse = paged_decode_reference(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, selected, counts,
        scale=dim**-0.5, select_block=select_block,
    )  # fmt: skip
    assert relative_error(reference_out, expected_out) <= TOLERANCE[dtype]
    assert torch.allclose(reference_lse.double(), expected_lse, atol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_dense_decode_through_the_kernel_equals_sdpa(num_splits, poison_outputs):
    seq_lens, q_heads, kv_heads, dim = (45, 16, 64), 8, 2, 64
    case = paged_case(seq_lens, q_heads, kv_heads, dim, 16, seed=3)
    selected, counts = dense_selection(case, kv_heads)
    out = _run_kernel(case, selected, counts, 16, num_splits)[0]
    for b, length in enumerate(seq_lens):
        expected = F.scaled_dot_product_attention(
            case.q[b, :, None].double(), case.keys[b].double(), case.values[b].double(), enable_gqa=True
        )[:, 0]
        assert relative_error(out[b], expected) <= 1e-4, length


def test_empty_selection_gives_zeros_and_minus_infinity(poison_outputs):
    case = paged_case((20, 30), 4, 2, 64, 16, seed=4)
    selected, counts = dense_selection(case, 2)
    counts[1, 0] = 0
    for num_splits in (1, 2):
        out, lse = _run_kernel(case, selected, counts, 16, num_splits)
        assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
        assert torch.isneginf(lse[1, :2]).all() and torch.isfinite(lse[0]).all() and torch.isfinite(out).all()
    reference_out, reference_lse = paged_decode_reference(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, selected, counts,
        scale=0.125, select_block=16,
    )  # fmt: skip
    assert torch.equal(reference_out[1, :2], out[1, :2]) and torch.isneginf(reference_lse[1, :2]).all()


def test_entry_point_runs_the_reference_on_cpu_and_checks_arguments():
    case = paged_case((25, 9), 4, 2, 64, 16, seed=5)
    selected, counts = dense_selection(case, 2)
    arguments = (case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, selected, counts)
    out, lse = paged_decode(*arguments, return_lse=True)
    expected_out, expected_lse = oracle(case, selected, counts, 16)
    assert relative_error(out, expected_out) <= 1e-4 and torch.allclose(lse.double(), expected_lse, atol=1e-4)

    def fails(error, match, index=None, value=None, **options):
        args = list(arguments)
        if index is not None:
            args[index] = value
        with pytest.raises(error, match=match):
            paged_decode(*args, **options)

    fails(ValueError, "q must have 3 dimensions", 0, case.q[:, :, None])
    fails(TypeError, "k_pages must have q's dtype", 1, case.k_pages.half())
    fails(ValueError, "v_pages must have k_pages' shape", 2, case.v_pages[:-1])
    fails(ValueError, "multiple of the KV heads", 0, case.q[:, :3])
    fails(TypeError, "page_table must be int32", 3, case.page_table.long())
    fails(ValueError, r"seq_lens must have shape \(2,\)", 4, case.seq_lens[:1])
    fails(ValueError, r"selected must have shape \(2, 2, \*\)", 5, selected[:, :1])
    fails(TypeError, "selected_counts must be int32", 6, counts.float())
    fails(ValueError, "select_block .* must divide the page size", select_block=5)
    fails(ValueError, "select_block must be >= 1", select_block=0)
    fails(ValueError, "scale must be a positive", scale=-1.0)


def test_split_count_fills_the_device_without_tiny_splits():
    assert choose_num_splits(1, 8, 131072, 132) == 66  # 528 programs wanted, 512 tokens per split
    assert choose_num_splits(8, 8, 2048, 132) == 8  # capped by 256 tokens per split
    assert choose_num_splits(32, 8, 131072, 132) == 3
    assert choose_num_splits(4, 2, 100, 132) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("page_size, select_block", [(16, 16), (32, 32), (64, 64), (16, 1)])
def test_kernel_matches_reference_on_gpu(dtype, page_size, select_block):
    seq_lens = (4099, 20000, 777, 16384)
    case = paged_case(seq_lens, 32, 8, 128, page_size, dtype=dtype, seed=11, device="cuda")
    selected, counts = random_selection(case, 8, select_block, seed=12)
    out, lse = paged_decode(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, selected, counts,
        select_block=select_block, return_lse=True,
    )  # fmt: skip
    expected_out, expected_lse = oracle(case, selected.cpu(), counts.cpu(), select_block)
    assert relative_error(out.cpu(), expected_out) <= TOLERANCE[dtype]
    assert torch.allclose(lse.cpu().double(), expected_lse, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads, kv_heads, dim", [(32, 8, 128), (12, 4, 64), (8, 8, 256), (28, 4, 128)])
def test_dense_decode_equals_sdpa_on_gpu(q_heads, kv_heads, dim):
    seq_lens = (32768, 1000, 4097)
    case = paged_case(seq_lens, q_heads, kv_heads, dim, 16, dtype=torch.bfloat16, seed=13, device="cuda")
    selected, counts = dense_selection(case, kv_heads)
    out = paged_decode(case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, selected, counts)
    for b in range(len(seq_lens)):
        expected = F.scaled_dot_product_attention(case.q[b, :, None], case.keys[b], case.values[b], enable_gqa=True)[
            :, 0
        ]
        assert relative_error(out[b], expected) <= 1e-2
