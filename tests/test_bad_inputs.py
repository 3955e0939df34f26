"""Bad input at the public boundary found by an audit of the API: each case raises a clear
``TypeError``/``ValueError`` naming the argument (before: a silent wrong answer, or a crash deep in
torch), and the one valid-but-unusual case (ProxyAttn's query stride above the block) now runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import sparse_attn as sa
from sparse_attn.decode import PagedKVCache, sparse_decode
from sparse_attn.layouts import Layout, default_tile
from sparse_attn.nn import NativeSparseAttention


def qkv(seq=300, q_heads=4, kv_heads=2, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_heads, seq, dim, generator=generator)
    k, v = (torch.randn(1, kv_heads, seq, dim, generator=generator) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("value", ["false", None, 0, 1.0])
def test_flags_must_be_bools(value):
    """``causal="false"`` used to run causal attention (truthiness); every flag of the API is checked."""
    q, k, v = qkv()
    pattern = sa.dense_pattern(seq_q=300, block_q=64, block_k=64)
    calls = {
        "causal": lambda: sa.sparse_attention(q, k, v, causal=value),
        "return_info": lambda: sa.sparse_attention(q, k, v, return_info=value),
        "check_inputs_finite": lambda: sa.sparse_attention(q, k, v, check_inputs_finite=value),
        "return_lse": lambda: sa.block_sparse_attention(q, k, v, pattern, return_lse=value),
        "estimate causal": lambda: sa.estimate(q, k, "streaming", causal=value),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name.split()[-1]} must be a bool, got {value!r}"):
            call()


@pytest.mark.parametrize("block_q, stride", [(64, 100), (16, 64), (8, 16)])
def test_proxyattn_samples_each_blocks_last_row_when_the_stride_exceeds_the_block(block_q, stride):
    """``query_stride > block_q`` (and ``auto``, whose ProxyAttn candidate strides 16, at ``block_q=8``)
    used to crash in ``torch.arange``; each query block is then scored by its last row."""
    from sparse_attn.ops.sampled_rows import sampled_query_rows

    rows = sampled_query_rows(300, block_q, stride, "cpu")
    expected = set()
    for start in range(0, 300, block_q):  # every stride-th row of each block, and its last row
        expected |= {row for row in range(start + stride - 1, min(start + block_q, 300), stride)}
        expected.add(min(start + block_q, 300) - 1)
    expected = torch.tensor(sorted(expected))
    assert torch.equal(rows, expected)
    q, k, v = qkv()
    out = sa.sparse_attention(q, k, v, "proxyattn", block_q=block_q, block_k=block_q, query_stride=stride)
    assert out.shape == q.shape and torch.isfinite(out).all()
    if block_q == 8:
        assert torch.isfinite(sa.sparse_attention(q, k, v, "auto", block_q=8, block_k=8)).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_q=0), ValueError, "block_q must be >= 1"),
        (dict(block_k=-64), ValueError, "block_k must be >= 1"),
        (dict(batch=-1), ValueError, "batch must be >= 1"),
        (dict(heads=0), ValueError, "heads must be >= 1"),
        (dict(seq_q=0), ValueError, "seq_q must be >= 1"),
        (dict(seq_q=256.0), TypeError, "seq_q must be an int"),
        (dict(seq_q="256"), TypeError, "seq_q must be an int"),
        (dict(seq_k=1.5), TypeError, "seq_k must be an int"),
        (dict(causal="yes"), TypeError, "causal must be a bool"),
    ],
)
def test_pattern_constructors_check_their_sizes(kwargs, error, match):
    arguments = {"seq_q": 256, **kwargs}
    with pytest.raises(error, match=match):
        sa.dense_pattern(**arguments)
    with pytest.raises(error, match=match):
        sa.random_pattern(density=0.5, **arguments)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(seed=2**70), ValueError, "seed must be < 2"),
        (dict(density="0.5"), TypeError, "density must be a float"),
        (dict(density=True), TypeError, "density must be a float"),
        (dict(density=None), TypeError, "density must be a float"),
    ],
)
def test_random_pattern_checks_seed_and_density(kwargs, error, match):
    with pytest.raises(error, match=match):
        sa.random_pattern(seq_q=256, **{"density": 0.5, **kwargs})


def test_from_mask_checks_sizes_and_an_empty_mask():
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_q must be >= 1"):
        sa.BlockSparsePattern.from_mask(mask, block_q=0, block_k=128, seq_q=256, seq_k=256)
    with pytest.raises(ValueError, match="batch and heads of at least 1"):
        sa.BlockSparsePattern.from_mask(mask[None, None][:, :0], block_q=128, block_k=128, seq_q=256, seq_k=256)


def test_sparse_decode_checks_q_heads_layer_and_state():
    cache = PagedKVCache(2, 2, 16, page_size=16, dtype=torch.float32, device="cpu")
    cache.append(torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16))
    q = torch.randn(2, 4, 16)
    assert sparse_decode(q, cache, "streaming", token_budget=32).shape == (2, 4, 16)
    for heads in (3, 0):  # not a multiple of the cache's 2 KV heads; none
        for method in ("moba", "tidaldecode", "double_sparsity", "quest", "dense"):
            with pytest.raises(ValueError, match="positive multiple of the cache's 2 KV heads"):
                sparse_decode(torch.randn(2, heads, 16), cache, method)
    with pytest.raises(TypeError, match="layer must be an int"):
        sparse_decode(q, cache, "quest", layer=1.0)
    with pytest.raises(ValueError, match="layer must be >= 0"):
        sparse_decode(q, cache, "quest", layer=-1)
    with pytest.raises(TypeError, match="state must be a dict"):
        sparse_decode(q, cache, "tidaldecode", state=[])


def test_option_errors_name_the_option_given():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="init_tokens must be >= 1"):
        sa.sparse_attention(q, k, v, "anchor", init_tokens=-1)
    with pytest.raises(TypeError, match="init_tokens must be an int"):
        sa.sparse_attention(q, k, v, "anchor", init_tokens=2.5)
    with pytest.raises(TypeError, match="per_query_head must be a bool"):
        sa.sparse_attention(q, k, v, "random", per_query_head="no")


def test_layout_sizes_and_default_tile():
    assert Layout(8).grid == (8,)  # an int is a 1D grid (was refused with "must be an int or ...")
    assert Layout([2, 3, 4]).grid == (2, 3, 4)
    q = torch.randn(1, 2, 768, 16)
    as_int = sa.estimate(q, q, "neighborhood", causal=False, grid=768, window=65)
    as_tuple = sa.estimate(q, q, "neighborhood", causal=False, grid=(768,), window=65)
    assert torch.equal(as_int.kv_indices, as_tuple.kv_indices)
    for rank in (0, 4, "3", True):
        with pytest.raises(ValueError, match="rank must be 1, 2 or 3"):
            default_tile(rank)


def test_register_method_needs_a_name():
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    for name in (None, "", 3):
        with pytest.raises(TypeError, match="name must be a non-empty str"):
            sa.register_method(name, config=Config, paper="-", summary="-")
    assert "dense" in [method.name for method in sa.list_methods()]  # the registry still lists


def test_nsa_checks_the_input_dtype_against_its_parameters():
    module = NativeSparseAttention(16, 4, 2, compress_block=16, compress_stride=8, select_block=16, window=32)
    q, k, v = qkv(seq=96)
    assert module(q, k, v).shape == q.shape
    for dtype in (torch.bfloat16, torch.float64):
        low = [x.to(dtype) for x in (q, k, v)]
        with pytest.raises(TypeError, match=r"module's parameters are torch.float32"):
            module(*low)
        with pytest.raises(TypeError, match=r"module's parameters are torch.float32"):
            module.selected_pattern(*low)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs mixed dtypes: allowed
        assert module(*(x.bfloat16() for x in (q, k, v))).shape == q.shape
    with pytest.raises(ValueError, match="expected q with 4 heads"):
        module.selected_pattern(*qkv(seq=96, q_heads=2))


def test_paged_cache_checks_dtype_sequence_index_and_lengths():
    for dtype in (torch.float64, torch.float8_e4m3fn, torch.int32, "float16"):
        with pytest.raises(TypeError, match="dtype must be one of"):
            PagedKVCache(1, 2, 16, dtype=dtype, device="cpu")
    cache = PagedKVCache(2, 2, 16, page_size=16, dtype=torch.float32, device="cpu")
    k = torch.randn(2, 2, 20, 16)
    with pytest.raises(TypeError, match="lengths must be a list of ints"):
        cache.append(k, k, lengths=3)
    cache.append(k, k, lengths=torch.tensor([20, 7]))
    assert cache.lengths == [20, 7] and torch.equal(cache.keys(1, 0, 7), k[1, :, :7])
    for b, error in ((2, ValueError), (-1, ValueError), (1.0, TypeError)):
        with pytest.raises(error, match="b must be"):
            cache.keys(b, 0, 1)
        with pytest.raises(error, match="b must be"):
            cache.sequence(b)


def test_sparse_vdit_checks_its_stripes():
    grid, heads = (2, 4, 8), ("vertical_stripe", "diagonal")
    q = torch.randn(1, 2, 64, 16)
    ok = sa.estimate(q, q, "sparse_vdit", causal=False, grid=grid, heads=heads, stripes=((3, 40), ()))
    assert ok.kv_indices.shape[1] == 2  # one list per query head
    cases = [
        (dict(heads=heads, stripes=(("ab",), ())), TypeError, "stripes positions must be an int"),
        (dict(heads=heads, stripes=((3.5,), ())), TypeError, "stripes positions must be an int"),
        (dict(heads=heads, stripes=((64,), ())), ValueError, "must be < the layout's 64 tokens"),
        (dict(stripes=((3,), ())), ValueError, "stripes= needs heads="),
    ]
    for options, error, match in cases:
        with pytest.raises(error, match=match):
            sa.estimate(q, q, "sparse_vdit", causal=False, grid=grid, **options)


def test_moa_profile_files_are_checked(tmp_path):
    from sparse_attn.methods.moa import PROFILE_FORMAT, MoAProfile

    good = {"format": PROFILE_FORMAT, "sink_tokens": 64, "block": 64, "layers": {"0": [[128, 0.25], [64, 0.5]]}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(good))
    assert MoAProfile.load(path).spans(0) == ((128.0, 0.25), (64.0, 0.5))
    bad = [
        ({"sink_tokens": None}, "lacks \\['sink_tokens'\\]"),
        ({"layers": [[128, 0.25]]}, "layers must map layer indices"),
        ({"layers": {"first": [[128, 0.25]]}}, "layer keys must be non-negative integers"),
        ({"layers": {"0": []}}, "layer 0 must list one"),
        ({"sink_tokens": -1}, "sink_tokens must be >= 0"),
        ({"block": 0}, "block must be >= 1"),
    ]
    for change, match in bad:
        data = {**good, **change}
        data = {key: value for key, value in data.items() if value is not None}
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            MoAProfile.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        MoAProfile.load(path)
    with pytest.raises(ValueError, match="is not a file"):
        MoAProfile.load(tmp_path)


def test_a_generator_option_is_read_once():
    """``auto``'s ``candidates=`` as a generator: ``sparse_attention`` checks the options, then
    ``estimate`` reads them again; both see the same candidates (the second read saw none)."""
    q, k, v = qkv(seq=256)
    names = ("streaming", "block_topk")
    as_tuple = sa.sparse_attention(q, k, v, "auto", candidates=names)
    as_generator = sa.sparse_attention(q, k, v, "auto", candidates=(name for name in names))
    torch.testing.assert_close(as_generator, as_tuple, rtol=0, atol=0)


def test_patterns_need_a_batch_and_heads_and_expand_to_a_positive_count():
    pattern = sa.dense_pattern(heads=2, seq_q=256)
    with pytest.raises(ValueError, match="batch and heads of at least 1"):
        dataclasses.replace(pattern, kv_counts=pattern.kv_counts[:, :0], kv_indices=pattern.kv_indices[:, :0])
    for heads, error in ((0, ValueError), (-2, ValueError), (4.0, TypeError)):
        with pytest.raises(error, match="num_q_heads must be"):
            pattern.expand_heads(heads)
    assert pattern.expand_heads(6).num_heads == 6


@pytest.mark.parametrize(
    "method, option, covering",
    [
        ("moba", "block_size", 512),  # one key block either way: dense causal attention
        ("anchor", "local_tokens", 384),  # a window over every key block
        ("sale", "local_tokens", 384),
        ("hip", "top_k_tokens", 384),  # every candidate block kept
    ],
)
def test_option_values_past_the_sequence_act_as_the_whole_sequence(method, option, covering):
    """A block size, window or budget of 10**9 tokens on 300 tokens is the whole sequence: the
    same pattern and output as the smallest value covering it, without allocating for 10**9 keys
    (before, each of these tried to allocate gigabytes and failed deep in PyTorch)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64)
    v = torch.randn_like(k)
    huge = sa.sparse_attention(q, k, v, method=method, **{option: 10**9}, return_info=True)
    small = sa.sparse_attention(q, k, v, method=method, **{option: covering}, return_info=True)
    assert torch.equal(huge[1].pattern.kv_counts, small[1].pattern.kv_counts)
    torch.testing.assert_close(huge[0], small[0], rtol=1e-5, atol=1e-5)


def test_meta_tensors_are_refused_by_name():
    """Meta tensors have no values to estimate from: a clear error, not ``Tensor.item()`` deep in an op."""
    q, k, v = (x.to("meta") for x in qkv())
    with pytest.raises(ValueError, match="q is a meta tensor"):
        sa.sparse_attention(q, k, v, method="xattention")
    with pytest.raises(ValueError, match="q is a meta tensor"):
        sa.block_sparse_attention(q, k, v, sa.dense_pattern(seq_q=300, block_q=64, block_k=64))
