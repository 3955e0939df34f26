"""benchmarks/recall_frontier.py on CPU: its true recall against a brute-force dense softmax, its
per-layer rows against the library's own density and recall, and the arithmetic of its summaries."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark, token_mask

import sparse_attn as sa

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_frontier.py"


@pytest.fixture(scope="module")
def script():
    return load_benchmark("recall_frontier")


def peaked_qk(q_heads, kv_heads, seq_q, seq_k, dim, seed):
    """q/k sharing a direction (peaked, uneven attention: recall differs from density)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=generator)
    q = torch.randn(1, q_heads, seq_q, dim, generator=generator) + 1.5 * shared
    k = torch.randn(1, kv_heads, seq_k, dim, generator=generator) + 1.5 * shared
    return q, k


def brute_force_recall(q, k, pattern, scale):
    """Float64 ``(Hq, Sq)``: per query, the dense causal softmax mass inside the pattern's keys."""
    q_heads, seq_q, seq_k = q.shape[1], q.shape[2], k.shape[2]
    keys = k.double().repeat_interleave(q_heads // k.shape[1], 1)
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    causal = torch.arange(seq_k)[None, :] <= torch.arange(seq_q)[:, None] + (seq_k - seq_q)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return (probs * token_mask(pattern, 1, q_heads, causal=True)).sum(-1)[0]


@pytest.mark.parametrize(
    "q_heads, kv_heads, seq_q, seq_k, dim",
    [(6, 2, 301, 301, 16), (5, 5, 200, 263, 8)],
)
def test_head_recall_matches_a_brute_force_dense_softmax(script, q_heads, kv_heads, seq_q, seq_k, dim):
    q, k = peaked_qk(q_heads, kv_heads, seq_q, seq_k, dim, seed=seq_q)
    scale = 0.7 * dim**-0.5
    patterns = [
        # per query head, 32 x 32 blocks
        sa.random_pattern(heads=q_heads, seq_q=seq_q, seq_k=seq_k, density=0.4, block_q=32, block_k=32, seed=1),
        # per KV head, unequal blocks
        sa.random_pattern(heads=kv_heads, seq_q=seq_q, seq_k=seq_k, density=0.5, block_q=16, block_k=48, seed=2),
        # shared by all heads, token-level rows (moba's geometry)
        sa.random_pattern(heads=1, seq_q=seq_q, seq_k=seq_k, density=0.3, block_q=1, block_k=16, seed=3),
        sa.dense_pattern(seq_q=seq_q, seq_k=seq_k, block_q=64, block_k=64),
    ]
    recall, per_chunk = script.head_recall(q, k, patterns, scale=scale, rows=64)
    assert recall.shape == (len(patterns), q_heads) and recall.dtype == torch.float64
    assert per_chunk.shape == (len(patterns), q_heads, -(-seq_q // 64))
    for index, pattern in enumerate(patterns):
        exact = brute_force_recall(q, k, pattern, scale)
        assert float((recall[index] - exact.mean(-1)).abs().max()) < 2e-6
        chunks = torch.stack([exact[:, start : start + 64].mean(-1) for start in range(0, seq_q, 64)], -1)
        assert float((per_chunk[index] - chunks).abs().max()) < 2e-6
        if pattern.block_q > 1:  # the reference backend runs token-level rows one query at a time: slow
            assert float(exact.mean()) == pytest.approx(sa.metrics.recall(q, k, pattern, scale=scale), abs=1e-5)
    assert torch.allclose(recall[-1], torch.ones(q_heads, dtype=torch.float64), atol=1e-6)
    # Sparse patterns on peaked attention lose mass, unevenly across heads.
    assert float(recall[0].max()) < 0.99 and float(recall[0].max() - recall[0].min()) > 1e-3


def test_head_recall_rejects_mismatched_inputs(script):
    q, k = peaked_qk(2, 1, 64, 64, 8, seed=0)
    pattern = sa.dense_pattern(seq_q=32, seq_k=32, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="does not fit"):
        script.head_recall(q, k, [pattern], scale=1.0)
    with pytest.raises(ValueError, match="batch 1"):
        script.head_recall(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), [pattern], scale=1.0)


def test_layer_rows_agree_with_the_library(script):
    q, k = peaked_qk(4, 2, 640, 640, 32, seed=5)
    streaming = ("streaming", {"sink_tokens": 128, "local_tokens": 256})
    topk = ("block_topk", {"top_k": 2})
    chosen = [
        ("dense", {}),
        streaming,
        topk,
        ("xattention", {"threshold": 0.9}),
        ("auto", {"recall": 0.9, "candidates": (streaming, topk)}),
    ]
    rows, _ = script.evaluate_layer(q, k, chosen, scale=32**-0.5)
    by_setting = {row["setting"]: row for row in rows}
    assert by_setting["dense()"]["density"] == [1.0] * 4
    assert by_setting["dense()"]["recall"] == pytest.approx([1.0] * 4, abs=1e-6)
    for name, options in chosen[1:4]:
        pattern = sa.estimate(q, k, name, block_q=128, block_k=128, **options)
        row = by_setting[script.label(name, options)]
        assert sum(row["density"]) / 4 == pytest.approx(pattern.density(), abs=1e-9)
        assert sum(row["recall"]) / 4 == pytest.approx(sa.metrics.recall(q, k, pattern), abs=1e-5)
    auto = next(row for row in rows if row["method"] == "auto")
    assert len(auto["chosen"]) == len(auto["probe_recall"]) == 4
    for head, name in enumerate(auto["chosen"]):  # each head runs its chosen candidate's rows
        source = by_setting["dense()" if name == "dense" else name]
        assert auto["density"][head] == pytest.approx(source["density"][head])
        assert auto["recall"][head] == pytest.approx(source["recall"][head], abs=1e-6)
        assert name == "dense" or auto["probe_recall"][head] >= 0.9


def test_summaries_pick_the_cheapest_setting_meeting_the_target(script):
    def row(method, setting, density, recall):
        return {"method": method, "setting": setting, "density": density, "recall": recall}

    cheap, costly = "cheap()", "costly()"
    rows = [
        row("cheap", cheap, [0.2] * 20, [0.93] * 19 + [0.5]),  # 95 % of heads meet 0.9
        row("costly", costly, [0.6] * 20, [0.99] * 20),
        row("auto", "auto(recall=0.9)", [0.3] * 20, [0.92] * 18 + [0.8] * 2),
        row("auto", "auto(recall=0.95)", [0.5] * 20, [0.96] * 20),
    ]
    for entry in rows[2:]:
        entry["chosen"] = [cheap] * 20
        entry["probe_recall"] = [0.97] * 20
    summary = script.summarize(rows)
    assert [s["setting"] for s in summary] == [cheap, costly, "auto(recall=0.9)", "auto(recall=0.95)"]
    assert summary[0]["share_0.9"] == pytest.approx(0.95) and summary[0]["share_0.95"] == 0.0
    assert summary[0]["recall"] == pytest.approx((0.93 * 19 + 0.5) / 20)
    result = script.compare_auto(rows, summary, candidates=[cheap, costly])
    at_90, at_95 = result
    assert at_90["best_single"]["setting"] == cheap and at_90["auto_meets_budget"] is False
    assert at_90["best_auto_candidate"]["setting"] == cheap and at_90["best_training_free"]["setting"] == cheap
    assert at_90["auto_cheaper"] is False
    # Per head the oracle takes `cheap` where it meets 0.9 and `costly` on the last head.
    assert at_90["oracle"]["density"] == pytest.approx((0.2 * 19 + 0.6) / 20)
    assert at_95["best_single"]["setting"] == costly and at_95["auto_meets_budget"] is True
    assert at_95["auto_cheaper"] is True
    assert at_95["probe_vs_true"]["mean_probe_minus_true"] == pytest.approx(0.01)
    assert script.interpolate([(0.1, 0.8), (0.5, 1.0)], 0.2) == pytest.approx(0.85)
    assert script.interpolate([(0.1, 0.8), (0.5, 1.0)], 0.6) is None


def test_replayed_probes_choose_by_their_own_chunks(script):
    # One layer, one head, 16 chunks. `flattered` looks perfect on the last chunk only; `even` is
    # uniformly good but costlier; the 16-chunk rules see through `flattered`.
    def row(setting, density, recall, chunks):
        return {
            "model": "m",
            "layer": 0,
            "setting": setting,
            "method": setting[:-2],
            "density": [density],
            "recall": [recall],
            "chunk_recall": [chunks],
        }

    rows = [row("flattered()", 0.2, 0.80, [0.79] * 15 + [0.99]), row("even()", 0.5, 0.95, [0.95] * 16)]
    replay = script.simulate_selection(rows, ["flattered()", "even()"], 0.9)
    assert replay["last chunk (auto's probe)"]["density"] == 0.2
    assert replay["last chunk (auto's probe)"]["share_0.9"] == 0.0
    assert replay["16 evenly spaced chunks"]["density"] == 0.5
    assert replay["16 evenly spaced chunks"]["probe_queries"] == 16 * 128
    # A noisy candidate whose mean passes but whose lower bound does not: the bound falls back to dense.
    rows = [row("noisy()", 0.3, 0.91, [0.99, 0.83] * 8)]
    replay = script.simulate_selection(rows, ["noisy()"], 0.9)
    assert replay["16 evenly spaced chunks"]["density"] == 0.3
    bound = replay["16 evenly spaced chunks, 95% lower bound"]
    assert bound["density"] == 1.0 and bound["recall"] == 1.0


def test_auto_settings_per_probe_share_the_layers_candidate_patterns(script, monkeypatch):
    q, k = peaked_qk(4, 2, 640, 640, 32, seed=6)
    streaming = ("streaming", {"sink_tokens": 128, "local_tokens": 256})
    topk = ("block_topk", {"top_k": 2})
    extra = ("xattention", {"threshold": 0.5})  # a candidate the layer did not estimate itself
    candidates = (streaming, topk, extra)
    chosen = [streaming, topk] + [
        ("auto", {"recall": 0.9, "candidates": candidates, "probe": probe}) for probe in ("last", "spread")
    ]
    calls = []
    original = script.auto_module._candidate_pattern

    def counting(name, options, *args, **kwargs):
        calls.append(name)
        return original(name, options, *args, **kwargs)

    monkeypatch.setattr(script.auto_module, "_candidate_pattern", counting)
    rows, _ = script.evaluate_layer(q, k, chosen, scale=32**-0.5)
    # The shared ones are not estimated again; the other is judged on its probed rows once per auto
    # setting, then estimated on the GQA groups that chose it (if any).
    assert set(calls) == {"xattention"} and 2 <= len(calls) <= 4
    monkeypatch.setattr(script.auto_module, "_candidate_pattern", original)
    for row, (_, options) in zip(rows[2:], chosen[2:], strict=True):
        _, choice = script.choose(
            q, k, sa.get_method("auto").make_config(**options), causal=True, block_q=128, block_k=128
        )
        assert row["chosen"] == choice.names(0) and row["probe_recall"] == choice.recall[0].tolist()
        assert row["options"] == {"recall": 0.9, "probe": options["probe"]}


def test_settings_prompts_and_per_probe_comparisons(script):
    names = [script.label(name, options) for name, options in script.settings("gemma3-270m", only_candidates=True)]
    candidates = [script.label(name, options) for name, options in script.DEFAULT_CANDIDATES]
    assert names == ["dense()", *candidates, "auto(recall=0.9)", "auto(recall=0.95)"]
    probed = script.settings("smollm2-135m", probes=["last", "spread"])
    autos = [options for name, options in probed if name == "auto"]
    assert autos == [{"recall": t, "probe": p} for t in (0.9, 0.95) for p in ("last", "spread")]
    assert any(name == "seer" for name, _ in probed)
    assert script.parse_prompt("variable_tracking:0.2:1") == {"task_name": "variable_tracking", "depth": 0.2, "seed": 1}
    with pytest.raises(Exception, match="TASK:DEPTH:SEED"):
        script.parse_prompt("niah:0.5")

    def row(method, setting, density, recall, options):
        entry = {"method": method, "setting": setting, "density": density, "recall": recall, "options": options}
        if method == "auto":
            entry["chosen"], entry["probe_recall"] = ["cheap()"] * 20, [0.95] * 20
        return entry

    rows = [
        row("cheap", "cheap()", [0.2] * 20, [0.93] * 18 + [0.5] * 2, {}),
        row("costly", "costly()", [0.6] * 20, [0.99] * 20, {}),
        row(
            "auto",
            "auto(probe=last, recall=0.9)",
            [0.2] * 20,
            [0.93] * 18 + [0.5] * 2,
            {"recall": 0.9, "probe": "last"},
        ),
        row("auto", "auto(probe=spread, recall=0.9)", [0.4] * 20, [0.95] * 20, {"recall": 0.9, "probe": "spread"}),
    ]
    at_90 = script.compare_auto(rows, script.summarize(rows), candidates=["cheap()", "costly()"])[0]
    verdicts = {v["setting"]: v for v in at_90["auto_settings"]}
    assert list(verdicts) == ["auto(probe=last, recall=0.9)", "auto(probe=spread, recall=0.9)"]
    assert verdicts["auto(probe=last, recall=0.9)"]["meets_budget"] is False
    spread = verdicts["auto(probe=spread, recall=0.9)"]
    assert spread["meets_budget"] is True and spread["cheaper_than_best_single"] is True  # costly() at 0.6
    assert spread["share_0.9"] == 1.0 and spread["misses"]["cheap()"]["missed"] == 0
    cases = script.auto_cases({"m": {"auto": [at_90]}})
    assert cases["auto(probe=last)"]["met"] == 0 and cases["auto(probe=last)"]["cases"] == 1
    assert cases["auto(probe=spread)"]["met"] == cases["auto(probe=spread)"]["met_and_cheaper"] == 1


def test_needle_recall_counts_the_last_rows_mass_on_the_needle():
    """benchmarks/needle_recall.py: a pattern that keeps the needle's block keeps its mass, one
    that drops it keeps none; the last rows' recall of a dense pattern is 1."""
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("needle_recall", SCRIPT.parent / "needle_recall.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    seq, dim, block = 256, 16, 64
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, seq, dim, generator=generator)
    k = torch.randn(1, 2, seq, dim, generator=generator)
    k[:, :, 70:74] = 3.0 * q[:, ::2, -1:].mean(2, keepdim=True)  # the last rows look at the needle
    spans = [[70, 74]]
    dense = sa.dense_pattern(seq_q=seq, block_q=block, block_k=block)
    indices, counts = dense.kv_indices.clone(), dense.kv_counts.clone()
    indices[0, 0, -1, :3] = torch.tensor([0, 2, 3])  # the last query block without the needle's block 1
    counts[0, 0, -1] = 3
    dropped = sa.BlockSparsePattern(
        kv_counts=counts, kv_indices=indices, block_q=block, block_k=block, seq_q=seq, seq_k=seq
    )
    result = module.needle_rows(q, k, dim**-0.5, spans, {"dense": dense, "dropped": dropped})
    assert min(result["needle_mass"]) > 0.05
    assert result["dense"]["last_rows_recall"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert result["dense"]["needle_mass_kept"] == pytest.approx(result["needle_mass"], abs=1e-6)
    assert result["dense"]["needle_tokens_kept"] == [1.0] * 4
    assert result["dropped"]["needle_mass_kept"] == [0.0] * 4 and result["dropped"]["needle_tokens_kept"] == [0.0] * 4
