"""The warp-specialized Gluon dK/dV pass (:mod:`sparse_attn.backends.gluon_backward`).

On CPU: both kernels (dK/dV and dQ) compile for sm_90a (in a child process, as the forward's
test does), the option is checked, and they decline the cases outside their scope. On the GPU
(``-m gpu``): with ``kernel_configs(gluon_backward="dkdv" | "dq" | True)`` the gradients of the
Triton and Gluon backends match the reference backend's (batch 2, GQA 1-8, Sq < Sk, head_dim
64 and 128, 64- and 128-row query blocks, 256-key blocks, lengths that fill whole blocks or
not, patterns per query head, per KV head and shared; box-predicate token rules, causal and
not), from NaN-poisoned gradient buffers, and the asked passes were launched; outside their
scope the Triton passes run and say so.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, compile_in_child, random_qkv, relative_error, shape_pattern

import sparse_attn as sa
from sparse_attn.backends import gluon_backward
from sparse_attn.backends.configs import kernel_configs
from sparse_attn.plan import plan_for

needs_gluon = pytest.mark.skipif(gluon_backward.gluon is None, reason="this Triton has no Gluon")


def _compile_for_sm90(**variant):
    return compile_in_child(Path(__file__).with_name("gluon_backward_sm90_compile.py"), variant)


@needs_gluon
@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(dtype="fp16", HEAD_DIM=64, CAUSAL=False),
        dict(BLOCK_Q=64, BLOCK_K=256),
        dict(BLOCK_Q=256),
        dict(KERNEL="dq"),
        dict(KERNEL="dq", dtype="fp16", HEAD_DIM=64, CAUSAL=False),
        dict(KERNEL="dq", BLOCK_Q=256, BLOCK_K=256),
        dict(BOX=True),
        dict(BOX=True, CAUSAL=False, HEAD_DIM=64),
        dict(KERNEL="dq", BOX=True),
        dict(KERNEL="dq", BOX=True, CAUSAL=False, dtype="fp16"),
        dict(EVEN_Q=False, EVEN_K=False),
        dict(BOX=True, EVEN_Q=False, EVEN_K=False, CAUSAL=False),
        dict(KERNEL="dq", EVEN_Q=False, EVEN_K=False),
        dict(KERNEL="dq", BOX=True, EVEN_Q=False, EVEN_K=False, CAUSAL=False, HEAD_DIM=64),
        # Wide steps: 128 query rows a dK/dV step (head_dim 64), 128 keys a dQ step.
        dict(HEAD_DIM=64, STEP_M=128),
        dict(HEAD_DIM=64, STEP_M=128, BLOCK_Q=256, EVEN_Q=False, EVEN_K=False, CAUSAL=False, dtype="fp16"),
        dict(KERNEL="dq", STEP_N=128),
        dict(KERNEL="dq", STEP_N=128, BLOCK_K=256, EVEN_Q=False, EVEN_K=False),
        dict(KERNEL="dq", STEP_N=128, HEAD_DIM=64, BOX=True, CAUSAL=False, dtype="fp16"),
    ],
    ids=str,
)
def test_gluon_backward_kernels_compile_for_sm90(variant):
    compiled = _compile_for_sm90(**variant)
    ptx = compiled["ptx"]
    # Scores (64 x step tiles) and the gradient products (64 rows x head_dim) on the tensor cores.
    step = variant.get("STEP_N" if variant.get("KERNEL") == "dq" else "STEP_M", 64)
    assert f"wgmma.mma_async.sync.aligned.m64n{step}k16.f32" in ptx
    assert f"wgmma.mma_async.sync.aligned.m64n{variant.get('HEAD_DIM', 128)}k16.f32" in ptx
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA loads of K, V, Q and dO
    assert compiled["shared"] <= 227 * 1024
    if step == 128:  # the wide steps run only where they spill little (gluon_backward.WIDE_STAGES)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", compiled["report"])]
        assert spills and max(spills) <= SPILL_LIMIT[variant.get("KERNEL", "dkdv")], compiled["report"]


# Spill stores a consumer thread of the wide-step kernels may have (bytes). Measured on sm_90a:
# dK/dV 40 (causal, whole blocks) to 348 (ragged; about 1 KB with a box predicate, which keeps
# 64-row steps); dQ 0 to 40.
SPILL_LIMIT = {"dkdv": 512, "dq": 64}


def test_wide_steps_apply_where_they_fit_and_when_asked():
    assert not gluon_backward.WIDE_STEPS_BY_DEFAULT
    step_rows = gluon_backward.step_rows
    assert step_rows("dkdv", 64, 128, False) == step_rows("dq", 128, 128, False) == 64
    with kernel_configs(gluon_backward_wide_steps=True):
        assert step_rows("dkdv", 64, 128, False) == step_rows("dkdv", 64, 256, False) == 128
        assert step_rows("dkdv", 64, 64, False) == 64  # a step within the query block
        assert step_rows("dkdv", 128, 128, False) == 64  # it would spill KBs at head_dim 128
        assert step_rows("dkdv", 64, 128, True) == 64  # and about 1 KB with a box predicate
        assert step_rows("dq", 128, 128, False) == step_rows("dq", 64, 64, True) == 128
    with kernel_configs(gluon_backward_wide_steps=False):
        assert step_rows("dkdv", 64, 128, False) == step_rows("dq", 64, 128, False) == 64
    with pytest.raises(TypeError, match="gluon_backward_wide_steps"):
        with kernel_configs(gluon_backward_wide_steps="yes"):
            pass


def test_gluon_backward_option_is_checked():
    with pytest.raises(TypeError, match="gluon_backward"):
        with kernel_configs(gluon_backward="yes"):
            pass
    with pytest.raises(TypeError, match="gluon_backward"):
        with kernel_configs(gluon_backward="dv"):
            pass

    def wanted(kind, head_dim=128, by_default=True):
        return gluon_backward.wanted(kind, head_dim=head_dim, by_default=by_default)

    # By default: after the Gluon forward, at the head dims where the passes were measured faster.
    assert wanted("dkdv") == wanted("dq") == "default"
    assert wanted("dkdv", head_dim=64) is None and wanted("dq", by_default=False) is None
    with kernel_configs(gluon_backward=True):
        assert wanted("dkdv", head_dim=64, by_default=False) == wanted("dq") == "asked"
    with kernel_configs(gluon_backward="dq"):
        assert wanted("dq", by_default=False) == "asked" and wanted("dkdv") is None
    with kernel_configs(gluon_backward=False):
        assert wanted("dkdv") is None and wanted("dq") is None


def _case(q_heads=4, kv_heads=2, seq_q=256, seq_k=256, dim=128, block_q=128, block_k=128, dtype=torch.bfloat16):
    shape = (1, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k)
    q, k, v = random_qkv(*shape[:6], dtype=dtype, seed=0)
    pattern = shape_pattern(shape, heads=kv_heads, density=0.5, causal=True, seed=0)
    return q, k, v, pattern


def test_gluon_backward_declines_what_it_cannot_run():
    q, k, v, pattern = _case()
    plan = plan_for(pattern, causal=True)
    # On this machine (CPU, or the interpreter) neither pass runs.
    for kind in ("dkdv", "dq"):
        assert gluon_backward.cannot_run_reason(q, k, v, q, plan, has_rule=False, kind=kind) is not None


def _record_launches(monkeypatch) -> list[str]:
    """A list that each Gluon pass launched from now on appends its name to."""
    launches = []
    for kind in ("dkdv", "dq"):
        launch = getattr(gluon_backward, kind)
        monkeypatch.setattr(
            gluon_backward, kind, lambda *args, kind=kind, launch=launch, **kwargs: launches.append(kind) or launch(*args, **kwargs)
        )  # fmt: skip
    return launches


def _case_shape(case: dict, dim: int | None = None) -> tuple[tuple, torch.dtype]:
    """A GPU case's ``(batch 2, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k)`` shape
    (blocks 128 and bf16 unless the case says; ``dim`` where the test fixes it) and dtype."""
    options = {"block_q": 128, "block_k": 128, "dtype": torch.bfloat16, **case}
    dim = options["dim"] if dim is None else dim
    shape = (2, options["q_heads"], options["kv_heads"], options["seq_q"], options["seq_k"], dim,
             options["block_q"], options["block_k"])  # fmt: skip
    return shape, options["dtype"]


def _reference_gradients(q, k, v, dout, pattern, causal: bool) -> list[torch.Tensor]:
    """The reference backend's float32 gradients for q, k and v."""
    leaves = [x.float().detach().requires_grad_() for x in (q, k, v)]
    sa.block_sparse_attention(*leaves, pattern, causal=causal, backend="reference").backward(dout.float())
    return [x.grad for x in leaves]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        dict(q_heads=8, kv_heads=2, seq_q=1024, seq_k=1024, dim=128),
        dict(q_heads=6, kv_heads=3, seq_q=512, seq_k=1024, dim=64, dtype=torch.float16),
        dict(q_heads=4, kv_heads=4, seq_q=768, seq_k=768, dim=128, block_q=64),
        dict(q_heads=8, kv_heads=1, seq_q=512, seq_k=768, dim=128, block_k=256, dtype=torch.float16),
        # Lengths that are not multiples of the blocks (ragged last query and key tiles).
        dict(q_heads=8, kv_heads=2, seq_q=1000, seq_k=1100, dim=128),
        dict(q_heads=6, kv_heads=3, seq_q=333, seq_k=555, dim=64, dtype=torch.float16),
        dict(q_heads=4, kv_heads=2, seq_q=300, seq_k=650, dim=128, block_k=256),
    ],
    ids=str,
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("passes", ["dkdv", "dq", True])
def test_gpu_gluon_backward_matches_reference(case, causal, passes, poison_outputs, monkeypatch):
    shape, dtype = _case_shape(case)
    if shape[6] % 128 and passes != "dkdv":
        pytest.skip("the Gluon dQ pass takes 128-row query blocks (the fallback test covers the others)")
    q, k, v = random_qkv(*shape[:6], dtype=dtype, device="cuda", seed=3)
    dout = torch.randn_like(q)
    launches = _record_launches(monkeypatch)
    expected_launches = ["dkdv", "dq"] if passes is True else [passes]
    for seed, heads_kind in enumerate(("query", "kv", "shared")):
        heads = {"query": shape[1], "kv": shape[2], "shared": 1}[heads_kind]
        pattern = shape_pattern(shape, heads=heads, density=0.4, causal=causal, seed=seed).to("cuda")
        expected = _reference_gradients(q, k, v, dout, pattern, causal)
        # The Gluon forward takes 128-row query blocks only (the Triton forward runs the others).
        for backend in ("triton", "gluon") if shape[6] % 128 == 0 else ("triton",):
            launches.clear()
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the Gluon passes run: no fallback warning
                with kernel_configs(gluon_backward=passes):
                    sa.block_sparse_attention(*leaves, pattern, causal=causal, backend=backend).backward(dout)
            assert launches == expected_launches, (backend, heads_kind)
            for name, leaf, want in zip("qkv", leaves, expected, strict=True):
                assert torch.isfinite(leaf.grad).all(), (backend, heads_kind, name)
                assert relative_error(leaf.grad, want) <= TOLERANCE[dtype], (backend, heads_kind, name)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        dict(q_heads=6, kv_heads=3, seq_q=512, seq_k=1024, dim=64, dtype=torch.float16),
        dict(q_heads=8, kv_heads=2, seq_q=1024, seq_k=1024, dim=64, block_q=256),
        dict(q_heads=6, kv_heads=3, seq_q=333, seq_k=555, dim=64, dtype=torch.float16),
        dict(q_heads=8, kv_heads=2, seq_q=1000, seq_k=1100, dim=128),
        dict(q_heads=8, kv_heads=1, seq_q=512, seq_k=768, dim=128, block_k=256),
    ],
    ids=str,
)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_gluon_backward_wide_steps_match_reference(case, causal, poison_outputs, monkeypatch):
    """``kernel_configs(gluon_backward_wide_steps=True)``: 128-row dK/dV steps (head_dim 64) and
    128-key dQ steps give the reference's gradients (GQA, Sq < Sk, ragged lengths, 256-blocks)."""
    shape, dtype = _case_shape(case)
    q, k, v = random_qkv(*shape[:6], dtype=dtype, device="cuda", seed=5)
    dout = torch.randn_like(q)
    steps = []
    choose = gluon_backward.step_rows
    monkeypatch.setattr(gluon_backward, "step_rows", lambda *a: steps.append((a[0], choose(*a))) or steps[-1][1])
    launches = _record_launches(monkeypatch)
    pattern = shape_pattern(shape, heads=shape[2], density=0.4, causal=causal, seed=5).to("cuda")
    expected = _reference_gradients(q, k, v, dout, pattern, causal)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with kernel_configs(gluon_backward=True, gluon_backward_wide_steps=True):
            sa.block_sparse_attention(*leaves, pattern, causal=causal, backend="gluon").backward(dout)
    assert launches == ["dkdv", "dq"]
    assert steps == [("dkdv", 128 if shape[5] == 64 else 64), ("dq", 128)]
    for name, leaf, want in zip("qkv", leaves, expected, strict=True):
        assert torch.isfinite(leaf.grad).all(), name
        assert relative_error(leaf.grad, want) <= TOLERANCE[dtype], name


