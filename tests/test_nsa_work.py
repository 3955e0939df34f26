"""benchmarks/nsa_work.py: its pair counts against the module's own patterns and visibility rule."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark

from sparse_attn.nn import NativeSparseAttention
from sparse_attn.ops.compressed_scores import visible_count


def test_pair_counts_match_the_module():
    script = load_benchmark("nsa_work")
    seq = 700  # 11 selection blocks: with a top 4, later tokens keep 4 of their visible blocks
    counts = script.pair_counts(seq)
    n_cmp = (seq - 32) // 16 + 1
    assert counts["compressed"] == sum(visible_count(t, 32, 16, n_cmp) for t in range(seq))
    assert counts["window"] == sum(min(512, t + 1) for t in range(seq))
    assert counts["dense"] == seq * (seq + 1) // 2
    # The selected branch's pattern: every listed block whole except the token's own (causal inside it).
    module = NativeSparseAttention(32, 4, 2, select_top_n=4)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, seq, 32, generator=generator) for h in (4, 2, 2))
    pattern = module.selected_pattern(q, k, v)
    listed = pattern.kv_counts[0, 0].long()
    positions = torch.arange(seq)
    pairs = int(((listed - 1) * 64 + positions % 64 + 1).sum())
    assert script.pair_counts(seq, top_n=4)["selected"] == pairs


def test_main_prices_a_result(tmp_path, monkeypatch):
    script = load_benchmark("nsa_work")
    row = dict(case="nsa-module", seq=4096, q_heads=64, kv_heads=4, head_dim=128, cudnn_fwd_ms=2.0, ours_fwd_ms=1.0,
               parts_fwd_ms=dict(compressed_branch=0.5))  # fmt: skip
    source = tmp_path / "result.json"
    source.write_text(json.dumps(dict(meta={}, rows=[row])))
    output = tmp_path / "work.json"
    monkeypatch.setattr("sys.argv", ["nsa_work.py", "--results", str(source), "--output", str(output)])
    script.main()
    rows = json.loads(output.read_text())["rows"]
    steps = {r["step"]: r for r in rows}
    dense = 4 * 128 * 64 * 4096 * 4097 // 2
    rate = dense / 2.0e-3
    assert steps["compressed_branch"]["ideal_ms"] == pytest.approx(
        script.pair_counts(4096)["compressed"] * 4 * 128 * 64 / rate * 1e3
    )
    assert steps["compressed_branch"]["measured_over_ideal"] > 0
    total = sum(r["ideal_ms"] for r in rows if r["step"] != "forward")
    assert steps["forward"]["ideal_ms"] == pytest.approx(total)
    assert steps["forward"]["ideal_speedup_vs_cudnn"] == pytest.approx(2.0 / total)
