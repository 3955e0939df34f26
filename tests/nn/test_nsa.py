"""NativeSparseAttention against a token-by-token float64 reference of the rule in its docstring."""

from __future__ import annotations

import pytest
import torch
from helpers import random_qkv, relative_error, row_attention

from sparse_attn.nn.nsa import NativeSparseAttention

SMALL = dict(compress_block=8, compress_stride=4, select_block=16, select_top_n=4, window=20)


def _module(q_heads, kv_heads, dim, seed, **options):
    torch.manual_seed(seed)
    module = NativeSparseAttention(dim, q_heads, kv_heads, **{**SMALL, **options}).double()
    with torch.no_grad():  # leave the zero initialisation so gates and position encodings matter
        for name, parameter in module.named_parameters():
            # (and the mean_mlp residual's zero-initialised last layer)
            if name in ("gate_weight", "gate_bias", "compress_k.position", "compress_v.position") or (
                module.compressor == "mean_mlp" and ".mlp.2." in name
            ):
                parameter.normal_(std=0.1 if ".mlp.2." in name else 1.0)
    return module


def _reference_blocks(module, q, k_cmp, ends, b, kv_head, t, pos, scale):
    """Selected blocks of one (batch, KV head, position): forced ones, then the best by group score."""
    group = q.shape[1] // k_cmp.shape[1]
    block, stride, length = module.select_block, module.compress_stride, module.compress_block
    own = pos // block
    forced = [j for j in (0, own - 1, own) if j >= 0]
    visible = [i for i, end in enumerate(ends) if end <= pos]
    if not visible:
        return sorted(set(forced))
    scores = {}
    for j in range(own + 1):
        total = 0.0
        for h in range(kv_head * group, (kv_head + 1) * group):
            logits = torch.stack([q[b, h, t] @ k_cmp[b, kv_head, i] for i in visible])
            probabilities = torch.softmax(logits * scale, 0)
            for p, i in zip(probabilities, visible, strict=True):
                start = ends[i] - length + 1
                overlap = max(0, min(start + length, (j + 1) * block) - max(start, j * block))
                total += float(p.detach()) * overlap / stride
        scores[j] = total
    others = sorted((j for j in range(own + 1) if j not in forced), key=lambda j: -scores[j])
    return sorted(set(forced) | set(others[: max(0, module.select_top_n - len(set(forced)))]))


def _attend(query, keys, values, scale):
    if keys.shape[0] == 0:
        return torch.zeros_like(query)
    return torch.softmax((keys @ query) * scale, 0) @ values