@pytest.mark.gpu
def test_gpu_gluon_backward_falls_back_with_a_warning_on_small_key_blocks(poison_outputs):
    q, k, v = random_qkv(1, 4, 2, 300, 300, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    pattern = shape_pattern((1, 4, 2, 300, 300, 128, 128, 64), heads=2, density=0.5, causal=True, seed=1).to("cuda")
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with pytest.warns(UserWarning, match="Triton (dK/dV|dQ) pass runs instead"):
        with kernel_configs(gluon_backward=True):
            sa.block_sparse_attention(*leaves, pattern, causal=True, backend="triton").backward(torch.randn_like(q))
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def test_asked_gluon_passes_that_cannot_run_warn_and_leave_the_triton_gradients(poison_outputs):
    """Here (the interpreter) neither Gluon pass can run: both warn once and the Triton passes
    give the gradients they give without the option."""
    q, k, v, pattern = _case(q_heads=4, kv_heads=2, seq_q=128, seq_k=128, dim=64, block_q=64, dtype=torch.float32)
    dout = torch.randn_like(q)
    grads = []
    for asked in (None, True):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with kernel_configs(gluon_backward=asked):
                sa.block_sparse_attention(*leaves, pattern, causal=True, backend="triton").backward(dout)
        messages = [str(w.message) for w in caught if "gluon_backward" in str(w.message)]
        if asked:
            assert len(messages) == 2
            assert "the Triton dK/dV pass runs instead" in messages[0]
            assert "the Triton dQ pass runs instead" in messages[1]
        else:
            assert messages == []
        grads.append([x.grad for x in leaves])
    for got, want in zip(grads[1], grads[0], strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1024, 300])
