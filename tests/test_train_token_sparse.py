"""benchmarks/train_token_sparse.py --tiny on CPU: dense, MoBA and NSA train end to end from the
same weights on the same batches, the JSON holds what was returned, and a run cut by the time
budget caps the runs after it at the same step."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from helpers import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("train_token_sparse")


def test_tiny_runs_train_and_compare(script, tmp_path):
    out = tmp_path / "train.json"
    returned = script.main(["--device", "cpu", "--tiny", "--text", "pydoc", "--output", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(returned["rows"]))
    assert out.with_suffix(".png").is_file()
    runs = {row["run"]: row for row in data["rows"]}
    assert list(runs) == ["dense", "moba", "nsa"]
    for row in runs.values():
        assert row["final_step"] == 3 and not row["cut_by_budget"]
        assert len(row["train_loss"]) == len(row["train_loss_smoothed"]) == 3
        assert [step for step, _ in row["validation_loss"]] == [0, 2, 3]
        assert all(math.isfinite(x) for x in row["train_loss"] + [loss for _, loss in row["validation_loss"]])
        assert row["train_loss_smoothed"][-1] == pytest.approx(sum(row["train_loss"]) / 3)
    # MoBA ran in every layer through the engine, sparse (seq 256, blocks of 32, top 3).
    assert runs["moba"]["sparse_calls"] == 2 and runs["moba"]["sdpa_calls"] == 0
    assert 0.3 < runs["moba"]["pattern_density"] < 0.9
    assert runs["nsa"]["parameters"] > runs["dense"]["parameters"] == runs["moba"]["parameters"]
    comparison = data["meta"]["comparison"]
    assert comparison["step"] == 3
    dense_validation = runs["dense"]["validation_loss"][-1][1]
    for name, row in comparison["runs"].items():
        assert row["validation"] == runs[name]["validation_loss"][-1][1]
        assert row["validation_ratio"] == pytest.approx(row["validation"] / dense_validation)
        assert row["within_target"] == (row["validation_ratio"] <= script.TARGET_RATIO)


def test_budget_cut_caps_later_runs_and_full_moba_is_dense(script):
    # top_k 8 of 8 blocks: MoBA is dense causal attention, so with the same initial weights and
    # batches its losses are dense's (reference backend vs SDPA, float32).
    returned = script.main(
        ["--device", "cpu", "--tiny", "--text", "pydoc", "--runs", "dense", "moba", "--moba-top-k", "8",
         "--eval-every", "1", "--time-budget-s", "0"]
    )  # fmt: skip
    dense, moba = returned["rows"]
    assert dense["cut_by_budget"] and dense["final_step"] == 1
    assert moba["final_step"] == 1 and not moba["cut_by_budget"]
    assert moba["pattern_density"] == 1.0
    assert moba["train_loss"] == pytest.approx(dense["train_loss"], rel=1e-4)
    for (step, loss), (moba_step, moba_loss) in zip(dense["validation_loss"], moba["validation_loss"], strict=True):
        assert step == moba_step and moba_loss == pytest.approx(loss, rel=1e-4)
    assert returned["meta"]["comparison"]["step"] == 1
