"""Causal top-n block lists: the reference against a row-by-row loop, the kernel (interpreter) equal to the
reference with ties and NaN, written into views of larger tensors, bad input, GPU size."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops.causal_top_blocks import causal_top_blocks, causal_top_blocks_gated
from sparse_attn.ops.causal_top_blocks import triton as kernels
from sparse_attn.ops.causal_top_blocks.naive import causal_top_blocks_reference

SENTINEL = -12345

# (batch, heads, rows, n_blocks, first_pos, block, top_n, initial, local, ranked_from)
CASES = [
    (2, 3, 13, 5, 0, 4, 3, 1, 2, 3),  # rows that rank nothing; fewer eligible blocks than top_n
    (1, 2, 37, 45, 90, 3, 16, 1, 2, 31),  # NSA's rule, odd block
    (2, 1, 9, 70, 400, 7, 5, 0, 1, 0),  # top_n not a power of two, no initial block
    (1, 1, 20, 32, 40, 2, 20, 3, 4, 0),  # top_n above the eligible count
    (1, 2, 17, 130, 1000, 8, 2, 2, 3, 0),  # forced blocks beyond top_n: ties at +inf go to the lower index
]


def _scores(case, *, integer: bool, seed: int = 0) -> torch.Tensor:
    batch, heads, rows, n_blocks = case[:4]
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, rows, n_blocks)
    if integer:  # frequent ties, and -0.0 beside +0.0
        scores = torch.randint(-2, 3, shape, generator=generator).float() * 0.5
        return torch.where(torch.rand(shape, generator=generator) < 0.2, -0.0, scores)
    scores = torch.rand(shape, generator=generator)
    scores[torch.rand(shape, generator=generator) < 0.05] = float("-inf")
    scores[torch.rand(shape, generator=generator) < 0.05] = float("nan")
    scores[torch.rand(shape, generator=generator) < 0.05] = float("inf")  # ranked after forced blocks
    return scores


def _options(case) -> dict:
    first_pos, block, top_n, initial, local, ranked_from = case[4:]
    return dict(first_pos=first_pos, block=block, top_n=top_n, initial=initial, local=local, ranked_from=ranked_from)


def _loop(scores: torch.Tensor, *, first_pos, block, top_n, initial, local, ranked_from):
    """Row by row in plain Python: forced blocks first (lower index first), then by score, ties to the lower index."""
    batch, heads, rows, _ = scores.shape
    indices = torch.zeros(batch, heads, rows, top_n, dtype=torch.int32)
    counts = torch.zeros(batch, heads, rows, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            for t in range(rows):
                position = first_pos + t
                own = position // block
                ranked = []
                for j in range(own + 1):
                    value = float(scores[b, h, t, j])
                    if j < initial or j > own - local:
                        ranked.append((0, 0.0, j))
                    elif position >= ranked_from and value == value and value > float("-inf"):
                        ranked.append((1, -value, j))
                chosen = sorted(j for _, _, j in sorted(ranked)[:top_n])
                counts[b, h, t] = len(chosen)
                indices[b, h, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return indices, counts


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("integer", [True, False])
def test_reference_matches_a_row_loop(case, integer):
    scores = _scores(case, integer=integer)
    indices, counts = causal_top_blocks_reference(scores, **_options(case))
    expected_indices, expected_counts = _loop(scores, **_options(case))
    assert torch.equal(counts, expected_counts)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("integer", [True, False])
def test_kernel_equals_reference(case, integer):
    scores = _scores(case, integer=integer, seed=1)
    batch, heads, rows, _ = scores.shape
    top_n = case[6]
    # Outputs are views into larger sentinel-filled tensors (rows 3.. of 3 + rows + 2), so strides differ
    # from the compact case and every written element is checked, nothing outside the view touched.
    whole_indices = torch.full((batch, heads, rows + 5, top_n), SENTINEL, dtype=torch.int32)
    whole_counts = torch.full((batch, heads, rows + 5), SENTINEL, dtype=torch.int32)
    out = (whole_indices[:, :, 3 : 3 + rows], whole_counts[:, :, 3 : 3 + rows])
    kernels.causal_top_blocks_triton(scores, *out, **_options(case))
    indices, counts = causal_top_blocks_reference(scores, **_options(case))
    assert torch.equal(out[1], counts)
    assert torch.equal(out[0], indices)
    assert bool((whole_indices[:, :, :3] == SENTINEL).all() and (whole_counts[:, :, 3 + rows :] == SENTINEL).all())


def test_kernel_reads_strided_scores():
    case = CASES[2]
    scores = _scores(case, integer=False, seed=2).transpose(0, 1).contiguous().transpose(0, 1)
    indices, counts = causal_top_blocks_reference(scores, **_options(case))
    out = (
        torch.full(indices.shape, SENTINEL, dtype=torch.int32),
        torch.full(counts.shape, SENTINEL, dtype=torch.int32),
    )
    kernels.causal_top_blocks_triton(scores, *out, **_options(case))
    assert torch.equal(out[0], indices) and torch.equal(out[1], counts)


def test_bad_input_is_refused():
    scores = torch.rand(1, 1, 4, 3)
    options = dict(first_pos=0, block=4, top_n=2)
    with pytest.raises(TypeError, match="scores"):
        causal_top_blocks([[0.0]], **options)
    with pytest.raises(ValueError, match="float32"):
        causal_top_blocks(scores.double(), **options)
    with pytest.raises(ValueError, match="local"):
        causal_top_blocks(scores, **options, local=0)
    with pytest.raises(ValueError, match="top_n"):
        causal_top_blocks(scores, first_pos=0, block=4, top_n=0)
    with pytest.raises(ValueError, match="needs 4"):
        causal_top_blocks(scores, first_pos=12, block=4, top_n=2)
    with pytest.raises(ValueError, match="out\\[0\\]"):
        causal_top_blocks(scores, **options, out=(torch.empty(1, 1, 4, 3, dtype=torch.int32), torch.empty(1, 1, 4)))
    with pytest.raises(TypeError, match="out\\[1\\]"):
        causal_top_blocks(scores, **options, out=(torch.empty(1, 1, 4, 2, dtype=torch.int32), torch.empty(1, 1, 4)))


@pytest.mark.gpu
def test_kernel_equals_reference_at_nsa_size():
    generator = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(1, 4, 4096, 1024, device="cuda", generator=generator)
    options = dict(first_pos=61440, block=64, top_n=16, initial=1, local=2, ranked_from=31)
    indices, counts = causal_top_blocks(scores, **options)
    expected_indices, expected_counts = causal_top_blocks_reference(scores, **options)
    assert torch.equal(counts, expected_counts) and torch.equal(indices, expected_indices)
    # The widest rows the kernel takes, and a row past them falls back with a warning.
    wide = torch.rand(1, 1, 8, kernels.MAX_BLOCKS, device="cuda", generator=generator)
    wide_options = dict(options, first_pos=64 * kernels.MAX_BLOCKS - 8)
    assert torch.equal(causal_top_blocks(wide, **wide_options)[0], causal_top_blocks_reference(wide, **wide_options)[0])
    wider = torch.rand(1, 1, 2, kernels.MAX_BLOCKS + 1, device="cuda", generator=generator)
    with pytest.warns(UserWarning, match="registers"):
        causal_top_blocks(wider, **dict(options, first_pos=64 * kernels.MAX_BLOCKS))


# Gated form: (batch, q_heads, kv_heads, heads_per_list, rows, n_blocks, first_pos, block, top_n, dim)
GATED = [
    (2, 4, 2, 1, 19, 6, 0, 4, 3, 16),  # a list per query head, GQA 2
    (1, 6, 2, 3, 21, 40, 90, 3, 5, 32),  # a list per KV head (group 3 summed), non-power-of-two heads
    (2, 3, 3, 1, 17, 20, 300, 16, 2, 16),  # MHA, top_n 2
]


def _gated_inputs(case, dtype, seed=0, device="cpu"):
    """Integer-valued q and block keys: products and sums exact in float32, ties frequent."""
    batch, q_heads, kv_heads, _, rows, n_blocks, _, _, _, dim = case
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (batch, rows, q_heads, dim), generator=generator).to(dtype).transpose(1, 2)
    keys = torch.randint(-2, 3, (batch, kv_heads, n_blocks, dim), generator=generator).float()
    return q.to(device), keys.to(device)


def _gated_expected(q, keys, heads_per_list, **options):
    from sparse_attn.ops.gqa import grouped_matmul

    scores = grouped_matmul(q.float(), keys)
    if heads_per_list > 1:
        scores = scores.unflatten(1, (q.shape[1] // heads_per_list, heads_per_list)).sum(2)
    return causal_top_blocks_reference(scores, **options)


@pytest.mark.parametrize("case", GATED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_kernel_equals_reference(case, dtype):
    heads_per_list, first_pos, block, top_n = case[3], case[6], case[7], case[8]
    options = dict(first_pos=first_pos, block=block, top_n=top_n, initial=0, local=1, ranked_from=0)
    q, keys = _gated_inputs(case, dtype)
    heads = q.shape[1] // heads_per_list
    out = (
        torch.full((q.shape[0], heads, q.shape[2], top_n), SENTINEL, dtype=torch.int32),
        torch.full((q.shape[0], heads, q.shape[2]), SENTINEL, dtype=torch.int32),
    )
    kernels.causal_top_blocks_gated_triton(q, keys, *out, heads_per_list=heads_per_list, **options)
    indices, counts = _gated_expected(q, keys, heads_per_list, **options)
    assert torch.equal(out[1], counts) and torch.equal(out[0], indices)
    # The operator on CPU (reference path, chunked) gives the same lists.
    got = causal_top_blocks_gated(q, keys, heads_per_list=heads_per_list, **options)
    assert torch.equal(got[0], indices) and torch.equal(got[1], counts)


def test_gated_bad_input_is_refused():
    q, keys = torch.rand(1, 4, 5, 16), torch.rand(1, 2, 3, 16)
    options = dict(first_pos=0, block=4, top_n=2)
    with pytest.raises(TypeError, match="keys must be float32"):
        causal_top_blocks_gated(q, keys.half(), **options)
    with pytest.raises(ValueError, match="heads_per_list"):
        causal_top_blocks_gated(q, keys, heads_per_list=3, **options)
    with pytest.raises(ValueError, match="do not match"):
        causal_top_blocks_gated(q, torch.rand(1, 3, 3, 16), **options)
    with pytest.raises(ValueError, match="needs 5"):
        causal_top_blocks_gated(q, keys, first_pos=12, block=4, top_n=2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads_per_list", [1, 4])
def test_gated_kernel_equals_reference_at_moba_size(heads_per_list):
    """MoBA's 512-token blocks at 128K (256 blocks), 32/8 heads, integer-valued bf16 inputs (exact products)."""
    case = (1, 32, 8, heads_per_list, 2048, 256, 131072 - 2048, 512, 3, 128)
    q, keys = _gated_inputs(case, torch.bfloat16, device="cuda")
    options = dict(first_pos=case[6], block=512, top_n=3, initial=0, local=1, ranked_from=0)
    got = causal_top_blocks_gated(q, keys, heads_per_list=heads_per_list, **options)
    indices, counts = _gated_expected(q, keys, heads_per_list, **options)
    assert torch.equal(got[1], counts) and torch.equal(got[0], indices)
