"""Mask rows to column lists: the kernel against the reference (prefix count + binary search) and brute force."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops import mask_lists
from sparse_attn.ops.mask_lists import mask_rows_to_lists
from sparse_attn.ops.mask_lists import triton as mask_lists_triton
from sparse_attn.ops.mask_lists.naive import mask_rows_to_lists_reference


def _random_mask(shape, density, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < density
    flat = mask.view(-1, shape[-1])
    flat[0] = False  # an empty row
    flat[-1] = True  # a full row
    return mask


@pytest.mark.parametrize("shape, density", [((3, 5, 37), 0.3), ((2, 2, 2500), 0.05), ((1, 1, 7, 1024), 0.9)])
def test_kernel_equals_reference_and_brute_force(shape, density, monkeypatch, quiet_numpy):
    mask = _random_mask(shape, density, seed=sum(shape))
    counts, columns = mask_rows_to_lists_reference(mask)
    # The kernel's output is poisoned: every entry it should write (lists and padding) must be written.
    monkeypatch.setattr(mask_lists_triton, "_empty", lambda *a, **k: torch.full(*a, -7, **k))
    with quiet_numpy():
        kernel_counts, kernel_columns = mask_lists_triton.mask_rows_to_lists_triton(mask)
    assert torch.equal(kernel_counts, counts) and torch.equal(kernel_columns, columns)
    flat_mask, flat_columns = mask.view(-1, shape[-1]), columns.view(-1, columns.shape[-1])
    assert columns.shape[-1] == int(flat_mask.sum(-1).max())
    for row, kept in zip(flat_mask, flat_columns, strict=True):
        expected = row.nonzero().flatten().to(torch.int32)
        assert torch.equal(kept[: expected.numel()], expected)
        assert not bool(kept[expected.numel() :].any())


def test_bad_masks_are_refused():
    with pytest.raises(TypeError, match="mask must be bool"):
        mask_rows_to_lists(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one column"):
        mask_rows_to_lists(torch.zeros(2, 0, dtype=torch.bool))
    assert "at least one column" in mask_lists_triton.unsupported_reason(torch.zeros(2, 0, dtype=torch.bool))
    assert mask_lists.__all__ == ["mask_rows_to_lists"]


@pytest.mark.gpu
def test_kernel_equals_reference_on_gpu():
    mask = _random_mask((4, 32, 256, 1000), 0.2, seed=3).cuda()
    counts, columns = mask_rows_to_lists(mask)  # the kernel on CUDA
    reference_counts, reference_columns = mask_rows_to_lists_reference(mask)
    assert torch.equal(counts, reference_counts) and torch.equal(columns, reference_columns)
