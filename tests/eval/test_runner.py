"""The grid and the runner on a tiny random Llama: rows, densities from ``record``, resuming,
warm timings, the minimum prompt lengths and the KV cache handed to transformers."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch

from sparse_attn.eval.grid import DENSE, MethodVariant, build_grid
from sparse_attn.eval.report import summarize
from sparse_attn.eval.runner import Runner, greedy_generate, load_results
from sparse_attn.eval.tasks import TASK_NAMES, get_task

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


def test_grid_refuses_lengths_below_a_task_minimum():
    assert get_task("passkey").min_length == 256 and get_task("variable_tracking").min_length == 384
    with pytest.raises(ValueError, match=r"passkey needs at least 256 tokens \(got 100\)") as raised:
        build_grid(["passkey", "niah"], [], [100, 2048], [0.5], [0])
    assert "niah needs at least 256 tokens (got 100)" in str(raised.value)
    with pytest.raises(ValueError, match=r"variable_tracking needs at least 384 tokens \(got 256, 300\)"):
        build_grid(["passkey", "variable_tracking"], [], [256, 300], [0.5], [0])
    assert len(build_grid(["passkey", "variable_tracking"], [], [384], [0.5], [0])) == 2


@pytest.mark.parametrize("name", TASK_NAMES)
def test_minimum_length_holds_twice_the_fixed_text(tokenizer, name):
    # The rule of Task.min_length: two 128-token blocks at least, and the haystack's filler at
    # least as long as the task's fixed text (header, needles, question); the smallest such
    # multiple of 128 for this tokenizer or a larger one (another tokenizer needs more).
    task = get_task(name, haystack_source="pydoc")
    sample = task.make(tokenizer, task.min_length, 0.5 if task.uses_depth else None)
    start, end = sample.haystack_span
    filler = end - start - sum(stop - begin for begin, stop in sample.needle_spans)
    fixed = task.min_length - filler
    assert task.min_length % 128 == 0 and task.min_length >= 256 and filler >= fixed


class FirstCallPerSignatureIsSlow:
    """A forward pre-hook that sleeps on the first call of each kind (input length, cache use,
    logits kept), as a compiler or autotuner specializing on shapes and strides would."""

    def __init__(self, model, seconds: float) -> None:
        self.seconds, self.seen = seconds, set()
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        signature = (input_ids.shape[-1], kwargs.get("use_cache"), kwargs.get("logits_to_keep"))
        if signature not in self.seen:
            self.seen.add(signature)
            time.sleep(self.seconds)


SLOW_FIRST_CALL = 1.5  # far above a tiny prefill, even on a busy CPU


@pytest.mark.parametrize("warmup", [True, False])
def test_prefill_times_exclude_first_calls_or_show_no_speedup(tiny_model, tokenizer, tmp_path, warmup):
    cases = build_grid(["passkey", "perplexity"], [MethodVariant("streaming")], [LENGTH], [0.25, 0.75], [0])
    tasks = {name: get_task(name, haystack_source="pydoc") for name in ("passkey", "perplexity")}
    runner = Runner(
        tiny_model,
        tokenizer,
        model_name="tiny",
        tasks=tasks,
        results_path=tmp_path / "r.jsonl",
        backend="reference",
        warmup=warmup,
    )
    slow = FirstCallPerSignatureIsSlow(tiny_model, SLOW_FIRST_CALL)
    try:
        rows = runner.run(cases)
    finally:
        slow.handle.remove()
    summary = summarize(rows)
    if warmup:
        # The slow first call is a warm-up, reported apart; every timed prefill is fast.
        assert all(row["prefill_warm"] and row["prefill_s"] < SLOW_FIRST_CALL for row in rows)
        assert rows[0]["first_prefill_s"] >= SLOW_FIRST_CALL
        assert all(row["speedup"] is not None for row in summary)
    else:
        assert rows[0]["prefill_s"] >= SLOW_FIRST_CALL
        assert not any(row["prefill_warm"] for row in rows) and all(row["first_prefill_s"] is None for row in rows)
        assert all(row["speedup"] is None for row in summary)


def test_warm_up_stays_out_of_the_recorded_layers(tiny_model, tokenizer, tmp_path):
    cases = build_grid(["passkey"], [MethodVariant.parse("xattention:threshold=0.5")], [LENGTH], [0.5], [0])
    tasks = {"passkey": get_task("passkey")}
    rows = {}
    for warmup in (True, False):
        runner = Runner(
            tiny_model,
            tokenizer,
            model_name="tiny",
            tasks=tasks,
            results_path=tmp_path / f"{warmup}.jsonl",
            backend="reference",
            warmup=warmup,
        )
        rows[warmup] = runner.run(cases)
    for warm, cold in zip(rows[True], rows[False], strict=True):
        assert warm["method_layers"] == cold["method_layers"] and warm["density"] == cold["density"]
        assert warm["output"] == cold["output"]


def test_greedy_generate_matches_transformers_generate_without_deprecated_arguments(tiny_model, tokenizer):
    sample = get_task("niah").make(tokenizer, LENGTH, 0.5)
    input_ids = torch.tensor([sample.input_ids])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            tokens, seconds = greedy_generate(tiny_model, input_ids, 6, stop_ids=set())
    assert not [warning for warning in caught if "past_key_values" in str(warning.message)]
    with torch.inference_mode():
        expected = tiny_model.generate(input_ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert tokens == expected[0, LENGTH:].tolist() and seconds > 0