def reference_nsa(module, q, k, v):
    """Float64, one query token at a time: gates x (compressed + selected + window)."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group, scale, offset = q_heads // kv_heads, dim**-0.5, seq_k - seq_q
    length, stride = module.compress_block, module.compress_stride
    count = max(0, (seq_k - length) // stride + 1)
    ends = [i * stride + length - 1 for i in range(count)]
    compress_k, compress_v = (
        (module.compress_k, module.compress_v) if module.compressor != "mean" else (lambda x: x.mean(-2),) * 2
    )
    k_cmp = torch.stack([compress_k(k[:, :, e - length + 1 : e + 1]) for e in ends], 2) if count else None
    v_cmp = torch.stack([compress_v(v[:, :, e - length + 1 : e + 1]) for e in ends], 2) if count else None
    rows = []
    for b in range(batch):
        heads = []
        for h in range(q_heads):
            kv_head = h // group
            tokens = []
            for t in range(seq_q):
                pos, query = t + offset, q[b, h, t]
                visible = [i for i, end in enumerate(ends) if end <= pos]
                compressed = (
                    _attend(query, k_cmp[b, kv_head, visible], v_cmp[b, kv_head, visible], scale)
                    if visible
                    else torch.zeros_like(query)
                )
                blocks = (
                    _reference_blocks(module, q, k_cmp, ends, b, kv_head, t, pos, scale)
                    if count
                    else [j for j in (0, pos // module.select_block - 1, pos // module.select_block) if j >= 0]
                )
                keys = [
                    key
                    for j in sorted(set(blocks))
                    for key in range(j * module.select_block, min((j + 1) * module.select_block, pos + 1))
                ]
                selected = _attend(query, k[b, kv_head, keys], v[b, kv_head, keys], scale)
                gates = torch.sigmoid(query @ module.gate_weight[h] + module.gate_bias[h])
                token = gates[0] * compressed + gates[1] * selected
                if module.window:
                    low = max(0, pos - module.window + 1)
                    window = _attend(query, k[b, kv_head, low : pos + 1], v[b, kv_head, low : pos + 1], scale)
                    token = token + gates[2] * window
                tokens.append(token)
            heads.append(torch.stack(tokens))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim), module options
CASES = [
    ((1, 4, 2, 100, 100, 8), {}),
    ((1, 6, 3, 40, 97, 8), {}),
    ((2, 2, 2, 70, 70, 16), {}),
    ((2, 4, 2, 1, 97, 8), {}),  # a decode step: one query at the end of the keys
    # fla-core's configuration: mean pooling over non-overlapping blocks, no sliding window.
    ((1, 4, 1, 75, 83, 8), dict(compressor="mean", compress_block=8, compress_stride=8, window=0)),
    # swap_in_nsa's dense start: mean pooling plus an MLP residual (randomised here).
    ((1, 3, 1, 60, 90, 8), dict(compressor="mean_mlp")),
]


@pytest.mark.parametrize("shape, options", CASES, ids=str)
def test_matches_token_level_reference_with_gradients(shape, options):
    batch, q_heads, kv_heads, seq_q, seq_k, dim = shape
    module = _module(q_heads, kv_heads, dim, seed=sum(shape), **options)
    q, k, v = (x.double().requires_grad_() for x in random_qkv(*shape, seed=sum(shape)))
    out = module(q, k, v)
    # Up to 7 blocks of 16 and 4 kept per token (3 forced): the scores choose for late tokens.
    assert module.selected_pattern(q, k, v).density() < 1.0
    grad = torch.randn_like(out)
    parameters = list(module.parameters())
    got = torch.autograd.grad(out, (q, k, v, *parameters), grad)
    expected_out = reference_nsa(module, q, k, v)
    expected = torch.autograd.grad(expected_out, (q, k, v, *parameters), grad)
    assert relative_error(out, expected_out) <= 1e-8
    names = ["q", "k", "v", *(name for name, _ in module.named_parameters())]
    for name, got_grad, want in zip(names, got, expected, strict=True):
        # Some gradients are exactly zero (a bias on every compressed key shifts a row's scores
        # uniformly): an absolute floor keeps rounding noise there from failing the check.
        torch.testing.assert_close(got_grad, want, rtol=1e-7, atol=1e-10, msg=name)


def test_paper_defaults_run_forward_and_backward():
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 4, 1, 200, 200, 16, seed=3))
    module = NativeSparseAttention(16, 4, 1)
    assert (module.compress_block, module.compress_stride, module.select_block) == (32, 16, 64)
    assert (module.select_top_n, module.window) == (16, 512)
    out = module(q, k, v)
    out.square().sum().backward()
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    pattern = module.selected_pattern(q, k, v)
    assert (pattern.block_q, pattern.block_k, pattern.num_heads) == (1, 64, 1)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(compress_block=10), "compress_block"),
        (dict(select_block=24, compress_stride=16), "select_block"),
        (dict(window=-1), "window"),
        (dict(compressor="max"), "compressor"),
        (dict(gate_bias=(0.0, 1.0)), "gate_bias"),
        (dict(gate_bias=(0.0, float("nan"), 1.0)), "gate_bias"),
        (dict(gate_bias="dense"), "gate_bias"),
    ],
)
def test_bad_configuration_names_the_argument(options, message):
    with pytest.raises(ValueError, match=message):
        NativeSparseAttention(16, 4, 2, **options)


def test_mean_mlp_compressor_starts_as_mean_pooling_and_gate_bias_sets_the_gates():
    torch.manual_seed(0)
    module = NativeSparseAttention(16, 4, 2, compressor="mean_mlp", gate_bias=(-4, 4, -4)).double()
    _, k, v = random_qkv(1, 4, 2, 100, 100, 16, seed=3)
    k_cmp, v_cmp = module._compress(k.double(), v.double())
    blocks = k.double().unfold(2, 32, 16).transpose(-1, -2)
    torch.testing.assert_close(k_cmp, blocks.mean(-2), rtol=0, atol=0)
    assert torch.equal(module.gate_bias, torch.tensor([[-4.0, 4.0, -4.0]] * 4, dtype=torch.float64))
    with torch.no_grad():  # once the residual's last layer is not zero, it adds to the mean
        module.compress_k.mlp[2].bias.fill_(1.0)
    torch.testing.assert_close(module._compress(k.double(), v.double())[0], blocks.mean(-2) + 1.0)


def test_wrong_head_counts_are_refused():
    module = NativeSparseAttention(16, 4, 2)
    q, k, v = random_qkv(1, 2, 2, 10, 10, 16)
    with pytest.raises(ValueError, match="heads"):
        module(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads, options",
    [
        ((64, 4, 128), {}),
        ((64, 4, 128), dict(compressor="mean", compress_block=64, compress_stride=64, window=0)),
        ((9, 3, 64), {}),  # SmolLM2-135M's attention: group 3, head_dim 64 (benchmarks/train_smollm2.py)
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-branch"])
def test_gpu_branches_on_the_kernels_match_the_reference(monkeypatch, poison_outputs, heads, options, fused):
    """NSA's shape (64 query / 4 KV heads, head_dim 128; and SmolLM2's 9 / 3 of 64) at 8K tokens, bf16: the module on the CUDA
    kernels (compressed branch on the block kernel, window on the box predicate, selected branch on
    the token-granular kernel) against the same module on the reference backend, with the selected
    branch there computed by ``helpers.row_attention`` (exact; the reference backend takes minutes on
    one-token query blocks). Both runs use one selection (taken from the kernel run), so only the
    kernels differ; outputs and gradients of q, k, v and the parameters within 2e-2. ``fused``: the
    kernel run takes the fused node of the selected and window branches and the gates
    (nn.nsa_fused; where there is a window), or the per-branch path."""
    from types import SimpleNamespace

    from sparse_attn import api as real_api
    from sparse_attn.nn import nsa

    def exact(q, k, v, pattern, *, scale, backend, return_lse=False):
        if pattern.block_q == 1:
            return row_attention(q, k, v, pattern, torch.arange(q.shape[2]), causal=True, scale=scale)[0]
        return real_api.block_sparse_attention(
            q, k, v, pattern, scale=scale, backend="reference", return_lse=return_lse
        )

    q_heads, kv_heads, dim = heads
    q, k, v = random_qkv(1, q_heads, kv_heads, 8192, 8192, dim, dtype=torch.bfloat16, device="cuda", seed=5)
    torch.manual_seed(0)
    module = NativeSparseAttention(dim, q_heads, kv_heads, **options).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.02)
    pattern = module.selected_pattern(q, k, v)
    results, taken = [], []
    real_fused = nsa.fused_nsa

    def spy(*args):
        result = real_fused(*args)
        taken.append(result is not None)
        return result

    for reference in (False, True):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        module.zero_grad()
        with monkeypatch.context() as patch:
            patch.setattr(module, "selection", lambda *args: pattern)
            patch.setattr(nsa, "fused_nsa", spy if fused and not reference else lambda *args: None)
            if reference:
                patch.setattr(nsa, "api", SimpleNamespace(block_sparse_attention=exact))
            out = module(*inputs)
        out.float().square().mean().backward()
        grads = [x.grad for x in inputs] + [p.grad.clone() for p in module.parameters()]
        results.append([out.detach(), *grads])
    assert taken == ([bool(module.window)] if fused else [])  # the node needs a window branch
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        if want.float().norm() < 1e-6:  # a gradient that is zero in exact arithmetic (see the CPU test)
            assert got.float().norm() < 1e-5
        else:
            assert relative_error(got.float(), want.float()) <= 2e-2


@pytest.mark.parametrize(
    "seq_q, seq_k, window", [(1, 1, 4), (37, 37, 5), (40, 300, 64), (130, 130, 128), (200, 513, 3)]
)
def test_window_pattern_and_its_predicate_are_the_causal_window(seq_q, seq_k, window):
    """The window branch's pattern (lists, cut entries, rule) keeps exactly ``i - window < j <= i``, and
    the rule's box predicate (what the kernels evaluate) equals the rule on every pair."""
    from sparse_attn.nn.nsa import window_pattern
    from sparse_attn.rule_predicate import box_allowed

    pattern = window_pattern(seq_q, seq_k, window, block=16)
    pattern.validate(causal=True)
    rows = torch.arange(seq_q)[:, None] + (seq_k - seq_q)
    keys = torch.arange(seq_k)[None, :]
    expected = (keys <= rows) & (keys > rows - window)
    blocks = pattern.to_mask()[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)[:seq_q, :seq_k]
    rule = pattern.token_rule
    assert torch.equal(blocks & (keys <= rows) & rule.allowed(rows, keys), expected)
    assert torch.equal(box_allowed(rule.kernel_predicate(), rows, keys), rule.allowed(rows, keys))
    # Entries not marked cut are whole for the rule (up to the causal mask, which the kernels apply anyway).
    used = torch.arange(pattern.max_kv) < pattern.kv_counts[..., None]
    for q_block, slot in (used & ~pattern.rule_partial)[0, 0].nonzero().tolist():
        k_block = int(pattern.kv_indices[0, 0, q_block, slot])
        r = rows[q_block * 16 : (q_block + 1) * 16]
        c = keys[:, k_block * 16 : (k_block + 1) * 16]
        assert bool((rule.allowed(r, c) | (c > r)).all())


