"""Summaries, tables and PNG plots (frontier, needle heatmaps, block mask) from a tiny model's real rows."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from PIL import Image  # noqa: E402  (matplotlib depends on Pillow)

from sparse_attn.eval.grid import MethodVariant, build_grid  # noqa: E402
from sparse_attn.eval.report import summarize, tables, write_report  # noqa: E402
from sparse_attn.eval.runner import Runner  # noqa: E402
from sparse_attn.eval.show import full_attention_layers, show_block_mask  # noqa: E402
from sparse_attn.eval.tasks import get_task  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(label, length, score, density, prefill, *, task="niah", depth=0.5, higher=True, warm=True):
    return {
        "task": task,
        "label": label,
        "method": label.split(":")[0],
        "options": {},
        "length": length,
        "depth": depth,
        "score": score,
        "density": density,
        "prefill_s": prefill,
        "prefill_warm": warm,
        "first_prefill_s": 10 * prefill if warm else None,
        "higher_is_better": higher,
    }


def test_summary_relative_scores_and_speedups():
    rows = [
        _row("dense", 1024, 1.0, 1.0, 2.0),
        _row("dense", 1024, 0.5, 1.0, 4.0, depth=0.9),
        _row("xattention", 1024, 0.5, 0.4, 1.0),
        _row("xattention", 1024, 0.25, 0.2, 1.0, depth=0.9),
        _row("dense", 1024, 10.0, 1.0, 2.0, task="perplexity", depth=None, higher=False),
        _row("xattention", 1024, 12.5, 0.5, 1.0, task="perplexity", depth=None, higher=False),
    ]
    summary = {(row["task"], row["label"]): row for row in summarize(rows)}
    sparse = summary[("niah", "xattention")]
    assert sparse["cases"] == 2 and sparse["score"] == pytest.approx(0.375) and sparse["density"] == pytest.approx(0.3)
    assert sparse["relative_score"] == pytest.approx(0.5) and sparse["speedup"] == pytest.approx(3.0)
    assert summary[("perplexity", "xattention")]["relative_score"] == pytest.approx(0.8)
    assert summary[("niah", "dense")]["relative_score"] == 1.0
    assert sparse["prefill_warm"] and sparse["first_prefill_s"] == pytest.approx(10.0)


@pytest.mark.parametrize("cold", ["dense", "xattention"])
def test_no_speedup_from_a_timing_that_was_not_warm(cold):
    # One case of either side timed without its warm-up: dense's row of an older run without
    # the field, or a method's row with the warm-up off.
    rows = [
        _row("dense", 1024, 1.0, 1.0, 2.0),
        _row("dense", 1024, 1.0, 1.0, 2.0, depth=0.9, warm=cold != "dense"),
        _row("xattention", 1024, 1.0, 0.4, 1.0),
        _row("xattention", 1024, 1.0, 0.4, 1.0, depth=0.9, warm=cold != "xattention"),
    ]
    if cold == "dense":
        del rows[1]["prefill_warm"]
    summary = summarize(rows)
    assert [row["speedup"] for row in summary] == [None if cold == "dense" else 1.0, None]
    table = tables(summary, model="m")[0]
    speedups = [cell for column in table.columns if column.header.endswith("speedup") for cell in column.cells]
    assert speedups == ["-" if cold == "dense" else "1.00x", "-"]
    assert "timed warm" in table.caption


def _assert_png(path, min_width=200, min_height=150):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width >= min_width and image.height >= min_height


@pytest.fixture(scope="module")
def tiny_rows(tiny_model, tokenizer, tmp_path_factory):
    """Real rows from the tiny model: two needle tasks, two lengths, two depths, dense and two variants."""
    variants = [
        MethodVariant.parse("xattention:threshold=0.5"),
        MethodVariant.parse("xattention:threshold=0.9"),
        MethodVariant("streaming"),
    ]
    cases = build_grid(["passkey", "niah"], variants, [256, 384], [0.2, 0.8], [0])
    tasks = {name: get_task(name) for name in ("passkey", "niah")}
    path = tmp_path_factory.mktemp("rows") / "results.jsonl"
    return Runner(tiny_model, tokenizer, model_name="tiny", tasks=tasks, results_path=path, backend="reference").run(
        cases
    )


def test_tables_and_plots_from_a_tiny_model(tiny_rows, tmp_path):
    summary = summarize(tiny_rows)
    rendered = tables(summary, model="tiny")
    assert [table.title.split(" ")[0] for table in rendered] == ["passkey", "niah"]
    assert rendered[0].row_count == 4  # dense + three variants
    written = write_report(tiny_rows, tmp_path, model="tiny")
    names = sorted(path.name for path in written)
    assert names == ["frontier.png", "needle_niah.png", "needle_passkey.png", "summary.json"]
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)


def test_block_mask_plot_on_a_real_prompt(tiny_model, tokenizer, tmp_path):
    sample = get_task("niah").make(tokenizer, 512, 0.5)
    layer = full_attention_layers(tiny_model)[-1]
    shown = show_block_mask(
        tiny_model,
        sample,
        MethodVariant.parse("xattention:threshold=0.5"),
        layer,
        tmp_path / "mask.png",
        model_name="tiny",
        block_size=64,
    )
    assert shown["layer"] == 1 and 0 < shown["density"] <= 1
    _assert_png(tmp_path / "mask.png")
    assert tiny_model.config._attn_implementation == "sdpa"  # restored after capturing


def test_frontier_styles_tell_many_methods_apart():
    from sparse_attn.eval.plots import _method_styles

    methods = [f"method_{index}" for index in range(25)]
    styles = _method_styles(list(reversed(methods)))
    assert sorted(styles) == sorted(methods)  # keyed by name, whatever the order given
    pairs = {(style["color"], style["marker"]) for style in styles.values()}
    assert len(pairs) == len(methods)