def test_gpu_gluon_passes_are_the_default_after_the_gluon_forward(seq, poison_outputs, monkeypatch):
    """At head_dim 128 the ``gluon`` backend's backward runs both Gluon passes unasked (lengths
    that are multiples of the block or not), the ``triton`` backend's and ``gluon_backward=False``
    none, without a warning."""
    q, k, v = random_qkv(1, 8, 2, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=2)
    pattern = shape_pattern((1, 8, 2, seq, seq, 128, 128, 128), heads=2, density=0.5, causal=True, seed=2).to("cuda")
    dout = torch.randn_like(q)
    launches = _record_launches(monkeypatch)
    expected = _reference_gradients(q, k, v, dout, pattern, True)
    for backend, setting, runs in (("gluon", None, True), ("triton", None, False), ("gluon", False, False)):
        launches.clear()
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with kernel_configs(gluon_backward=setting):
                sa.block_sparse_attention(*leaves, pattern, causal=True, backend=backend).backward(dout)
        assert launches == (["dkdv", "dq"] if runs else []), (backend, setting)
        for leaf, want in zip(leaves, expected, strict=True):
            assert relative_error(leaf.grad, want) <= TOLERANCE[torch.bfloat16], (backend, setting)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [128, 64])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("rule", ["causal_window", "neighborhood"])
