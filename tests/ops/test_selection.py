"""Selection operator: the sort-based rules on small cases and long rows, and the Triton row-selection
kernel against them (the rules it replaces on CUDA)."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops.selection import Budget, cumulative_mass_mask, topk_by_rank_mask, topk_mask
from sparse_attn.ops.selection import naive as selection_naive
from sparse_attn.ops.selection import triton as selection_triton
from sparse_attn.ops.selection.naive import cumulative_mass_mask_reference, topk_by_rank_mask_reference


@pytest.fixture
def poisoned_selection(monkeypatch):
    """Selection outputs start as 7s: an entry the kernel does not write stays 7."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, 7, dtype=dtype, device=device)

    monkeypatch.setattr(selection_triton, "_empty", poisoned)


def _written(mask: torch.Tensor) -> bool:
    return bool(((mask.view(torch.uint8) == 0) | (mask.view(torch.uint8) == 1)).all())


def _masses(generator: torch.Generator, shape, kind: str) -> torch.Tensor:
    x = torch.rand(shape, generator=generator) ** 4
    if kind == "zeros":  # every third entry has no mass; one row has none at all
        x[..., ::3] = 0
        x.view(-1, shape[-1])[0] = 0
    elif kind == "ties":  # many equal entries (uniform rows, repeated values)
        x = (torch.rand(shape, generator=generator) * 4).floor() / 4
    elif kind == "uniform":
        x = torch.full(shape, 1.0 / shape[-1])
    return x


SHAPES = [(1, 1), (3, 7), (2, 3, 33), (2, 2, 5, 129), (4, 300), (1, 2, 2000)]


BUDGETS = [
    (0.9, Budget()),
    (0.5, Budget(minimum=3)),
    (1.0, Budget()),
    (0.0, Budget(minimum=0)),
    (0.7, Budget(minimum=2, maximum=4)),
    (0.3, Budget(minimum=1, maximum=1)),
]


def _check_mass_rule(scores, got, threshold, budget, context):
    """``got`` is, per row, the top-k entries in stable order for a k the rule allows up to rounding."""
    keep = got.sum(-1)
    assert torch.equal(got, topk_by_rank_mask_reference(scores, keep)), f"{context}: not the top entries in order"
    rows, kept = scores.reshape(-1, scores.shape[-1]).double(), got.reshape(-1, scores.shape[-1])
    for row, mask in zip(rows, kept, strict=True):
        count, target = int(mask.sum()), threshold * float(row.sum())
        values = row.sort(descending=True).values
        reached = float(values[:count].sum())
        short_without_last = float(values[: max(count - 1, 0)].sum())
        slack = 1e-5 * float(row.sum()) + 1e-30
        free = count <= budget.minimum or (budget.maximum is not None and count == budget.maximum)
        assert free or (reached >= target - slack and short_without_last < target + slack), context
        assert count >= min(budget.minimum, row.numel()), context
        assert budget.maximum is None or count <= budget.maximum, context


def test_cumulative_mass_mask_keeps_fewest_entries_with_budgets():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert cumulative_mass_mask(scores, 0.8).tolist() == [[True, False, True, False], [True, True, True, True]]
    capped = cumulative_mass_mask(scores, 0.8, Budget(minimum=1, maximum=2))
    assert capped.tolist() == [[True, False, True, False], [True, True, False, False]]
    floor = cumulative_mass_mask(scores, 0.1, Budget(minimum=3))
    assert floor.sum(-1).tolist() == [3, 3]


def test_cumulative_mass_mask_on_long_rows_scans_in_pieces():
    # Rows past 64K entries take the piecewise scan; it must pick what a float64 scan picks.
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 70_001, generator=generator) ** 8
    got = cumulative_mass_mask(scores, 0.7)
    values, order = torch.sort(scores.double(), dim=-1, descending=True, stable=True)
    cumulative = values.cumsum(-1)
    keep = ((cumulative - values) < 0.7 * cumulative[:, -1:]).sum(-1)
    assert got.sum(-1).tolist() == keep.tolist()
    assert torch.equal(got, torch.zeros_like(got).scatter_(-1, order, torch.arange(70_001) < keep[:, None]))
    assert torch.allclose(selection_naive._row_cumsum(scores), scores.double().cumsum(-1).float(), rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["plain", "zeros", "ties", "uniform"])
