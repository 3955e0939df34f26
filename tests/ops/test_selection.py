"""Selection operator: the sort-based rules on small cases and long rows, and the Triton row-selection
kernel against them (the rules it replaces on CUDA)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import source_in_child

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


SHAPES = [(1, 1), (3, 7), (2, 3, 33), (1, 2, 3, 129), (4, 300), (1, 2, 2000)]


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
    with pytest.raises(ValueError, match="non-empty row"):
        selection_triton.cumulative_mass_mask_triton(torch.rand(2, 0), 0.9)
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


# Long rows: the radix select of rows past MAX_ROW, exercised on short rows with small sizes.


@pytest.fixture
def long_rows(monkeypatch, poisoned_selection):
    """Rows past 16 entries take the radix select, in chunks of 16 entries read 16 at a time; returns
    a setter of the digit width (the default's 4 bits take 8 digit launches, 8 bits take 4)."""
    monkeypatch.setattr(selection_triton, "MAX_ROW", 16)
    monkeypatch.setattr(selection_triton, "LONG_TILE", 16)
    monkeypatch.setattr(selection_triton, "LONG_CHUNK", 16)
    return lambda bits: monkeypatch.setattr(selection_triton, "LONG_DIGIT_BITS", bits)


def _exact_masses(generator: torch.Generator, shape, kind: str) -> torch.Tensor:
    """Masses whose every sum is exact in float32 (a binary grid), with many ties."""
    if kind == "ties":  # quarters: most entries tie
        return (torch.rand(shape, generator=generator) * 4).floor() / 4
    if kind == "zeros":  # eighths, a third of them 0, one row all 0
        x = (torch.rand(shape, generator=generator) * 8).floor() / 8
        x[..., ::3] = 0
        x.view(-1, shape[-1])[0] = 0
        return x
    # "wide": m * 2**e over 15 binades (2**-8 to 448): keys spread over the high digits too
    mantissa = torch.randint(1, 8, shape, generator=generator).float()
    return mantissa * torch.exp2(torch.randint(-8, 7, shape, generator=generator).float())


LONG_BUDGETS = [
    (0.9, Budget()),
    (0.5, Budget(minimum=9)),
    (0.95, Budget(minimum=2, maximum=20)),
    (1.0, Budget()),
]


@pytest.mark.parametrize(
    ("kind", "shape", "bits", "extra"),
    [
        ("ties", (2, 53), 4, (0.0, Budget(minimum=0))),
        ("zeros", (2, 2, 33), 8, (0.3, Budget(minimum=1, maximum=1))),
        ("wide", (3, 37), 5, (0.7, Budget(minimum=30))),
    ],
    ids=["ties-4bit", "zeros-8bit", "wide-5bit"],
)
def test_long_row_mass_kernel_matches_reference_exactly(kind, shape, bits, extra, long_rows):
    """Rows past MAX_ROW, in several chunks: bit for bit the reference where sums are exact.

    Ties are broken by index across chunks; all-zero rows keep the budget's minimum; 5-bit
    digits leave a 2-bit first digit.
    """
    long_rows(bits)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    scores = _exact_masses(torch.Generator().manual_seed(seed), shape, kind)
    for threshold, budget in [*LONG_BUDGETS, extra]:
        expected = cumulative_mass_mask_reference(scores, threshold, budget)
        got = selection_triton.cumulative_mass_mask_triton(
            scores, threshold, minimum=budget.minimum, maximum=budget.maximum
        )
        assert got.shape == scores.shape and got.dtype == torch.bool
        assert _written(got), "an entry was not written"
        assert torch.equal(got, expected), f"seed {seed}, threshold {threshold}, {budget}"


def test_long_row_mass_kernel_follows_the_rule_on_random_masses(long_rows):
    """Random float masses: the reference up to rounding at the target (as the short-row kernel)."""
    long_rows(8)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    scores = torch.rand(2, 77, generator=torch.Generator().manual_seed(seed)) ** 4
    for threshold, budget in [(0.9, Budget()), (0.5, Budget(minimum=3, maximum=40)), (1.0, Budget())]:
        context = f"seed {seed}, threshold {threshold}, {budget}"
        got = selection_triton.cumulative_mass_mask_triton(
            scores, threshold, minimum=budget.minimum, maximum=budget.maximum
        )
        assert _written(got), "an entry was not written"
        _check_mass_rule(scores, got, threshold, budget, context)
        if threshold < 1.0:
            assert (got != cumulative_mass_mask_reference(scores, threshold, budget)).sum(-1).max() <= 1, context


def test_long_row_chunks_of_several_tiles_when_a_row_hits_the_chunk_cap(long_rows, monkeypatch):
    """A row longer than LONG_MAX_CHUNKS x LONG_CHUNK takes longer chunks (several tiles each)."""
    long_rows(4)
    monkeypatch.setattr(selection_triton, "LONG_MAX_CHUNKS", 3)  # 77 entries: 3 chunks of 32
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    scores = _exact_masses(torch.Generator().manual_seed(seed), (2, 77), "ties")
    for threshold, budget in LONG_BUDGETS:
        got = selection_triton.cumulative_mass_mask_triton(
            scores, threshold, minimum=budget.minimum, maximum=budget.maximum
        )
        assert _written(got), "an entry was not written"
        assert torch.equal(got, cumulative_mass_mask_reference(scores, threshold, budget)), f"seed {seed}"


def test_long_row_rank_kernel_matches_reference(long_rows):
    long_rows(4)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    generator = torch.Generator().manual_seed(seed)
    ranking = torch.randn(3, 37, generator=generator).round()  # ties
    ranking[0, ::2] = float("-inf")
    ranking[1] = torch.where(ranking[1] > 0, torch.zeros(37), -torch.zeros(37))  # -0.0 ties with +0.0
    keep = torch.tensor([20, 30, 38])  # past the -inf, into the zeros, more than the row
    got = selection_triton.topk_by_rank_mask_triton(ranking, keep)
    assert _written(got), "an entry was not written"
    assert torch.equal(got, topk_by_rank_mask_reference(ranking, keep)), f"seed {seed}"


def test_rows_past_max_row_take_the_radix_select(monkeypatch, poisoned_selection):
    monkeypatch.setattr(selection_triton, "MAX_ROW", 16)

    def fail(*args, **kwargs):
        raise AssertionError("rows of at most MAX_ROW entries keep the one-program kernel")

    monkeypatch.setattr(selection_triton, "_launch_long", fail)
    scores = torch.rand(2, 16)
    assert torch.equal(
        selection_triton.cumulative_mass_mask_triton(scores, 0.9), cumulative_mass_mask_reference(scores, 0.9)
    )
    with pytest.raises(AssertionError, match="one-program kernel"):
        selection_triton.cumulative_mass_mask_triton(torch.rand(2, 17), 0.9)
    assert selection_triton.unsupported_reason(torch.rand(2, 17)) is None


def test_radix_digits_cover_the_key_from_the_top():
    for bits in (3, 4, 5, 8):
        digits = selection_triton._radix_digits(bits)
        assert digits[0][0] + digits[0][1].bit_length() == 32 and digits[-1][0] == 0
        covered = 0
        for shift, digit_mask, high_mask in digits:
            assert high_mask & 0xFFFFFFFF == covered and digit_mask < 2**bits
            covered |= digit_mask << shift
        assert covered == 0xFFFFFFFF


_SM90_RADIX_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from triton_sm90_compile import compile_for_sm90
from sparse_attn.ops.selection import triton as selection
pointers = {"Scores": "*fp32", "KeepCount": "*i32", "MassIn": "*fp32", "CountIn": "*i32", "StateIn": "*i32",
            "StateMassIn": "*fp32", "MassOut": "*fp32", "CountOut": "*i32", "StateOut": "*i32",
            "StateMassOut": "*fp32", "Out": "*u8", "threshold": "fp32"}
results = {}
for mass, first, root, final in [(True, True, False, False), (True, False, True, False), (True, False, False, False),
                                 (True, False, False, True), (False, False, True, False), (False, False, False, True)]:
    constexprs = dict(MASS=mass, FIRST=first, ROOT=root, FINAL=final, BINS=16, CHUNKS=selection.LONG_MAX_CHUNKS, TILE=selection.LONG_TILE)
    returncode, report, _ = compile_for_sm90(selection._radix_round, pointers, constexprs, selection.LONG_WARPS)
    results[f"mass={mass} first={first} root={root} final={final}"] = [returncode, report]
print(json.dumps(results))
"""


def test_radix_select_kernel_compiles_for_sm90():
    """The long-row kernel, in each of its launches' variants, compiles for sm_90a (the interpreter
    never compiles it); run in a child process without the interpreter."""
    results = source_in_child(_SM90_RADIX_COMPILE, os.path.dirname(os.path.abspath(__file__)))
    assert len(results) == 6
    for name, (returncode, report) in results.items():
        assert returncode == 0, (name, report)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("rows", "n"), [(64, 131_072), (4, 1_048_576)])
def test_gpu_long_row_selection_matches_reference(rows, n):
    """Real long rows (FlexPrefill's line masses at 128K tokens, a head's block table at 128K) through the
    dispatch, against the sort-based reference on the same GPU."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    generator = torch.Generator(device="cuda").manual_seed(seed)
    probabilities = torch.softmax(torch.randn(rows, n, device="cuda", generator=generator) * 3, -1)
    quarters = (torch.rand(rows, n, device="cuda", generator=generator) * 4).floor() / 4
    for threshold, budget in [(0.9, Budget()), (0.95, Budget(minimum=1024)), (0.5, Budget(minimum=3, maximum=5000))]:
        context = f"seed {seed}, threshold {threshold}, {budget}"
        expected = cumulative_mass_mask_reference(probabilities, threshold, budget)
        got = cumulative_mass_mask(probabilities, threshold, budget)  # dispatches to the radix select
        # Sums are reduced in another order: a row whose running mass lands within rounding of
        # the target may keep an entry more or fewer; the kept entries are the top ones in order.
        assert (got != expected).sum(-1).max() <= 2, context
        assert torch.equal(got, topk_by_rank_mask_reference(probabilities, got.sum(-1))), context
        assert torch.equal(
            cumulative_mass_mask(quarters, threshold, budget),
            cumulative_mass_mask_reference(quarters, threshold, budget),
        ), context
    assert torch.equal(cumulative_mass_mask(quarters, 1.0), cumulative_mass_mask_reference(quarters, 1.0)), (
        f"seed {seed}"
    )
    ranking = torch.randn(rows, n, device="cuda", generator=generator).round()
    keep = torch.randint(0, n + 1, (rows,), device="cuda", generator=generator)
    assert torch.equal(topk_by_rank_mask(ranking, keep), topk_by_rank_mask_reference(ranking, keep)), f"seed {seed}"