def test_gpu_gluon_passes_evaluate_a_box_predicate(rule, ragged, dim, poison_outputs, monkeypatch):
    """A token rule that is a box predicate (NSA's causal sliding window; a 3D neighbourhood
    window with text tokens, non-causal) runs in both Gluon passes, without any bitmask, and the
    gradients match the reference backend's; with whole blocks and with ragged last tiles."""
    from sparse_attn.nn.nsa import window_pattern
    from sparse_attn.rule_predicate import kernel_predicate

    if rule == "causal_window":
        # Sq < Sk, a window that is not a multiple of the block.
        seq_q, seq_k, causal = (700, 1000, True) if ragged else (768, 1024, True)
        q, k, v = random_qkv(2, 6, 2, seq_q, seq_k, dim, dtype=torch.bfloat16, device="cuda", seed=4)
        pattern = window_pattern(seq_q, seq_k, 300, device="cuda")
    else:
        grid, tile, text = (4, 16, 24), (2, 8, 8), 123 if ragged else 128  # 1659, or 1664 = 13 x 128 tokens
        layout = sa.layouts.Layout(grid, tile=tile, text_tokens=text)
        q, k, v = random_qkv(2, 6, 3, layout.seq_len, layout.seq_len, dim, dtype=torch.bfloat16, device="cuda", seed=4)
        pattern = sa.estimate(
            q, k, "neighborhood", causal=False, grid=grid, window=(3, 5, 7), tile=tile, text_tokens=text
        )
        causal = False
    assert pattern.partial_entries() > 0 and kernel_predicate(pattern) is not None
    dout = torch.randn_like(q)
    expected = _reference_gradients(q, k, v, dout, pattern, causal)
    launches = _record_launches(monkeypatch)
    for backend in ("gluon", "triton"):
        launches.clear()
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the passes take the predicate
            with kernel_configs(gluon_backward=True):
                sa.block_sparse_attention(*leaves, pattern, causal=causal, backend=backend).backward(dout)
        assert launches == ["dkdv", "dq"], backend
        assert pattern.cached_plan("rule_bitmask") is None
        for name, leaf, want in zip("qkv", leaves, expected, strict=True):
            assert torch.isfinite(leaf.grad).all(), (backend, name)
            assert relative_error(leaf.grad, want) <= TOLERANCE[torch.bfloat16], (backend, name)


