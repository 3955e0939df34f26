"""benchmarks/e2e_shapes.py --quick on CPU: the JSON's structure, the arithmetic of its derived
columns, and that patterns keeping every block give the unpatched model's logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from helpers import load_benchmark  # noqa: E402

import sparse_attn as sa  # noqa: E402

PATCH = {"backend": "reference", "block_q": 64, "block_k": 64, "min_seq_len": 64}


def load_script():
    return load_benchmark("e2e_shapes")


@pytest.fixture(scope="module")
def script():
    return load_script()


def test_quick_run_json(script, tmp_path):
    # An estimators.py-style file: one row of tiny-llama's head shape at the quick length, one
    # of another shape (must be ignored), one at another length (no number there).
    estimation = tmp_path / "estimators.json"
    rows = [
        {"inputs": "structured", "seq": 512, "method": "xattention", "q_heads": 4, "kv_heads": 2, "head_dim": 64,
         "estimate_ms": 1.5},
        {"inputs": "structured", "seq": 512, "method": "flexprefill", "q_heads": 32, "kv_heads": 8, "head_dim": 128,
         "estimate_ms": 9.0},
        {"inputs": "structured", "seq": 1024, "method": "block_topk", "q_heads": 4, "kv_heads": 2, "head_dim": 64,
         "estimate_ms": 2.0},
    ]  # fmt: skip
    estimation.write_text(json.dumps({"meta": {"benchmark": "estimators"}, "rows": rows}))
    out = tmp_path / "e2e_shapes.json"
    returned = script.main(["--quick", "--device", "cpu", "--output", str(out), "--estimation-json", str(estimation)])
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(returned["rows"]))
    meta = data["meta"]
    assert meta["note"] == "random weights: speed only" and meta["dtype"] == "float32"
    assert meta["parts"] == ["ttft", "decode"] and meta["skipped"] == []

    # Patterns that keep every block: the patched model ran the method on every full-attention
    # layer at density 1 and its logits equal the unpatched ones at every position.
    checks = meta["checks"]
    assert {(c["shape"], c["method"]) for c in checks} == {
        (shape, method) for shape in ("tiny-llama", "tiny-gemma3") for method in ("random", "tri_shape")
    }
    for check in checks:
        assert check["method_layers"] == check["full_attention_layers"] != []
        assert check["density"] == 1.0
        assert check["max_rel_diff"] <= 1e-4, check

    ttft = [row for row in data["rows"] if row["part"] == "ttft"]
    expected = [("sdpa", None), ("no-attn", None)] + [(m, d) for m in ("random", "tri_shape") for d in (0.05, 0.1, 0.2)]
    assert [(row["config"], row["target_density"]) for row in ttft] == expected
    by_config = {(row["config"], row["target_density"]): row for row in ttft}
    sdpa, noop = by_config["sdpa", None], by_config["no-attn", None]
    for row in ttft:
        assert row["shape"] == "tiny-llama" and row["length"] == 512
        assert len(row["ttft_runs_ms"]) == 2 and row["ttft_ms"] > 0
        assert row["speedup_vs_sdpa"] == pytest.approx(sdpa["ttft_ms"] / row["ttft_ms"])
        if row["config"] != "no-attn":
            assert row["attention_ms"] == pytest.approx(row["ttft_ms"] - noop["ttft_ms"])
            assert row["attention_share"] == pytest.approx(row["attention_ms"] / row["ttft_ms"])
        if row["config"] in ("random", "tri_shape"):
            assert 0 < row["density"] < 1 and row["pattern_ms"] >= 0
        if row["config"] == "random":  # 4 full-attention layers x the 1.5 ms of the matching row only
            assert row["with_estimation_ms"] == {"xattention": pytest.approx(row["ttft_ms"] + 4 * 1.5)}
            assert row["with_xattention_x"] == pytest.approx(sdpa["ttft_ms"] / row["with_estimation_ms"]["xattention"])
    assert sdpa["sdpa_mask"] == "none (SDPA is_causal)"
    assert by_config["tri_shape", 0.2]["options"]["local_tokens"] % 64 == 0

    decode = [row for row in data["rows"] if row["part"] == "decode"]
    configs = ["sdpa", "paged-dense", "quest", "tidaldecode", "streaming"]
    assert [(row["shape"], row["config"]) for row in decode] == [
        (shape, config) for shape in ("tiny-llama", "tiny-gemma3") for config in configs
    ]
    for row in decode:
        assert row["prompt"] == 512 and row["new_tokens"] == 8
        assert row["prefill_s"] > 0 and row["decode_s"] > 0 and row["ms_per_step"] > 0
        assert row["decode_tokens_per_s"] == pytest.approx(7 / row["decode_s"])
        assert row.get("token_budget") == (128 if row["config"] in configs[2:] else None)


def test_a_pattern_missing_blocks_changes_the_logits(script):
    """The full-pattern check can fail: at density 0.3 the same comparison sees a difference."""
    with torch.no_grad():
        model = script.build_model("tiny-llama", device=torch.device("cpu"), dtype=torch.float32)
        ids = script.random_ids(model, 257, torch.device("cpu"), seed=3)  # not a multiple of the block
        (random_check, _) = script.full_pattern_check(model, ids, PATCH)
        assert random_check["max_rel_diff"] <= 1e-4 and random_check["method_layers"] == [0, 1, 2, 3]
        expected = model(ids).logits
        sa.patch(model, "random", density=0.3, **PATCH)
        got = model(ids).logits
        sa.unpatch(model)
        assert float((got - expected).abs().max()) > 1e-2 * float(expected.abs().max())


def test_budget_skips_and_bad_shape(script, tmp_path):
    out = tmp_path / "r.json"
    argv = "--quick --device cpu --only decode --shapes tiny-llama --budget 0".split() + ["--output", str(out)]
    result = script.main(argv)
    assert result["rows"] == []
    assert len(result["meta"]["skipped"]) == 5 and all("budget" in s for s in result["meta"]["skipped"])
    assert json.loads(out.read_text())["meta"]["skipped"] == result["meta"]["skipped"]
    with pytest.raises(ValueError, match="shape must be one of"):
        script.build_model("llama-70b", device=torch.device("cpu"), dtype=torch.float32)
