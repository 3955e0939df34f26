"""The compensation family (issue 19): CompensatedPattern, its reference and Triton kernel, and psa / sla.

* The reference (:mod:`sparse_attn.backends.compensated_reference`) against a dense float64
  formula written from the definitions (softmax over the exact keys of level-0 blocks and the
  pooled keys of level-l blocks, each pooled score + ln(number of keys it averages); plus
  ``Proj`` of the linear attention ``phi(q) phi(K)^T V / phi(q) phi(K)^T 1`` over the linear
  blocks): outputs and LSE, causal and not, ``Sq < Sk``, GQA 2, pattern heads per query / KV
  head / shared, gradients in q, k, v and the projection.
* The kernel (:mod:`sparse_attn.backends.triton_compensated`, ``TRITON_INTERPRET=1`` on CPU)
  against the reference, outputs NaN-poisoned: odd lengths, GQA 1/2/4 (heads 3, 6, 4), head_dim
  64 and 128, batch 2, float32 and bfloat16, pooled levels 1-4 (tiles padded to 16), linear rows
  that add states and rows that subtract them from the total, the three feature maps.
* Limits: every block at level 0 / every block critical is dense attention; a block of equal
  keys and values gives the same output pooled at any level as exact (the ln bias); a zero
  projection is the attention of the exact blocks.
* psa / sla: level assignment and classification counts, text blocks, layout round trip,
  routing and its warnings, SparseLinearAttention (zero start, a training step), bad input.

GPU tests (``-m gpu``): the kernel against the reference on whole query blocks of Wan-sized
(21 x 45 x 80) and 2048^2-image (16K) problems in bfloat16.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import TOLERANCE, random_qkv, relative_error

import sparse_attn as sa
from sparse_attn.backends import compensated_reference, triton_compensated
from sparse_attn.compensated_pattern import EXACT, LINEAR, SKIP, CompensatedPattern, resolve_compensated_backend
from sparse_attn.methods.psa import assign_levels
from sparse_attn.methods.sla import SparseLinearAttention, classify_blocks

# ----------------------------------------------------------------------------------------------
# The dense float64 formula and random level maps


def naive_compensated(q, k, v, pattern, *, causal, scale=None):
    """Float64 ``(out, lse)`` of the compensated attention, densely over every key (tiny sizes)."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    group = q_heads // kv_heads
    levels = pattern.to_levels().long().repeat_interleave(q_heads // pattern.num_heads, 1).expand(batch, -1, -1, -1)
    rows, cols = torch.arange(seq_q), torch.arange(seq_k)
    token_levels = levels[:, :, rows // pattern.block_q][:, :, :, cols // pattern.block_k]  # (B, H, Sq, Sk)
    qd = q.double()
    kd, vd = (x.double().repeat_interleave(group, 1) for x in (k, v))
    exact = (qd @ kd.transpose(-1, -2)) * scale
    hidden = token_levels != EXACT
    if causal:
        hidden = hidden | (cols[None, :] > rows[:, None] + seq_k - seq_q)
    scores, values = [exact.masked_fill(hidden, -math.inf)], [vd]
    for level in range(1, 5):
        size = 1 << level
        groups = -(-seq_k // size)
        pooled_k = torch.stack([kd[:, :, g * size : (g + 1) * size].mean(2) for g in range(groups)], 2)
        pooled_v = torch.stack([vd[:, :, g * size : (g + 1) * size].mean(2) for g in range(groups)], 2)
        counts = torch.tensor([min(size, seq_k - g * size) for g in range(groups)], dtype=torch.float64)
        group_levels = levels[:, :, rows // pattern.block_q][:, :, :, (torch.arange(groups) * size) // pattern.block_k]
        pooled_scores = (qd @ pooled_k.transpose(-1, -2)) * scale + counts.log()
        scores.append(pooled_scores.masked_fill(group_levels != level, -math.inf))
        values.append(pooled_v)
    scores = torch.cat(scores, -1)
    out = torch.softmax(scores, -1) @ torch.cat(values, 2)
    lse = torch.logsumexp(scores, -1)
    if pattern.projection is not None:
        phi = {"softmax": lambda x: x.softmax(-1), "elu": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu}
        feature = phi[pattern.feature_map]
        weights = (feature(qd) @ feature(kd).transpose(-1, -2)) * (token_levels == LINEAR)
        total = weights.sum(-1, keepdim=True)
        linear = torch.where(total > 0, (weights @ vd) / torch.where(total > 0, total, 1.0), 0.0)
        weight, bias = pattern.projection
        out = out + linear @ weight.double().t() + (0.0 if bias is None else bias.double())
    return out, lse


def random_levels(batch, heads, seq_q, seq_k, block_q, block_k, *, kinds, seed, causal=False):
    """Int8 level map: ``kinds`` draws per block (``EXACT``, pooling levels, ``LINEAR``, ``SKIP``), the
    first block of every row exact; in causal mode blocks are exact where they reach past the
    query block's first position (the diagonal kept, later blocks skipped)."""
    generator = torch.Generator().manual_seed(seed)
    n_q, n_kv = -(-seq_q // block_q), -(-seq_k // block_k)
    choice = torch.randint(0, len(kinds), (batch, heads, n_q, n_kv), generator=generator)
    levels = torch.tensor(kinds, dtype=torch.int8)[choice]
    if causal:
        first = seq_k - seq_q + torch.arange(n_q) * block_q
        last_key = torch.clamp((torch.arange(n_kv) + 1) * block_k, max=seq_k) - 1
        start = torch.arange(n_kv) * block_k
        straddles = last_key[None, :] >= first[:, None]
        visible = start[None, :] <= (first + block_q - 1).clamp(max=seq_k - 1)[:, None]
        levels = torch.where(straddles, torch.where(visible, EXACT, SKIP), levels).to(torch.int8)
    levels[..., 0] = EXACT
    return levels


def make_pattern(levels, block_q, block_k, seq_q, seq_k, *, dim, linear=False, feature_map="softmax", causal=False,
                 seed=0):  # fmt: skip
    projection = None
    if linear:
        generator = torch.Generator().manual_seed(seed + 1)
        projection = (0.3 * torch.randn(dim, dim, generator=generator), torch.randn(dim, generator=generator))
    return CompensatedPattern.from_levels(
        levels, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal,
        feature_map=feature_map, projection=projection,
    )  # fmt: skip


POOLED = (EXACT, 1, 2, 3, SKIP)
SLA_KINDS = (EXACT, LINEAR, LINEAR, LINEAR, SKIP)
MIXED = (EXACT, 1, 2, LINEAR, LINEAR, SKIP)

# ----------------------------------------------------------------------------------------------
# Reference vs the float64 formula

REFERENCE_CASES = [
    # (kinds, causal, seq_q, seq_k, (Hq, Hkv), pattern heads "q" | "kv" | 1, pattern batch)
    (POOLED, False, 77, 77, (4, 2), "q", 2),
    (MIXED, False, 61, 93, (4, 2), "kv", 1),
    (SLA_KINDS, True, 70, 101, (2, 1), 1, 2),
    (POOLED, True, 90, 90, (3, 3), "q", 1),
]


@pytest.mark.parametrize(
    ("kinds", "causal", "seq_q", "seq_k", "head_counts", "heads", "pattern_batch"), REFERENCE_CASES
)
def test_reference_matches_the_dense_formula(kinds, causal, seq_q, seq_k, head_counts, heads, pattern_batch):
    (q_heads, kv_heads), batch, dim, block = head_counts, 2, 16, 16
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seq_q)
    pattern_heads = {"q": q_heads, "kv": kv_heads, 1: 1}[heads]
    levels = random_levels(pattern_batch, pattern_heads, seq_q, seq_k, block, block, kinds=kinds, seed=seq_k,
                           causal=causal)  # fmt: skip
    pattern = make_pattern(levels, block, block, seq_q, seq_k, dim=dim, linear=LINEAR in kinds, causal=causal)
    out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=True)
    want, want_lse = naive_compensated(q, k, v, pattern, causal=causal)
    assert relative_error(out, want) < 1e-5
    assert torch.allclose(lse.double(), want_lse, atol=1e-4)


def test_reference_gradients_match_the_dense_formula():
    batch, q_heads, kv_heads, seq, dim, block = 2, 4, 2, 45, 16, 8
    q, k, v = (x.requires_grad_() for x in random_qkv(batch, q_heads, kv_heads, seq, seq, dim, seed=5))
    levels = random_levels(1, kv_heads, seq, seq, block, block, kinds=MIXED, seed=6)
    pattern = make_pattern(levels, block, block, seq, seq, dim=dim, linear=True)
    weight = pattern.projection[0].requires_grad_()
    target = torch.randn(batch, q_heads, seq, dim)
    (sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference") * target).sum().backward()
    got = [x.grad.clone() for x in (q, k, v, weight)]
    for x in (q, k, v, weight):
        x.grad = None
    (naive_compensated(q, k, v, pattern, causal=False)[0] * target.double()).sum().backward()
    for value, expected in zip(got, (q.grad, k.grad, v.grad, weight.grad), strict=True):
        assert relative_error(value, expected) < 1e-5


# ----------------------------------------------------------------------------------------------
# The kernel vs the reference (TRITON_INTERPRET=1 on CPU)

KERNEL_CASES = [
    # (dtype, kinds, causal, seq_q, seq_k, (Hq, Hkv), dim, block_q, block_k, feature map)
    (torch.float32, POOLED, False, 157, 157, (6, 3), 64, 32, 32, "softmax"),
    (torch.bfloat16, MIXED, False, 131, 131, (4, 1), 64, 32, 32, "elu"),
    (torch.float32, SLA_KINDS, True, 83, 149, (4, 2), 64, 16, 32, "softmax"),
    (torch.float32, (EXACT, 4, LINEAR, SKIP), False, 99, 99, (3, 3), 128, 16, 16, "relu"),
]


@pytest.mark.parametrize(
    ("dtype", "kinds", "causal", "seq_q", "seq_k", "head_counts", "dim", "block_q", "block_k", "feature_map"),
    KERNEL_CASES,
)
def test_kernel_matches_the_reference(dtype, kinds, causal, seq_q, seq_k, head_counts, dim, block_q, block_k,
                                      feature_map, poison_outputs):  # fmt: skip
    (q_heads, kv_heads), batch = head_counts, 2
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype, seed=seq_q)
    levels = random_levels(batch, q_heads, seq_q, seq_k, block_q, block_k, kinds=kinds, seed=seq_k, causal=causal)
    linear = LINEAR in kinds
    pattern = make_pattern(levels, block_q, block_k, seq_q, seq_k, dim=dim, linear=linear, feature_map=feature_map,
                           causal=causal)  # fmt: skip
    if linear:  # both walks of the linear branch are exercised
        subtract = triton_compensated.compensated_plan(pattern).linear_subtract
        assert bool((subtract == 1).any()) and bool((subtract == 0).any())
    scale = dim**-0.5
    out, lse, lin = triton_compensated.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=True)
    want, want_lse, want_lin = compensated_reference.forward(q, k, v, pattern, causal=causal, scale=scale,
                                                             return_lse=True)  # fmt: skip
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, want) < TOLERANCE[dtype]
    assert torch.allclose(lse, want_lse, atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    if linear:
        assert torch.isfinite(lin).all() and relative_error(lin, want_lin) < TOLERANCE[dtype]  # 16-bit states
    # Through the API (projection applied after the kernel).
    got = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="triton")
    expected = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference")
    assert relative_error(got, expected) < TOLERANCE[dtype]


# ----------------------------------------------------------------------------------------------
# Limits


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_block_exact_or_critical_is_dense_attention(backend):
    batch, q_heads, kv_heads, seq, dim, block = 2, 4, 2, 75, 64, 16
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq, seq, dim, seed=1)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    n = -(-seq // block)
    levels = torch.zeros((1, 1, n, n), dtype=torch.int8)
    pattern = make_pattern(levels, block, block, seq, seq, dim=dim, linear=True)  # linear branch present, empty
    out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend=backend)
    weight, bias = pattern.projection
    assert relative_error(out, dense + bias) < 1e-5  # Proj(0) = bias, the paper's O_s + Proj(O_l)
    # The methods' limits: psa with every block at level 0, sla with every block critical.
    grid = (3, 5, 5)
    for method, options in (
        ("psa", {"min_full_fraction": 1.0}),
        ("sla", {"critical": 1.0, "negligible": 0.0, "projection": "identity"}),
    ):
        out = sa.sparse_attention(q, k, v, method, causal=False, backend=backend, grid=grid, block_q=16, block_k=16,
                                  **options)  # fmt: skip
        assert relative_error(out, dense) < 1e-5, method