def test_cumulative_mass_kernel_matches_reference(shape, kind, poisoned_selection):
    """Exactly the reference where sums are exact (multiples of 1/4); else the same rule up to rounding.

    The reference scans the sorted row sequentially and the kernel reduces in a tree, so at a
    row whose running mass lands within rounding of the target (threshold 1.0, entries too
    small to change a float sum) they may disagree on the entries at the boundary.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    generator = torch.Generator().manual_seed(seed)
    scores = _masses(generator, shape, kind)
    for threshold, budget in BUDGETS:
        context = f"seed {seed}, threshold {threshold}, {budget}"
        expected = cumulative_mass_mask_reference(scores, threshold, budget)
        got = selection_triton.cumulative_mass_mask_triton(
            scores, threshold, minimum=budget.minimum, maximum=budget.maximum
        )
        assert got.shape == scores.shape and got.dtype == torch.bool
        assert _written(got), "an entry was not written"
        if kind == "ties":
            assert torch.equal(got, expected), context
        else:
            _check_mass_rule(scores, got, threshold, budget, context)
            if threshold < 1.0 and kind == "plain":
                assert (got != expected).sum(-1).max() <= 1, context


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["plain", "ties", "infinite", "signed_zeros"])
def test_rank_kernel_matches_reference(shape, kind, poisoned_selection):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    generator = torch.Generator().manual_seed(seed)
    ranking = torch.randn(shape, generator=generator)
    if kind == "ties":
        ranking = ranking.round()
    elif kind == "infinite":  # masked logits
        ranking[..., ::2] = float("-inf")
    elif kind == "signed_zeros":  # -0.0 ties with +0.0, as in a sort
        ranking = torch.where(ranking > 0, torch.zeros_like(ranking), -torch.zeros_like(ranking))
    keep = torch.randint(0, shape[-1] + 2, shape[:-1], generator=generator)
    expected = topk_by_rank_mask_reference(ranking, keep)
    got = selection_triton.topk_by_rank_mask_triton(ranking, keep)
    assert _written(got), "an entry was not written"
    assert torch.equal(got, expected), f"seed {seed}"


def test_selection_kernel_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="at most"):
        selection_triton.cumulative_mass_mask_triton(torch.rand(2, selection_triton.MAX_ROW + 1), 0.9)
    with pytest.raises(ValueError, match="keep_count must have shape"):
        selection_triton.topk_by_rank_mask_triton(torch.rand(2, 3, 8), torch.ones(3, dtype=torch.long))


def test_cpu_selection_stays_on_the_sort_based_rule(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the kernel must not run for CPU tensors")

    monkeypatch.setattr(selection_triton, "cumulative_mass_mask_triton", fail)
    monkeypatch.setattr(selection_triton, "topk_by_rank_mask_triton", fail)
    scores = torch.rand(3, 40)
    assert cumulative_mass_mask(scores, 0.9).any()
    assert topk_mask(scores, 5).sum() == 15


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 100, 1024, 4097, 8192])
def test_gpu_selection_matches_reference(n):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(2, 4, 64, n, generator=generator) * 3, -1)
    for threshold, budget in [(0.9, Budget()), (0.95, Budget(minimum=4, maximum=32))]:
        expected = cumulative_mass_mask(scores, threshold, budget)
        got = cumulative_mass_mask(scores.cuda(), threshold, budget).cpu()  # dispatches to the kernel
        # Sums are reduced in another order: a row whose running mass lands within rounding of
        # the target may keep one entry more or fewer; nothing else may differ.
        assert (got.sum(-1) - expected.sum(-1)).abs().max() <= 1, f"seed {seed}"
        assert (got != expected).sum(-1).max() <= 1, f"seed {seed}"
    ranking = torch.randn(2, 4, 64, n, generator=generator)
    keep = torch.randint(0, n + 1, (2, 4, 64), generator=generator)
    assert torch.equal(topk_by_rank_mask(ranking.cuda(), keep.cuda()).cpu(), topk_by_rank_mask(ranking, keep))


def test_piecewise_scan_of_rows_of_whole_pieces_is_the_scan_of_its_pieces():
    # A row of exactly 64 pieces takes the piecewise scan with no padding: each piece scanned, then
    # offset by the sum of the pieces before it, the same arithmetic as for a padded row.
    scores = torch.rand(2, 64 * selection_naive._SCAN_PIECE, generator=torch.Generator().manual_seed(3))
    within = scores.view(2, 64, -1).cumsum(-1)
    expected = (within + (within[..., -1].cumsum(-1) - within[..., -1])[..., None]).view(2, -1)
    assert torch.equal(selection_naive._row_cumsum(scores), expected)
    values, order = torch.sort(scores.double(), dim=-1, descending=True, stable=True)
    cumulative = values.cumsum(-1)
    keep = ((cumulative - values) < 0.5 * cumulative[:, -1:]).sum(-1)
    assert cumulative_mass_mask(scores, 0.5).sum(-1).tolist() == keep.tolist()