def test_box_predicate_patterns_take_the_gluon_passes_only_when_asked(monkeypatch):
    """By default (after the Gluon forward) a box-predicate rule stays with the Triton passes
    (``BOX_BY_DEFAULT``, measured no faster); asked for, both Gluon passes take it, and a pattern
    without a rule takes them by default. (The launches are recorded, not run: no GPU here.)"""
    launches = []
    for kind in ("dkdv", "dq"):
        monkeypatch.setattr(
            gluon_backward, kind, lambda *args, kind=kind, **kwargs: launches.append((kind, kwargs["predicate"]))
        )
    monkeypatch.setattr(gluon_backward, "cannot_run_reason", lambda *args, **kwargs: None)
    q = torch.zeros(1, 2, 128, 128)
    predicate = object()

    def run(**kwargs):
        launches.clear()
        orders = {"dkdv": (), "dq": ()}
        gradients = {"dkdv": (q, q), "dq": (q,)}
        done = gluon_backward.run_passes(q, q, q, q, q, q, gradients, None, scale=1.0, orders=orders, has_rule=False,
                                         by_default=True, **kwargs)  # fmt: skip
        return done, list(launches)

    assert run(predicate=predicate) == (set(), [])
    assert run() == ({"dkdv", "dq"}, [("dkdv", None), ("dq", None)])
    with kernel_configs(gluon_backward=True):
        assert run(predicate=predicate) == ({"dkdv", "dq"}, [("dkdv", predicate), ("dq", predicate)])