def test_a_block_of_equal_keys_pooled_at_any_level_equals_it_exact():
    batch, heads, seq, dim, block = 1, 2, 64, 16, 16
    q, k, v = random_qkv(batch, heads, heads, seq, seq, dim, seed=2)
    k[:, :, 16:32] = k[:, :, 16:17]  # block 1: one key and one value repeated
    v[:, :, 16:32] = v[:, :, 16:17]
    base = torch.full((1, 1, 4, 4), SKIP, dtype=torch.int8)
    base[..., 0] = EXACT
    outs = []
    for level in (EXACT, 1, 2, 3, 4):
        levels = base.clone()
        levels[..., 1] = level
        pattern = make_pattern(levels, block, block, seq, seq, dim=dim)
        outs.append(sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference"))
    for out in outs[1:]:
        assert relative_error(out, outs[0]) < 1e-6
    # Block 1 carries weight (skipping it changes the output), so the equalities above are not vacuous.
    assert relative_error(outs[0], sa.block_sparse_attention(q, k, v, make_pattern(base, 16, 16, seq, seq, dim=dim),
                                                             causal=False, backend="reference")) > 1e-2  # fmt: skip


def test_zero_projection_is_the_attention_of_the_exact_blocks():
    q, k, v = random_qkv(2, 4, 2, 96, 96, 32, seed=3)
    levels = random_levels(1, 4, 96, 96, 16, 16, kinds=SLA_KINDS, seed=4)
    pattern = make_pattern(levels, 16, 16, 96, 96, dim=32)  # projection None: the zero map
    out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference")
    assert torch.equal(out, sa.block_sparse_attention(q, k, v, pattern.exact(), causal=False, backend="reference"))
    assert triton_compensated.compensated_plan(pattern).linear is False  # no linear work at all


# ----------------------------------------------------------------------------------------------
# The methods


def test_psa_levels_follow_the_cumulative_mass():
    importance = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.1, 0.05]])  # ranked: 1, 3, 2, 4, 0, 5
    thresholds = (0.4, 0.55, 0.65, 0.85)
    # Mass before each ranked block: 0, .5, .7, .8, .9, .95 -> levels 0, 1, 3, 3, skipped, skipped.
    assert assign_levels(importance, thresholds, min_full=1).tolist() == [[SKIP, EXACT, 3, 1, 3, SKIP]]
    assert assign_levels(importance, thresholds, min_full=3).tolist() == [[SKIP, EXACT, EXACT, EXACT, 3, SKIP]]


