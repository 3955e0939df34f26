"""``sparse-attn eval``, ``show`` and ``bench`` end to end on a tiny local model directory (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from sparse_attn import cli  # noqa: E402
from sparse_attn.cli import main  # noqa: E402
from sparse_attn.eval.grid import MethodVariant, build_grid  # noqa: E402
from sparse_attn.eval.runner import Runner  # noqa: E402


def _eval(model_dir, out, *extra):
    return main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--backend",
            "reference",
            "--tasks",
            "passkey",
            "niah",
            "--lengths",
            "256",
            "--depths",
            "0.5",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_eval_writes_results_table_and_plots_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert _eval(tiny_model_dir, out, "--methods", "xattention", "--method-options", "xattention:threshold=0.5") == 0
    printed = capsys.readouterr().out
    assert "passkey on" in printed and "xattention:threshold=0.5" in printed and "speedup" in printed
    # Where the results went, as a full path on one line.
    assert f"results go to {(out / 'results.jsonl').resolve()}" in printed
    assert f"results: {(out / 'results.jsonl').resolve()}" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({row["label"] for row in rows}) == ["dense", "xattention", "xattention:threshold=0.5"]
    assert len(rows) == 6  # 3 variants x 2 tasks x 1 length x 1 depth
    for name in ("summary.json", "frontier.png", "needle_passkey.png", "needle_niah.png"):
        assert (out / name).stat().st_size > 0
    # A second run finds every case done and only rewrites the report.
    assert _eval(tiny_model_dir, out, "--methods", "xattention", "--method-options", "xattention:threshold=0.5") == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_eval_no_warmup_skips_the_untimed_prefill(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    warm_up = Runner._warm_up

    def counted(self, *args):
        calls.append(1)
        return warm_up(self, *args)

    monkeypatch.setattr(Runner, "_warm_up", counted)
    out = tmp_path / "results"
    assert _eval(tiny_model_dir, out, "--methods", "xattention", "--no-warmup") == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not calls and not any(row["prefill_warm"] for row in rows)
    assert all(0.0 <= row["score"] <= 1.0 for row in rows)


def test_eval_tables_are_printed_whole_off_a_terminal(tiny_model_dir, tmp_path, capsys):
    # Four lengths x three columns do not fit 80 columns; piped output must not cut cells to "…".
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--backend",
        "reference",
        "--tasks",
        "passkey",
        "--lengths",
        "256",
        "288",
        "320",
        "352",
        "--depths",
        "0.5",
        "--methods",
        "streaming",
        "--method-options",
        "streaming:local_tokens=64",
        "--out",
        str(tmp_path / "results"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("passkey on") :]
    assert "…" not in table
    assert "streaming:local_tokens=64" in table and "352 speedup" in table


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--methods", "xattention:bogus=1"], "no option"),
        (["--tasks", "trivia"], "unknown task 'trivia'"),
        (["--lengths", "4096"], "exceed the model's limit"),  # the tiny model allows 1024
        (["--depths", "1.5"], "depths within [0, 1]"),
        (["--lengths", "100", "512"], "passkey needs at least 256 tokens (got 100)"),
        (["--model", "no-such-model"], "unknown model name 'no-such-model'"),
        (["--model", "/no/such/model-dir"], "model path not found: '/no/such/model-dir'"),
    ],
)
def test_eval_rejects_bad_arguments(tiny_model_dir, tmp_path, capsys, arguments, message):
    argv = ["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path), *arguments]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_too_short_lengths_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load_checked", no_model_work)
    argv = [
        "eval",
        "--device",
        "cpu",
        "--tasks",
        "passkey",
        "variable_tracking",
        "--lengths",
        "100",
        "300",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "passkey needs at least 256 tokens (got 100)" in error
    assert "variable_tracking needs at least 384 tokens (got 100, 300)" in error
    assert not (tmp_path / "results.jsonl").exists()


def test_ctrl_c_during_eval_says_how_to_resume(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results"
    run_case, started = Runner.run_case, []

    def interrupted_on_the_third_case(self, case):
        started.append(case)
        if len(started) == 3:
            raise KeyboardInterrupt
        return run_case(self, case)

    monkeypatch.setattr(Runner, "run_case", interrupted_on_the_third_case)
    assert _eval(tiny_model_dir, out, "--methods", "streaming") == 130
    captured = capsys.readouterr()
    assert "interrupted after 2 cases" in captured.err and "rerun the same command to resume" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len((out / "results.jsonl").read_text().splitlines()) == 2

    monkeypatch.setattr(Runner, "run_case", run_case)
    assert _eval(tiny_model_dir, out, "--methods", "streaming") == 0
    keys = [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4  # 2 variants x 2 tasks, none run twice


def test_bench_reports_progress_the_ratio_and_where_rows_went(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--lengths", "256", "384", "--densities", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] seq 256" in printed and "[2/2] seq 384" in printed
    assert "flex vs sdpa (x faster)" in printed and "x faster = sdpa ms / the backend's ms" in printed
    assert f"wrote the rows to {out.resolve()}" in printed
    assert len(json.loads(out.read_text())["rows"]) == 2


def test_bench_says_when_nothing_is_saved(capsys):
    assert main(["bench", "--device", "cpu", "--lengths", "256", "--densities", "1.0"]) == 0
    assert "nothing was saved: add --out FILE.json" in capsys.readouterr().out


def test_bench_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "Time the block-sparse backends" in capsys.readouterr().out


def test_eval_help_states_the_measured_quick_run(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    variants = [MethodVariant.parse(name) for name in cli.QUICK_METHODS]
    quick_cases = build_grid(cli.DEFAULT_TASKS, variants, cli.QUICK_LENGTHS, cli.QUICK_DEPTHS, [0])
    assert f"{len(quick_cases)} cases, measured at" in text and "on a 2-core" in text
    assert "rerunning the same command resumes it" in text


def test_default_results_folder_is_git_ignored():
    ignored = (Path(__file__).parents[2] / ".gitignore").read_text().splitlines()
    assert f"{cli.DEFAULT_OUT}/" in ignored


def test_show_writes_a_block_mask_png(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "mask.png"
    argv = [
        "show",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--method",
        "xattention:threshold=0.5",
        "--length",
        "512",
        "--block-size",
        "64",
        "--out",
        str(path),
    ]
    assert main(argv) == 0
    assert path.read_bytes().startswith(b"\x89PNG") and "density" in capsys.readouterr().out
    assert main(["show", "--model", str(tiny_model_dir), "--device", "cpu", "--layer", "7", "--out", str(path)]) == 2
