"""auto: the per-head choice against a brute force of its rule, the recall budget on planted inputs
(exact recall), dense fallback, the cached state, candidate validation."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from helpers import naive_attention, random_qkv, relative_error
from planted import PlantedSpec, planted_qkv

import sparse_attn as sa
import sparse_attn.methods.auto as auto_module
from sparse_attn.methods.auto import (
    DENSE,
    AutoConfig,
    AutoState,
    auto_layer_methods,
    choose,
    chunk_recall,
    probe_block_mass,
    probe_blocks,
    probe_estimate,
)

PLANTED = PlantedSpec(needle_shared_by_group=True)
CANDIDATES = (
    ("streaming", {"sink_tokens": 16, "local_tokens": 64}),
    ("block_topk", {"top_k": 4}),
    ("block_topk", {"top_k": 8}),
    ("xattention", {"threshold": 0.9}),
    ("xattention", {"threshold": 0.5}),
    ("sale", {"sink_tokens": 16, "local_tokens": 16}),
)
BLOCKS = dict(block_q=16, block_k=16)


@pytest.fixture
def small_chunks(monkeypatch):
    """Estimators stream in chunks of one query block (or one group of them): ``capture_rows``
    then computes the captured blocks only, as at long lengths, instead of returning the whole
    pattern that one chunk gives."""
    from sparse_attn.ops import to_pattern

    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)


@functools.cache
def planted_inputs():
    return planted_qkv(PLANTED)


def head_recall(q, k, pattern, head):
    group = q.shape[1] // k.shape[1]
    per_head = pattern.expand_heads(q.shape[1])
    one = sa.BlockSparsePattern(
        kv_counts=per_head.kv_counts[:, head : head + 1].contiguous(),
        kv_indices=per_head.kv_indices[:, head : head + 1].contiguous(),
        block_q=pattern.block_q,
        block_k=pattern.block_k,
        seq_q=pattern.seq_q,
        seq_k=pattern.seq_k,
    )
    return sa.metrics.recall(q[:, head : head + 1], k[:, head // group : head // group + 1], one)


def probe_recall_brute_force(q, k, pattern, probe_rows):
    """Exact softmax of the last probe rows, the mass inside the last query block's kept blocks, per head."""
    group = q.shape[1] // k.shape[1]
    seq_q, seq_k = q.shape[2], k.shape[2]
    logits = (
        q[:, :, -probe_rows:].double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    )
    positions = torch.arange(seq_q - probe_rows, seq_q) + seq_k - seq_q
    logits = logits.masked_fill(torch.arange(seq_k)[None, :] > positions[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    kept = pattern.expand_heads(q.shape[1]).to_mask()[:, :, -1]  # (B', H, n_kv)
    keys = kept.repeat_interleave(pattern.block_k, -1)[..., :seq_k]
    return (probs * keys[:, :, None, :]).sum(-1).mean(-1)


@pytest.mark.parametrize("budget", [0.9, 0.95])
def test_auto_meets_its_budget_at_lower_density_than_dense(budget):
    q, k, _ = planted_inputs()
    pattern, choice = choose(q, k, AutoConfig(recall=budget, candidates=CANDIDATES), causal=True, **BLOCKS)
    pattern.validate()
    assert pattern.density() < 0.6
    assert sa.metrics.recall(q, k, pattern) >= budget
    for head in range(q.shape[1]):
        assert head_recall(q, k, pattern, head) >= budget - 0.02, f"head {head}: {choice.names()[head]}"
    assert DENSE not in choice.index.tolist()


@pytest.mark.parametrize("density_rule", ["exact", "probe"])
def test_choice_is_the_sparsest_candidate_meeting_the_budget(density_rule, small_chunks):
    q, k, _ = random_qkv(2, 6, 3, 96, 112, 32, seed=4)
    k[:, :, 5] *= 5.0
    budget = 0.85
    config = AutoConfig(recall=budget, candidates=CANDIDATES, probe="last", probe_queries=8, density=density_rule)
    pattern, choice = choose(q, k, config, causal=True, **BLOCKS)
    full = sa.dense_pattern(seq_q=96, seq_k=112, **BLOCKS)
    # "exact": kept blocks over valid blocks of the whole head; "probe": of the probed (last) row only.
    counted = slice(None) if density_rule == "exact" else slice(-1, None)
    valid = full.kv_counts[..., counted].sum().item()
    best = torch.full((2, 6), float("inf"))
    index = torch.full((2, 6), DENSE)
    for position, (name, options) in enumerate(CANDIDATES):
        candidate = sa.estimate(q, k, name, **BLOCKS, **options)
        recall = probe_recall_brute_force(q, k, candidate, 8).expand(2, 6)
        density = candidate.expand_heads(6).kv_counts[..., counted].sum(-1).double().expand(2, 6) / valid
        better = (recall >= budget - 1e-6) & (density < best - 1e-12)
        best = torch.where(better, density, best)
        index = torch.where(better, position, index)
    assert torch.equal(choice.index, index)
    # The pattern's rows are the chosen candidates' rows.
    for position in index.unique().tolist():
        if position == DENSE:
            continue
        name, options = CANDIDATES[position]
        rows = sa.estimate(q, k, name, **BLOCKS, **options).expand_heads(6).to_mask().expand(2, -1, -1, -1)
        heads = index == position
        assert torch.equal(pattern.to_mask()[heads], rows[heads])
    # Reported densities are the chosen rows' exact densities, whichever rule chose them.
    exact = pattern.kv_counts.sum(-1).float() / full.kv_counts.sum().item()
    torch.testing.assert_close(choice.density, exact)


def test_heads_no_candidate_serves_run_dense():
    q, k, _ = planted_inputs()
    narrow = (("streaming", {"sink_tokens": 16, "local_tokens": 16}),)
    pattern, choice = choose(q, k, AutoConfig(recall=0.999, candidates=narrow), causal=True, **BLOCKS)
    assert choice.names() == ["dense"] * 4
    assert pattern.density() == 1.0
    assert torch.equal(choice.density, torch.ones(1, 4))


def test_state_reuses_the_choice_until_the_refresh():
    q, k, _ = planted_inputs()
    state = AutoState(refresh_every=3)
    config = AutoConfig(recall=0.9, candidates=CANDIDATES, state=state)
    first, _ = choose(q, k, config, causal=True, **BLOCKS)
    flags = [state.last.refreshed]
    for _ in range(3):
        again, _ = choose(q, k, config, causal=True, **BLOCKS)
        flags.append(state.last.refreshed)
        assert torch.equal(again.to_mask(), first.to_mask())
    assert flags == [True, False, False, True]
    # A different head count re-selects.
    choose(q[:, :2], k, config, causal=True, **BLOCKS)
    assert state.last.refreshed and state.last.index.shape == (1, 2)


def test_auto_through_the_api_matches_the_oracle_and_layer_methods_get_their_own_state():
    q, k, v = random_qkv(1, 4, 2, 64, 96, 32, seed=2)
    out, info = sa.sparse_attention(q, k, v, method="auto", candidates=CANDIDATES[:3], return_info=True, **BLOCKS)
    expected, _ = naive_attention(q, k, v, info.pattern, causal=True)
    assert relative_error(out, expected) < 1e-4
    methods = auto_layer_methods([0, 3], refresh_every=4, recall=0.9)
    assert methods[0][0] == "auto" and methods[0][1]["recall"] == 0.9
    assert methods[0][1]["state"] is not methods[3][1]["state"]


def test_candidates_that_cannot_run_the_case_are_skipped_with_a_warning():
    q, k, _ = random_qkv(1, 2, 2, 40, 40, 16, seed=0)
    with pytest.warns(UserWarning, match="xattention.*skipped"):
        pattern = sa.estimate(q, k, "auto", block_q=12, block_k=12, candidates=("xattention", "streaming"))
    pattern.validate()


@pytest.mark.parametrize(
    "candidates, error, match",
    [
        (("auto",), ValueError, "auto"),
        (("nonexistent",), ValueError, "unknown method"),
        ((("xattention", {"bogus": 1}),), TypeError, "bogus"),
        ((), ValueError, "at least one"),
        ("streaming", TypeError, "candidates"),
        ((("streaming", 3),), TypeError, "candidates"),
    ],
)
def test_bad_candidates_are_rejected(candidates, error, match):
    with pytest.raises(error, match=match):
        AutoConfig(candidates=candidates)


def test_other_config_errors_name_the_field():
    with pytest.raises(ValueError, match="recall"):
        AutoConfig(recall=1.5)
    with pytest.raises(ValueError, match="probe_queries"):
        AutoConfig(probe_queries=0)
    with pytest.raises(TypeError, match="probe_queries"):
        AutoConfig(probe_queries=8.0)
    with pytest.raises(ValueError, match="probe must be one of"):
        AutoConfig(probe="first")
    with pytest.raises(ValueError, match="density must be one of"):
        AutoConfig(density="average")
    with pytest.raises(ValueError, match="probe_chunks"):
        AutoConfig(probe="spread", probe_chunks=0)
    for bad in (1.0, 0.4, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            AutoConfig(confidence=bad)
    with pytest.raises(TypeError, match="confidence"):
        AutoConfig(confidence="high")
    AutoConfig(probe="spread", probe_queries=None, probe_chunks=1, confidence=0.5)
    with pytest.raises(TypeError, match="state"):
        AutoConfig(state="cache")
    with pytest.raises(ValueError, match="refresh_every"):
        AutoState(refresh_every=0)


def test_token_level_candidates_are_rejected():
    q, k, _ = random_qkv(1, 2, 2, 40, 40, 16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="block_q"):
            sa.estimate(q, k, "auto", candidates=(("moba", {"block_size": 8, "top_k": 2}),), **BLOCKS)


# --- the spread probe ---------------------------------------------------------------------------


def probe_mass_brute_force(q, k, query_blocks, rows, block_q, block_k, causal):
    """Float64 (B, Hq, chunks, n_kv): the dense softmax of each probed block's last rows, summed per KV block."""
    group = q.shape[1] // k.shape[1]
    seq_q, seq_k = q.shape[2], k.shape[2]
    logits = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        positions = torch.arange(seq_q) + seq_k - seq_q
        logits = logits.masked_fill(torch.arange(seq_k)[None, :] > positions[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    n_kv = -(-seq_k // block_k)
    padded = torch.nn.functional.pad(probs, (0, n_kv * block_k - seq_k)).unflatten(-1, (n_kv, block_k)).sum(-1)
    sums = []
    for block in query_blocks:
        end = min((block + 1) * block_q, seq_q)
        sums.append(padded[:, :, max(block * block_q, end - rows) : end].sum(-2))
    return torch.stack(sums, 2)


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, block, rows, chunks, causal",
    [
        (1, 4, 2, 150, 150, 16, 16, 4, True),  # GQA, odd length, every 3rd block
        (2, 3, 3, 77, 101, 16, 5, 16, True),  # batch 2, Sq < Sk, fewer blocks than chunks, partial rows
        (1, 6, 2, 64, 96, 32, 12, 2, False),  # non-causal
    ],
)
def test_spread_probe_matches_a_brute_force_dense_softmax(
    monkeypatch, batch, q_heads, kv_heads, seq_q, seq_k, block, rows, chunks, causal
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, seed=seq_q)
    k[:, :, 3] *= 4.0  # an uneven head: recall differs from density
    n_q = -(-seq_q // block)
    blocks = probe_blocks(n_q, chunks)
    assert blocks[0] == 0 or chunks == 1
    assert blocks[-1] == n_q - 1 and len(blocks) == min(chunks, n_q) == len(set(blocks))
    expected = probe_mass_brute_force(q, k, blocks, rows, block, block, causal)
    for elements in (auto_module.CHUNK_ELEMENTS, 64):  # one head chunk, and one head at a time
        monkeypatch.setattr(auto_module, "CHUNK_ELEMENTS", elements)
        mass, counts = probe_block_mass(
            q, k, query_blocks=blocks, rows=rows, block_q=block, block_k=block, scale=16**-0.5, causal=causal
        )
        assert torch.allclose(mass.double(), expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(mass.sum(-1), counts.float().expand_as(mass[..., 0]), rtol=1e-5)
    pattern = sa.random_pattern(
        heads=kv_heads, seq_q=seq_q, seq_k=seq_k, density=0.4, block_q=block, block_k=block, causal=causal, seed=1
    )
    kept = pattern.expand_heads(q_heads).to_mask()[:, :, blocks]  # (1, Hq, chunks, n_kv), broadcast over B
    brute = (expected * kept).sum(-1) / expected.sum(-1)
    recall = chunk_recall(pattern.expand_heads(q_heads), mass, blocks)
    assert recall.shape == (batch, q_heads, len(blocks))
    assert torch.allclose(recall.double(), brute, atol=1e-5)


def test_lower_bound_is_the_mean_minus_z_standard_errors():
    recalls = torch.tensor([[0.99, 0.83] * 8, [0.9] * 16])
    mean, std = 0.91, torch.tensor([0.99, 0.83] * 8).std().item()
    bound = probe_estimate(recalls, 0.95)
    assert bound[0].item() == pytest.approx(mean - 1.6448536 * std / 4, abs=1e-6)
    assert bound[1].item() == pytest.approx(0.9)  # no spread: the mean
    assert torch.allclose(probe_estimate(recalls, 0.5), recalls.mean(-1))
    assert probe_estimate(recalls[:, :1], 0.95).tolist() == pytest.approx([0.99, 0.9])  # one chunk: itself


def test_spread_choice_follows_its_rule_and_the_bound_can_refuse_a_candidate_whose_mean_passes():
    q, k, _ = random_qkv(1, 4, 2, 200, 200, 16, seed=7)
    k[:, :, 0] *= 6.0  # a sink column, so the window candidate keeps a sizeable but uneven share
    window = ("streaming", {"sink_tokens": 16, "local_tokens": 32})
    config = dict(candidates=(window,), probe="spread", probe_chunks=8, **BLOCKS)
    candidate = sa.estimate(q, k, window[0], **BLOCKS, **window[1]).expand_heads(4)
    blocks = probe_blocks(13, 8)
    mass = probe_mass_brute_force(q, k, blocks, 16, 16, 16, True)
    kept = candidate.to_mask()[:, :, blocks]
    chunks = ((mass * kept).sum(-1) / mass.sum(-1))[0]  # (Hq, chunks), exact
    mean = chunks.mean(-1)
    bound = mean - 1.6448536 * chunks.std(-1) / 8**0.5
    assert bool((mean - bound > 0.01).all())
    # Planted budget: between each head's bound and its mean. The mean passes, the bound does not.
    for head in range(4):
        budget = float(bound[head] + mean[head]) / 2
        options = {key: value for key, value in config.items() if key not in BLOCKS}
        _, plain = choose(q, k, AutoConfig(recall=budget, confidence=0.5, **options), causal=True, **BLOCKS)
        _, strict = choose(q, k, AutoConfig(recall=budget, **options), causal=True, **BLOCKS)
        assert plain.index[0, head] == 0 and plain.recall[0, head].item() == pytest.approx(mean[head].item(), abs=1e-5)
        assert strict.index[0, head] == DENSE
    # And the probe recall it reports is the bound.
    _, choice = choose(q, k, AutoConfig(recall=0.01, **options), causal=True, **BLOCKS)
    assert torch.allclose(choice.recall[0].double(), bound, atol=1e-5)


def test_spread_probe_sees_a_candidate_the_last_query_probe_flatters():
    # tri_shape keeps its last query block dense: the last-query probe credits it with full recall.
    q, k, _ = random_qkv(1, 2, 2, 256, 256, 16, seed=3)
    k[:, :, 100:104] *= 5.0  # far keys that the middle rows need and the window drops
    flattered = (("tri_shape", {"sink_tokens": 16, "local_tokens": 32, "last_q_tokens": 16}),)
    last = AutoConfig(recall=0.9, candidates=flattered, probe="last", probe_queries=16)
    spread = AutoConfig(recall=0.9, candidates=flattered)  # the default probe
    _, by_last = choose(q, k, last, causal=True, **BLOCKS)
    _, by_spread = choose(q, k, spread, causal=True, **BLOCKS)
    assert by_last.index.tolist() == [[0, 0]] and by_last.recall.min().item() == pytest.approx(1.0)
    assert by_spread.index.tolist() == [[DENSE, DENSE]]


@pytest.mark.gpu
def test_spread_probe_on_cuda_matches_the_cpu_and_stays_small_at_128k():
    q, k, _ = random_qkv(1, 8, 2, 4099, 4099, 64, seed=0)
    k[:, :, 7] *= 4.0
    blocks = probe_blocks(-(-4099 // 128), 16)
    options = dict(query_blocks=blocks, rows=128, block_q=128, block_k=128, scale=64**-0.5, causal=True)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = q.to(dtype), k.to(dtype)
        cpu, counts = probe_block_mass(q.float(), k.float(), **options)  # the same (rounded) inputs in float32
        gpu, _ = probe_block_mass(q.cuda(), k.cuda(), **options)
        # Per probed block, the share of its mass on each KV block.
        error = ((gpu.cpu() - cpu) / counts.float()[:, None]).abs().max().item()
        assert error < (1e-4 if dtype == torch.float32 else 1e-2), (dtype, error)
    # 128K tokens, 32/8 heads, D 128, bf16: scores of one probed block and a few heads at a time.
    seq = 131072
    q = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, seq, 128, device="cuda", dtype=torch.bfloat16)
    blocks = probe_blocks(seq // 128, 16)
    options.update(query_blocks=blocks, scale=128**-0.5)
    probe_block_mass(q, k, **options)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    mass, counts = probe_block_mass(q, k, **options)
    end.record()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(
        f"spread probe at 128K (32/8 heads, D128, bf16): {start.elapsed_time(end):.1f} ms, {extra / 2**20:.0f} MiB extra"
    )
    assert extra < 2**30
    assert torch.allclose(mass.sum(-1), counts.float().cuda().expand_as(mass[..., 0]), rtol=1e-3)


def test_assembly_keeps_each_head_at_its_own_width():
    from sparse_attn.methods.auto import _Assembly

    geometry = dict(seq_q=96, seq_k=112, **BLOCKS)
    dense = sa.dense_pattern(**geometry)  # one head, batch 1: lists as wide as the row
    q, k, _ = random_qkv(2, 6, 3, 96, 112, 32, seed=1)
    narrow = sa.estimate(q, k, "streaming", sink_tokens=16, local_tokens=16, **BLOCKS)
    assembly = _Assembly(2, 6, dense.num_q_blocks, "cpu")
    assembly.write(narrow, torch.ones(2, 6, dtype=torch.bool))
    wide_head = torch.zeros(2, 6, dtype=torch.bool)
    wide_head[1, 4] = True
    assembly.write(dense, wide_head)
    widths = {key: indices.shape[-1] for key, (_, indices) in assembly.rows.items()}
    assert widths[(1, 4)] == dense.max_kv
    assert max(width for key, width in widths.items() if key != (1, 4)) == narrow.max_kv < dense.max_kv
    pattern = assembly.finish(geometry, causal=True)
    expected = narrow.expand_heads(6).to_mask().expand(2, -1, -1, -1).clone()
    expected[1, 4] = dense.to_mask()[0, 0]
    assert torch.equal(pattern.to_mask(), expected)
    assert not assembly.rows


def _causal_methods():
    from sparse_attn.registry import _REGISTRY

    return sorted(name for name, method in _REGISTRY.items() if not method.bidirectional and name != "auto")


# Rules built from the geometry alone (stream_pattern(..., static=True)): whole patterns under capture_rows.
STATIC_RULES = {"streaming", "power", "tri_shape"}


@pytest.mark.parametrize("name", _causal_methods())
def test_captured_rows_are_the_patterns_rows(name, small_chunks):
    """What auto judges a candidate on with ``density="probe"``: an estimator run inside
    ``capture_rows`` gives exactly the rows of its whole pattern at those query blocks."""
    from sparse_attn.methods.auto import pattern_rows
    from sparse_attn.ops.to_pattern import RowsCaptured, capture_rows

    q, k, _ = random_qkv(2, 6, 3, 300, 330, 32, seed=7)  # 19 query blocks: several chunks of anchor's 16
    spec = sa.get_method(name)
    try:
        pattern = sa.estimate(q, k, name, **BLOCKS)
    except ValueError:  # needs options the defaults do not give (gates, a token-level block size, ...)
        pytest.skip(f"{name} does not run at its defaults on this case")
    blocks = [0, 3, 9, pattern.num_q_blocks - 1]
    with capture_rows(blocks):
        try:
            result = spec.estimate(q, k, spec.make_config(), causal=True, **BLOCKS)
        except RowsCaptured as captured:
            result = captured.mask
    if isinstance(result, sa.BlockSparsePattern):  # not streamed, or a static rule: the whole pattern
        defaults = {candidate for candidate, _ in auto_module.DEFAULT_CANDIDATES}
        assert name not in defaults or name in STATIC_RULES, "default candidates that read scores stream"
        assert torch.equal(result.to_mask(), pattern.to_mask())
        return
    assert torch.equal(result.expand(2, -1, -1, -1), pattern_rows(pattern, blocks).expand(2, -1, -1, -1))


@pytest.mark.parametrize(
    "name", [n for n in _causal_methods() if sa.get_method(n).is_head_local(sa.get_method(n).make_config())]
)
def test_head_local_methods_give_a_group_the_same_lists_without_the_others(name):
    q, k, _ = random_qkv(2, 8, 4, 150, 170, 32, seed=8)
    full = sa.estimate(q, k, name, **BLOCKS).expand_heads(8).to_mask().expand(2, -1, -1, -1)
    part = sa.estimate(q[:, 2:6], k[:, 1:3], name, **BLOCKS).expand_heads(4).to_mask().expand(2, -1, -1, -1)
    assert torch.equal(part, full[:, 2:6])


def test_probe_density_runs_chosen_candidates_on_their_groups_only(monkeypatch, small_chunks):
    """With ``density="probe"`` a candidate estimates its whole pattern only where chosen: a
    head-local one on the GQA groups that chose it (runs of consecutive groups), the rest never."""
    q, k, _ = random_qkv(1, 8, 4, 96, 112, 32, seed=4)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    q[:, 2:6] += 3 * direction  # groups 1 and 2 attend to key 40, outside streaming's sink and window
    k[:, 1:3, 40] = 8 * direction
    calls = []
    original = auto_module._candidate_pattern

    def spy(name, options, q_, k_, *, capture=None, **kwargs):
        calls.append((name, q_.shape[1], capture is not None))
        return original(name, options, q_, k_, capture=capture, **kwargs)

    monkeypatch.setattr(auto_module, "_candidate_pattern", spy)
    pattern, choice = choose(q, k, AutoConfig(recall=0.8, candidates=CANDIDATES), causal=True, **BLOCKS)
    whole = [call for call in calls if not call[2]]
    assert len([call for call in calls if call[2]]) == len(CANDIDATES)  # each judged once on its probed rows
    chosen = {CANDIDATES[i][0] for i in choice.index.unique().tolist() if i != DENSE}
    # A static rule (streaming) gives its whole pattern when judged: it never runs again.
    assert {name for name, _, _ in whole} == chosen - STATIC_RULES and len(chosen - STATIC_RULES) > 1
    assert min(heads for _, heads, _ in whole) < 8  # some ran on a part of the heads
    for name, heads, _ in whole:  # only as many query heads as chose it, in whole groups
        positions = [i for i, (n, _) in enumerate(CANDIDATES) if n == name]
        groups = torch.isin(choice.index[0], torch.tensor(positions)).view(4, 2).any(1).sum().item()
        assert heads <= 2 * groups
    # The result equals each chosen candidate's own rows.
    for position in choice.index.unique().tolist():
        if position == DENSE:
            continue
        name, options = CANDIDATES[position]
        rows = sa.estimate(q, k, name, **BLOCKS, **options).expand_heads(8).to_mask()
        heads = choice.index == position
        assert torch.equal(pattern.to_mask()[heads], rows[heads])


def test_assembly_keeps_a_pattern_serving_every_head_whole_until_heads_are_replaced():
    from sparse_attn.methods.auto import _Assembly

    geometry = dict(seq_q=96, seq_k=112, **BLOCKS)
    q, k, _ = random_qkv(2, 6, 3, 96, 112, 32, seed=3)
    per_head = sa.estimate(q, k, "xattention", threshold=0.5, **BLOCKS)  # per query head, batch 2
    assert (per_head.batch, per_head.num_heads) == (2, 6)
    only = _Assembly(2, 6, per_head.num_q_blocks, "cpu")
    only.write(per_head, torch.ones(2, 6, dtype=torch.bool))
    assert only.whole is per_head and not only.rows
    assert only.finish(geometry, causal=True) is per_head  # no copy
    mixed = _Assembly(2, 6, per_head.num_q_blocks, "cpu")
    mixed.write(per_head, torch.ones(2, 6, dtype=torch.bool))
    replaced = torch.zeros(2, 6, dtype=torch.bool)
    replaced[0, 2] = True
    dense = sa.dense_pattern(**geometry)
    mixed.write(dense, replaced)
    assert mixed.whole is None and len(mixed.rows) == 12
    expected = per_head.to_mask().clone()
    expected[0, 2] = dense.to_mask()[0, 0]
    assert torch.equal(mixed.finish(geometry, causal=True).to_mask(), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_probe_through_the_last_query_kernel_matches_the_reference(monkeypatch, causal):
    """On CUDA the probe's block sums come from the last-query probe's kernel run on the sequence
    cut after each probed block; here that kernel runs in Triton's interpreter."""
    from sparse_attn.ops.last_query_probe import triton as probe_kernel

    q, k, _ = random_qkv(2, 6, 3, 80, 100, 32, seed=11)
    options = dict(query_blocks=[0, 2, 4], rows=12, block_q=16, block_k=16, scale=32**-0.5, causal=causal)
    expected, counts = probe_block_mass(q, k, **options)
    monkeypatch.setattr(auto_module, "kernel_for", lambda *args, **kwargs: probe_kernel)
    found, found_counts = probe_block_mass(q, k, **options)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(found_counts, counts)


def test_a_pattern_of_one_chunk_is_returned_whole_under_capture():
    """Where an estimator works in one chunk, capture_rows gets its whole pattern (one call over
    every row costs no more than a call per captured block) and auto judges it exactly."""
    from sparse_attn.ops.to_pattern import capture_rows

    q, k, _ = random_qkv(1, 4, 2, 96, 112, 32, seed=5)
    spec = sa.get_method("block_topk")
    with capture_rows([0, 5]):
        pattern = spec.estimate(q, k, spec.make_config(top_k=2), causal=True, **BLOCKS)
    assert isinstance(pattern, sa.BlockSparsePattern)
    assert torch.equal(pattern.to_mask(), sa.estimate(q, k, "block_topk", top_k=2, **BLOCKS).to_mask())