def test_sla_classifies_top_critical_bottom_negligible():
    logits = torch.randn(2, 3, 5, 40)
    levels = classify_blocks(logits, 0.05, 0.10)
    assert ((levels == EXACT).sum(-1) == 2).all() and ((levels == SKIP).sum(-1) == 4).all()
    order = logits.argsort(-1, descending=True)
    assert (levels.gather(-1, order)[..., :2] == EXACT).all() and (levels.gather(-1, order)[..., -4:] == SKIP).all()
    assert ((classify_blocks(torch.randn(1, 4), 0.05, 0.1) == EXACT).sum() == 1).all()  # at least one critical


def test_methods_over_a_layout_with_text_tokens_match_the_formula():
    grid, text = (2, 6, 8), 20
    seq = math.prod(grid) + text
    q, k, v = random_qkv(2, 4, 2, seq, seq, 32, seed=7)
    for method, options in (("psa", {}), ("sla", {"projection": "identity", "tile": (1, 4, 4)})):
        out, info = sa.sparse_attention(q, k, v, method, causal=False, grid=grid, text_tokens=text, block_q=16,
                                        block_k=16, return_info=True, **options)  # fmt: skip
        pattern = info.pattern
        assert isinstance(pattern, CompensatedPattern) and pattern.layout is not None
        assert 0 < info.density < 1 and info.extras["compensated_density"] > 0
        levels = pattern.to_levels()
        assert (levels[..., -2:] == EXACT).all()  # the text blocks (the last 20 tokens), for every query
        permuted = [pattern.layout.permute(x) for x in (q, k, v)]
        want = pattern.layout.unpermute(naive_compensated(*permuted, pattern, causal=False)[0])
        assert relative_error(out, want) < 1e-5, method
        in_order = sa.block_sparse_attention(*permuted, pattern.tile_order(), causal=False)
        assert pattern.token_rule is None and torch.equal(in_order, pattern.layout.permute(out))


