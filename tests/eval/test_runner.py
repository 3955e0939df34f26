"""The grid and the runner on a tiny random Llama: rows, densities from ``record``, resuming."""

from __future__ import annotations

import json

import pytest

from sparse_attn.eval.grid import DENSE, MethodVariant, build_grid
from sparse_attn.eval.runner import Runner, load_results
from sparse_attn.eval.tasks import get_task

LENGTH = 256


def test_variant_parsing_and_labels():
    variant = MethodVariant.parse("xattention:threshold=0.8, stride=16")
    assert variant.name == "xattention"
    assert dict(variant.options) == {"threshold": 0.8, "stride": 16}
    assert variant.label == "xattention:stride=16,threshold=0.8"
    assert MethodVariant.parse("streaming").label == "streaming"
    assert MethodVariant.parse("block_topk:threshold=None").options == (("threshold", None),)


@pytest.mark.parametrize(
    ("text", "message"),
    [("nope", "unknown method"), ("xattention:thresh=0.8", "no option"), ("xattention:threshold", "OPTION=VALUE")],
)
def test_bad_variants_raise(text, message):
    with pytest.raises(ValueError, match=message):
        MethodVariant.parse(text)


def test_grid_leads_with_dense_and_skips_depth_for_perplexity():
    cases = build_grid(["passkey", "perplexity"], [MethodVariant("xattention")], [256, 512], [0.2, 0.8], [0, 1])
    assert cases[0].variant == MethodVariant(DENSE)
    assert len({c.variant for c in cases}) == 2
    # per variant: passkey 2 lengths x 2 depths x 2 seeds + perplexity 2 lengths x 2 seeds
    assert len(cases) == 2 * (8 + 4)
    assert all(c.depth is None for c in cases if c.task == "perplexity")
    assert len(build_grid(["niah"], [MethodVariant(DENSE)], [256], [0.5], [0])) == 1


def _runner(model, tokenizer, path) -> Runner:
    tasks = {name: get_task(name, haystack_source="pydoc") for name in ("passkey", "niah", "perplexity")}
    return Runner(model, tokenizer, model_name="tiny", tasks=tasks, results_path=path, backend="reference")


def test_runner_rows_have_scores_densities_and_timings(tiny_model, tokenizer, tmp_path):
    cases = build_grid(
        ["passkey", "perplexity"], [MethodVariant.parse("xattention:threshold=0.5")], [LENGTH], [0.5], [0]
    )
    rows = _runner(tiny_model, tokenizer, tmp_path / "results.jsonl").run(cases)
    assert [row["key"] for row in rows] == [_runner(tiny_model, tokenizer, tmp_path).key(c) for c in cases]
    for row in rows:
        assert row["length"] == LENGTH and row["prefill_s"] > 0
        # Both layers of the tiny Llama run the method (min_seq_len is the shortest prompt).
        assert row["method_layers"] == 2 and 0 < row["density"] <= 1
        if row["task"] == "passkey":
            assert row["score"] in (0.0, 1.0) and row["higher_is_better"] and row["answers"]
        else:
            assert row["score"] > 1 and not row["higher_is_better"]
    dense = [row for row in rows if row["method"] == DENSE]
    assert dense and all(row["density"] == 1.0 for row in dense)


def test_runner_resumes_without_duplicates(tiny_model, tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    cases = build_grid(["passkey", "niah"], [MethodVariant("streaming")], [LENGTH], [0.25, 0.75], [0])
    assert len(cases) == 8
    first = _runner(tiny_model, tokenizer, path).run(cases)
    assert len(first) == 8
    # An interrupted run: three finished rows and a line cut off mid-write.
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])

    runner = _runner(tiny_model, tokenizer, path)
    ran = []
    run_case = runner.run_case
    monkeypatch.setattr(runner, "run_case", lambda case: ran.append(case) or run_case(case))
    second = runner.run(cases)
    assert ran == cases[3:]
    keys = [row["key"] for row in load_results(path)]
    assert len(keys) == len(set(keys)) == 8
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert [row["score"] for row in second] == [row["score"] for row in first]

    ran.clear()
    assert len(runner.run(cases)) == 8 and ran == []