@pytest.mark.parametrize("front, seq, stride", [(0, 32, 16), (3, 29, 4), (7, 1, 8), (1, 50, 1)])
def test_residue_regrouping_round_trips(front, seq, stride):
    from sparse_attn.nn.nsa import _by_residue, _from_residue

    x = torch.randn(2, 3, seq, 5)
    rows = -(-(front + seq) // stride)
    grouped = _by_residue(x, front, rows, stride)
    assert grouped.shape == (2 * stride, 3, rows, 5)
    t = 4 if seq > 4 else 0
    position = front + t
    assert torch.equal(grouped[1 * stride + position % stride, :, position // stride], x[1, :, t])
    assert torch.equal(_from_residue(grouped, front, seq, stride), x)


def _padded_by_residue(x, front, rows, stride):
    """The regrouping by padding and reshaping (two copies): the one-pass version's reference."""
    batch, heads, seq, dim = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, front, rows * stride - front - seq))
    # (B, H, rows, d, D) -> (B, d, H, rows, D) -> (B * d, H, rows, D)
    grid = padded.view(batch, heads, rows, stride, dim).permute(0, 3, 1, 2, 4)
    return grid.reshape(batch * stride, heads, rows, dim)


def _padded_from_residue(y, front, seq, stride, skip, fill):
    pad = (0, 0, skip, 0) if y.dim() == 4 else (skip, 0)
    y = torch.nn.functional.pad(y, pad, value=fill)
    entries, heads, rows = y.shape[:3]
    tail = y.shape[3:]
    unfolded = y.view(entries // stride, stride, heads, rows, *tail).movedim(1, 3)  # (B, H, rows, d, ...)
    return unfolded.reshape(entries // stride, heads, rows * stride, *tail)[:, :, front : front + seq]


@pytest.mark.parametrize("seq", [1, 3, 16, 17, 63, 100])
@pytest.mark.parametrize("stride", [1, 4, 16])
def test_residue_regrouping_in_one_pass_equals_padding_and_reshaping(seq, stride):
    from sparse_attn.nn import nsa

    for front in sorted({0, 1, stride // 2, stride - 1}):
        rows = -(-(front + seq) // stride)
        x = torch.randn(2, 3, seq, 5, dtype=torch.float64, requires_grad=True)
        for skip in range(min(rows, 3)):
            grouped = nsa._by_residue(x, front, rows, stride, skip)
            expected = _padded_by_residue(x, front, rows, stride)[:, :, skip:]
            assert torch.equal(grouped, expected)
            weights = torch.randn_like(grouped)
            assert torch.equal(
                torch.autograd.grad((grouped * weights).sum(), x)[0],
                torch.autograd.grad((expected * weights).sum(), x)[0],
            )
            lse = torch.randn(weights.shape[:3], dtype=torch.float64)
            for values, fill in ((weights, 0.0), (lse, float("-inf"))):
                back = nsa._from_residue(values, front, seq, stride, skip, fill=fill)
                assert torch.equal(back, _padded_from_residue(values, front, seq, stride, skip, fill))


@pytest.mark.parametrize("rows, n_cmp", [(1, 1), (5, 5), (511, 511), (4095, 4095), (30, 300), (200, 201), (128, 128)])
def test_aligned_padding_keeps_every_real_rows_causal_keys(rows, n_cmp):
    """The compressed branch's padding: both lengths whole 128-blocks, and under the causal pattern
    aligned to the last query each real row sees exactly its keys (never a padded one)."""
    from sparse_attn.nn.nsa import _aligned_padding

    lead, tail = _aligned_padding(rows, n_cmp)
    seq_q, seq_k = lead + rows + tail, n_cmp + tail
    assert seq_q % 128 == 0 and seq_k % 128 == 0 and 0 <= lead < 128 and 0 <= tail < 128
    real = torch.arange(rows)
    assert torch.equal(real + (n_cmp - rows), (real + lead) + (seq_k - seq_q))  # last key each sees


@pytest.mark.parametrize("shape", [(1, 4, 2, 100, 100, 8), (1, 6, 3, 40, 97, 8), (2, 2, 2, 70, 70, 16)], ids=str)
def test_padded_compressed_branch_equals_the_unpadded_one_with_gradients(monkeypatch, shape):
    """Rows and keys padded to whole blocks (what CUDA does under autograd, for the Gluon backward):
    the same outputs and gradients as the unpadded branch, here on the CPU in float64."""
    from sparse_attn.nn import nsa

    batch, q_heads, kv_heads, seq_q, seq_k, dim = shape
    module = _module(q_heads, kv_heads, dim, seed=sum(shape))
    results = []
    for padded in (False, True):
        q, k, v = (x.double().requires_grad_() for x in random_qkv(*shape, seed=sum(shape)))
        monkeypatch.setattr(nsa, "_pads_rows", lambda *args, padded=padded: padded)
        out = module(q, k, v)
        module.zero_grad()
        out.square().sum().backward()
        results.append([out, q.grad, k.grad, v.grad, *(p.grad.clone() for p in module.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_causal_pattern_is_cached_per_shape():
    """The compressed branch's dense causal pattern is built once per shape (its plan with it)."""
    from sparse_attn.nn.nsa import causal_pattern

    assert causal_pattern(300, 301, torch.device("cpu")) is causal_pattern(300, 301, torch.device("cpu"))


@pytest.mark.parametrize(
    "token_rows, outer, expected",
    [("overlap", None, "overlap"), (16, None, 16), (None, None, None), ("overlap", 64, 64), (None, 32, 32)],
)
def test_selected_branch_runs_under_the_modules_token_rows(monkeypatch, token_rows, outer, expected):
    """The selected branch (only it) runs under the module's ``token_rows`` (default ``"overlap"``);
    a ``kernel_configs(token_rows=...)`` around the call wins; ``None`` leaves the library default."""
    from sparse_attn import api as real_api
    from sparse_attn.backends import configs, kernel_configs
    from sparse_attn.nn import nsa

    seen = []

    def spy(q, k, v, pattern, **options):
        seen.append((pattern.block_q, configs.current().token_rows))
        return real_api.block_sparse_attention(q, k, v, pattern, **options)

    module = _module(4, 2, 8, seed=3, token_rows=token_rows)
    q, k, v = (x.double() for x in random_qkv(1, 4, 2, 50, 50, 8, seed=3))
    monkeypatch.setattr(nsa, "api", type("Api", (), {"block_sparse_attention": staticmethod(spy)}))
    with kernel_configs(token_rows=outer) if outer is not None else torch.no_grad():
        module(q, k, v)
    selected = [rows for block_q, rows in seen if block_q == 1]
    others = [rows for block_q, rows in seen if block_q != 1]
    assert selected == [expected]
    assert others and all(rows == outer for rows in others)


@pytest.mark.parametrize("bad", [True, 17, "wide", 1.5])
def test_token_rows_is_checked(bad):
    with pytest.raises(ValueError, match="token_rows"):
        NativeSparseAttention(8, 4, 2, token_rows=bad)


@pytest.mark.parametrize(
    "shape, inside",
    [
        ((2, 4, 2, 70, 70, 16), "padded"),  # batch 2, group 2
        ((1, 4, 2, 50, 97, 16), "padded"),  # Sq < Sk: lead rows before the regrouped queries
        ((1, 6, 2, 70, 81, 32), "yes"),  # group 3; the rows unpadded, as the CPU compressed branch
        ((1, 4, 4, 70, 70, 16), "no"),  # group 1
    ],
    ids=str,
)  # (batch, q heads, kv heads, seq_q, seq_k, head_dim)
def test_fused_node_matches_the_per_branch_reference(shape, inside, monkeypatch, poison_outputs):
    """The fused node (nn.nsa_fused: the three branches and the gates, the gated sum's backward
    handing each branch its delta and the gates' dQ buffer) on the Triton kernels in the
    interpreter, float32, against the module's per-branch path on the reference backend in
    float64, with one selection: output and the gradients of q, k, v and every parameter.
    ``inside``: the compressed branch in the node, its rows regrouped with the padding the Gluon
    backward takes on CUDA (``"padded"``) or without (``"yes"``), or an input of the node
    (``"no"``, as where no query would see a compressed token)."""
    import copy
    import importlib
    from types import SimpleNamespace

    from sparse_attn import api as real_api
    from sparse_attn.nn import nsa, nsa_fused

    batch, q_heads, kv_heads, seq_q, seq_k, dim = shape
    module = _module(q_heads, kv_heads, dim, seed=seq_q).float()
    module.backend = "triton"
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seq_q)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seq_q + 1))
    pattern = module.selected_pattern(q, k, v)
    assert pattern.density() < 1.0
    reference = copy.deepcopy(module).double()
    reference.backend = "reference"
    results = []
    for run in (module, reference):
        monkeypatch.setattr(run, "selection", lambda *args: pattern)

    def kernel_for(x, package, **case):  # the kernels in the interpreter; "no": no regrouping kernel
        if inside == "no" and package.endswith("residue_rows"):
            return None
        return importlib.import_module(f"{package}.triton")

    monkeypatch.setattr(nsa_fused, "kernel_for", kernel_for)
    if inside == "padded":
        monkeypatch.setattr(nsa, "_pads_rows", lambda *args: True)
    taken = []
    apply = nsa_fused._FusedNSA.apply
    monkeypatch.setattr(nsa_fused._FusedNSA, "apply", lambda *args: taken.append(args[4] is not None) or apply(*args))

    def exact(q, k, v, pattern, *, scale, backend, return_lse=False):  # the selected branch by rows (fast)
        if pattern.block_q == 1:
            return row_attention(q, k, v, pattern, torch.arange(q.shape[2]), causal=True, scale=scale,
                                 dtype=q.dtype)[0]  # fmt: skip
        return real_api.block_sparse_attention(q, k, v, pattern, scale=scale, backend=backend, return_lse=return_lse)

    for run, dtype in ((module, torch.float32), (reference, torch.float64)):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        with monkeypatch.context() as patch:
            if run is reference:
                patch.setattr(nsa, "api", SimpleNamespace(block_sparse_attention=exact))
            out = run(*inputs)
        results.append([out, *torch.autograd.grad(out, [*inputs, *run.parameters()], grad.to(dtype))])
    assert taken == [inside != "no"]  # the float32 run took the node (the reference run never does: reference backend)
    names = ["out", "q", "k", "v", *(name for name, _ in module.named_parameters())]
    for name, got, want in zip(names, *results, strict=True):
        assert torch.isfinite(got).all(), name
        if want.norm() < 1e-9:  # zero in exact arithmetic (see test_matches_token_level_reference...)
            assert got.norm() < 1e-5, name
        else:
            assert relative_error(got, want) <= 1e-4, name


def test_fused_node_is_not_taken_off_cuda_or_without_gradients():
    """The module's CPU path and inference never take the fused node (it needs the CUDA kernels)."""
    from sparse_attn.nn.nsa_fused import fused_nsa

    module = _module(4, 2, 8, seed=1).float()
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 4, 2, 40, 40, 8, seed=1))
    k_cmp, v_cmp, _ = module.compressed_tokens(k, v)

    def never(*args):
        raise AssertionError("the compressed branch is not run")

    assert fused_nsa(module, q, k, v, k_cmp, v_cmp, 0.3, never) is None  # reference backend on CPU
    with torch.no_grad():
        module.backend = "triton"
        assert fused_nsa(module, q, k, v, k_cmp, v_cmp, 0.3, never) is None


@pytest.mark.parametrize("chunk_rows", [1, 7, 16])
def test_selection_in_chunks_equals_one_chunk(monkeypatch, chunk_rows):
    """The selection scored chunk by chunk of query rows, each chunk's scores only as wide as the
    blocks its last row sees (at least top_n), lists the same blocks as one chunk of every row."""
    from sparse_attn.nn import nsa

    module = _module(4, 2, 8, seed=2, select_top_n=3)
    q, k, v = (x.double() for x in random_qkv(2, 4, 2, 90, 130, 8, seed=2))
    whole = module.selected_pattern(q, k, v)
    n_blocks = -(-130 // module.select_block)
    monkeypatch.setattr(nsa, "CHUNK_ELEMENTS", chunk_rows * 2 * 2 * n_blocks)
    chunked = module.selected_pattern(q, k, v)
    assert torch.equal(chunked.kv_counts, whole.kv_counts)
    assert torch.equal(chunked.kv_indices, whole.kv_indices)
    assert whole.density() < 1.0