def test_routing_and_forward_only_fallback():
    q, k, v = random_qkv(1, 2, 2, 64, 64, 16, seed=8)
    pattern = sa.estimate(q, k, "sla", causal=False, grid=(8, 8), block_q=16, block_k=16)
    assert resolve_compensated_backend("auto", q, k, v, pattern, return_lse=False) == "reference"
    assert resolve_compensated_backend("triton", q, k, v, pattern, return_lse=False) == "triton"
    for backend, expected in (("flex", "reference"), ("gluon", "triton")):
        with pytest.warns(UserWarning, match="no compensation"):
            assert resolve_compensated_backend(backend, q, k, v, pattern, return_lse=False) == expected
    q.requires_grad_()
    with pytest.warns(UserWarning, match="forward-only"):
        assert resolve_compensated_backend("triton", q, k, v, pattern, return_lse=False) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="triton").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_sparse_linear_attention_starts_at_the_critical_blocks_and_trains_its_projection():
    grid = (4, 8, 8)
    q, k, v = random_qkv(1, 2, 2, 256, 256, 32, seed=9)
    module = SparseLinearAttention(32, grid=grid, block_q=32, block_k=32)
    pattern = sa.estimate(q, k, "sla", causal=False, grid=grid, block_q=32, block_k=32)
    start = module(q, k, v)
    assert torch.equal(start, sa.block_sparse_attention(q, k, v, pattern.exact(), causal=False))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    target = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    loss = (module(q, k, v) - target).square().mean()
    loss.backward()
    assert module.proj.weight.grad.abs().sum() > 0
    optimizer.step()
    assert (module(q, k, v) - target).square().mean() < loss


