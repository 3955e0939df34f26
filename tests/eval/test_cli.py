"""``sparse-attn eval`` and ``show`` end to end on a tiny local model directory (CPU)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from sparse_attn.cli import main  # noqa: E402


def _eval(model_dir, out, *extra):
    return main(
        ["eval", "--model", str(model_dir), "--device", "cpu", "--backend", "reference", "--tasks", "passkey", "niah",
         "--lengths", "256", "--depths", "0.5", "--out", str(out), *extra]
    )  # fmt: skip


def test_eval_writes_results_table_and_plots_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert _eval(tiny_model_dir, out, "--methods", "xattention", "--method-options", "xattention:threshold=0.5") == 0
    printed = capsys.readouterr().out
    assert "passkey on" in printed and "xattention:threshold=0.5" in printed and "speedup" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({row["label"] for row in rows}) == ["dense", "xattention", "xattention:threshold=0.5"]
    assert len(rows) == 6  # 3 variants x 2 tasks x 1 length x 1 depth
    for name in ("summary.json", "frontier.png", "needle_passkey.png", "needle_niah.png"):
        assert (out / name).stat().st_size > 0
    # A second run finds every case done and only rewrites the report.
    assert _eval(tiny_model_dir, out, "--methods", "xattention", "--method-options", "xattention:threshold=0.5") == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_eval_tables_are_printed_whole_off_a_terminal(tiny_model_dir, tmp_path, capsys):
    # Four lengths x three columns do not fit 80 columns; piped output must not cut cells to "…".
    argv = ["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--backend", "reference", "--tasks", "passkey",
            "--lengths", "128", "160", "192", "224", "--depths", "0.5", "--methods", "streaming",
            "--method-options", "streaming:local_tokens=64", "--out", str(tmp_path / "results")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("passkey on") :]
    assert "…" not in table
    assert "streaming:local_tokens=64" in table and "224 speedup" in table


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--methods", "xattention:bogus=1"], "no option"),
        (["--tasks", "trivia"], "unknown task 'trivia'"),
        (["--lengths", "4096"], "exceed the model's limit"),  # the tiny model allows 1024
        (["--depths", "1.5"], "depths within [0, 1]"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    ],
)
def test_eval_rejects_bad_arguments(tiny_model_dir, tmp_path, capsys, arguments, message):
    argv = ["eval", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path), *arguments]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_show_writes_a_block_mask_png(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "mask.png"
    argv = ["show", "--model", str(tiny_model_dir), "--device", "cpu", "--method", "xattention:threshold=0.5",
            "--length", "512", "--block-size", "64", "--out", str(path)]  # fmt: skip
    assert main(argv) == 0
    assert path.read_bytes().startswith(b"\x89PNG") and "density" in capsys.readouterr().out
    assert main(["show", "--model", str(tiny_model_dir), "--device", "cpu", "--layer", "7", "--out", str(path)]) == 2