def test_bad_input_raises_clear_errors():
    levels = torch.zeros((1, 1, 2, 2), dtype=torch.int8)
    good = CompensatedPattern.from_levels(levels, block_q=16, block_k=16, seq_q=32, seq_k=32)
    with pytest.raises(TypeError, match="int8"):
        CompensatedPattern.from_levels(levels.long(), block_q=16, block_k=16, seq_q=32, seq_k=32)
    with pytest.raises(TypeError, match="comp_levels must be int8"):
        CompensatedPattern(**{**_fields(good), "comp_levels": good.comp_levels.int()})
    with pytest.raises(ValueError, match="both as exact and as compensated"):
        overlapping = {
            "comp_counts": torch.ones_like(good.comp_counts),
            "comp_levels": torch.ones_like(good.comp_levels),
        }
        CompensatedPattern(**{**_fields(good), **overlapping}).validate(causal=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        CompensatedPattern.from_levels(torch.tensor([[0, 4]], dtype=torch.int8), block_q=8, block_k=8, seq_q=8,
                                       seq_k=16)  # fmt: skip
    with pytest.raises(ValueError, match="causal mode a compensated block"):
        CompensatedPattern.from_levels(torch.tensor([[0, 1], [0, 0]], dtype=torch.int8), block_q=16, block_k=16,
                                       seq_q=32, seq_k=32, causal=True)  # fmt: skip
    with pytest.raises(ValueError, match="square"):
        CompensatedPattern.from_levels(
            levels, block_q=16, block_k=16, seq_q=32, seq_k=32, projection=(torch.ones(3, 2), None)
        )
    q, k, v = random_qkv(1, 2, 2, 64, 64, 16, seed=10)
    with pytest.raises(ValueError, match="bidirectional"):
        sa.sparse_attention(q, k, v, "psa", causal=True, grid=(8, 8))
    with pytest.raises(ValueError, match="layout"):
        sa.sparse_attention(q, k, v, "sla", causal=False, grid=(8, 9))
    with pytest.raises(ValueError, match="block_k=12 must be a multiple of 8"):
        sa.sparse_attention(q, k, v, "psa", causal=False, grid=(8, 8), block_k=12)
    with pytest.raises(ValueError, match="non-decreasing"):
        sa.sparse_attention(q, k, v, "psa", causal=False, grid=(8, 8), thresholds=(0.5, 0.4))
    with pytest.raises(ValueError, match="critical \\+ negligible"):
        sa.sparse_attention(q, k, v, "sla", causal=False, grid=(8, 8), critical=0.6, negligible=0.5)
    with pytest.raises(ValueError, match="critical"):
        sa.sparse_attention(q, k, v, "sla", causal=False, grid=(8, 8), critical=0.0)
    with pytest.raises(ValueError, match="head_dim"):
        sa.sparse_attention(q, k, v, "sla", causal=False, grid=(8, 8), projection=(torch.eye(8), None))
    with pytest.raises(ValueError, match="projection must be one of"):
        sa.sparse_attention(q, k, v, "sla", causal=False, grid=(8, 8), projection="learned")


def _fields(pattern: CompensatedPattern) -> dict:
    names = ("kv_counts", "kv_indices", "block_q", "block_k", "seq_q", "seq_k", "comp_counts", "comp_indices")
    return {name: getattr(pattern, name) for name in names} | {"comp_levels": pattern.comp_levels}


# ----------------------------------------------------------------------------------------------
# GPU: real sizes, the kernel against the reference on whole query blocks


def _query_blocks(pattern: CompensatedPattern, blocks: torch.Tensor, rows: int) -> CompensatedPattern:
    """The non-causal pattern of ``blocks`` (a few ascending query blocks, ``rows`` query rows) only:
    non-causal attention of a query block does not depend on where it sits, so this is the
    reference's problem for those rows."""
    names = ("kv_counts", "kv_indices", "comp_counts", "comp_indices", "comp_levels")
    lists = {name: getattr(pattern, name)[:, :, blocks] for name in names}
    return CompensatedPattern(
        **lists, block_q=pattern.block_q, block_k=pattern.block_k, seq_q=rows,
        seq_k=pattern.seq_k, feature_map=pattern.feature_map, projection=pattern.projection,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "grid", "heads", "options", "blocks"),
    [
        ("psa", (21, 45, 80), (8, 8), {}, (128, 128)),  # Wan 2.1 720p latent, 75,600 tokens
        ("sla", (21, 45, 80), (8, 8), {"projection": "identity"}, (64, 64)),
        ("psa", (128, 128), (24, 24), {}, (128, 128)),  # a 2048x2048 image, 16,384 tokens
        ("sla", (128, 128), (24, 12), {"projection": "identity", "feature_map": "elu"}, (128, 64)),
    ],
)
def test_gpu_kernel_matches_the_reference_at_real_sizes(method, grid, heads, options, blocks, poison_outputs):
    (q_heads, kv_heads), (block_q, block_k), dim = heads, blocks, 128
    seq = math.prod(grid)
    q, k, v = random_qkv(1, q_heads, kv_heads, seq, seq, dim, dtype=torch.bfloat16, device="cuda", seed=11)
    pattern = sa.estimate(q, k, method, causal=False, grid=grid, block_q=block_q, block_k=block_k, **options)
    out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="triton")
    assert torch.isfinite(out).all()
    permuted = [pattern.layout.permute(x) for x in (q, k, v)]
    got = pattern.layout.permute(out)
    chosen = torch.unique(torch.randint(0, pattern.num_q_blocks, (12,), generator=torch.Generator().manual_seed(0)))
    chosen = torch.cat([chosen, torch.tensor([0, pattern.num_q_blocks - 1])]).unique().cuda()
    rows = (chosen[:, None] * block_q + torch.arange(block_q, device="cuda")).flatten()
    rows = rows[rows < seq]
    part = _query_blocks(pattern, chosen, len(rows))
    with torch.no_grad():
        want = sa.block_sparse_attention(permuted[0][:, :, rows], *permuted[1:], part, causal=False,
                                         backend="reference")  # fmt: skip
    assert relative_error(got[:, :, rows], want) < TOLERANCE[torch.bfloat16]


def test_psa_levels_are_those_of_the_sampled_softmax_maxima():
    """psa's importance through the pooled-attention-map operator equals the paper's rule written
    out: each sampled query's softmax over all sampled keys, max per block pair (float64)."""
    from sparse_attn.layouts import Layout
    from sparse_attn.methods.psa import text_key_blocks

    grid, text, block, stride = (4, 9, 10), 6, 32, 4
    layout = Layout(grid, tile=(2, 4, 4), text_tokens=text)
    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, h, layout.seq_len, 16, generator=generator) for h in (4, 2))
    pattern = sa.estimate(q, k, "psa", causal=False, grid=grid, tile=(2, 4, 4), text_tokens=text,
                          block_q=block, block_k=block)  # fmt: skip
    sq, sk = (layout.permute(x)[:, :, ::stride].double() for x in (q, k))
    probabilities = torch.softmax(sq @ sk.repeat_interleave(2, dim=1).transpose(-1, -2) * 16**-0.5, dim=-1)
    n = -(-layout.seq_len // block)
    padded = torch.nn.functional.pad(
        probabilities, (0, n * block // stride - sq.shape[2], 0, n * block // stride - sq.shape[2])
    )
    importance = padded.view(2, 4, n, block // stride, n, block // stride).amax(dim=(3, 5))
    min_full = min(n, int(0.06 * n) + 1)
    want = assign_levels(importance.float(), (0.4, 0.5, 0.6, 0.8), min_full).masked_fill(
        text_key_blocks(layout, block, "cpu"), EXACT
    )
    assert torch.equal(pattern.to_levels(), want)
