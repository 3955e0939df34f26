"""Summaries of evaluation rows: per task, method variant and length, with dense as the reference.

``summarize`` turns the per-case rows of the runner into one row per (task, variant,
length): mean score, mean density, median prefill time, and the ratios against dense at
the same task and length. ``tables`` renders them with rich, one table per task.

A speedup is only computed from warm timings: when every case of the variant and of dense
was timed after an identical warm-up call (``prefill_warm`` in the runner's rows). Rows
without it (a run with the warm-up off, or results of an older version) get no speedup,
since their times may hold compilation or autotuning.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .grid import DENSE


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (task, label, length), in first-seen order.

    Keys: ``task``, ``label``, ``method``, ``options``, ``length``, ``cases``, ``score``
    (mean), ``density`` (mean over cases that recorded one), ``prefill_s`` (median),
    ``prefill_warm`` (every case timed warm), ``first_prefill_s`` (median of the warm-up
    calls, which hold the first-call costs; ``None`` without them), ``higher_is_better``,
    ``dense_score``, ``relative_score`` (score over dense's; for perplexity dense's over the
    method's, so 1.0 is always "as good as dense") and ``speedup`` (dense's median prefill
    time over this variant's; ``None`` unless both are warm).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["label"], row["length"])].append(row)
    summary = []
    for (task, label, length), group in groups.items():
        densities = [row["density"] for row in group if row["density"] is not None]
        first_calls = [row["first_prefill_s"] for row in group if row.get("first_prefill_s") is not None]
        summary.append(
            {
                "task": task,
                "label": label,
                "method": group[0]["method"],
                "options": group[0]["options"],
                "length": length,
                "cases": len(group),
                "score": _mean([row["score"] for row in group]),
                "density": _mean(densities),
                "prefill_s": statistics.median(row["prefill_s"] for row in group),
                "prefill_warm": all(row.get("prefill_warm", False) for row in group),
                "first_prefill_s": statistics.median(first_calls) if first_calls else None,
                "higher_is_better": group[0]["higher_is_better"],
            }
        )
    dense = {(row["task"], row["length"]): row for row in summary if row["label"] == DENSE}
    for row in summary:
        reference = dense.get((row["task"], row["length"]))
        row["dense_score"] = reference["score"] if reference else None
        row["relative_score"] = _relative(row, reference)
        row["speedup"] = _speedup(row, reference)
    return summary


def _speedup(row: dict, reference: dict | None) -> float | None:
    if reference is None or not (row["prefill_warm"] and reference["prefill_warm"]) or row["prefill_s"] <= 0:
        return None
    return reference["prefill_s"] / row["prefill_s"]


def _relative(row: dict, reference: dict | None) -> float | None:
    if reference is None:
        return None
    numerator, denominator = (
        (row["score"], reference["score"]) if row["higher_is_better"] else (reference["score"], row["score"])
    )
    return numerator / denominator if denominator else None


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def tables(summary: list[dict], *, model: str):
    """rich ``Table`` objects, one per task: method variant × length (score, density, speedup vs dense)."""
    from rich.table import Table

    result = []
    for task in dict.fromkeys(row["task"] for row in summary):
        task_rows = [row for row in summary if row["task"] == task]
        lengths = sorted({row["length"] for row in task_rows})
        labels = list(dict.fromkeys(row["label"] for row in task_rows))
        perplexity = not task_rows[0]["higher_is_better"]
        table = Table(
            title=f"{task} on {model}: {'perplexity (lower is better)' if perplexity else 'score'}, "
            "density over the method's layers, prefill speedup vs dense",
            caption="speedup: dense's median prefill time / the method's (above 1: faster), both timed warm "
            "(after an identical untimed call); '-' where a time was not taken warm",
        )
        table.add_column("method", no_wrap=True)
        for length in lengths:
            size = f"{length // 1024}K" if length % 1024 == 0 else str(length)
            table.add_column(f"{size} score", justify="right")
            table.add_column(f"{size} density", justify="right")
            table.add_column(f"{size} speedup", justify="right")
        cells = {(row["label"], row["length"]): row for row in task_rows}
        for label in labels:
            line = [label]
            for length in lengths:
                row = cells.get((label, length))
                if row is None:
                    line += ["", "", ""]
                    continue
                line += [
                    _cell(row["score"], ".2f"),
                    _cell(row["density"], ".2f"),
                    _cell(row["speedup"], ".2f") + ("x" if row["speedup"] is not None else ""),
                ]
            table.add_row(*line)
        result.append(table)
    return result


def write_report(rows: list[dict], out: Path, *, model: str) -> list[Path]:
    """Write ``summary.json``, ``frontier.png`` and one ``needle_<task>.png`` per needle task into ``out``.

    Returns the paths written (the frontier is skipped when no task has an accuracy score).
    """
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    written = [out / "summary.json"]
    written[0].write_text(json.dumps({"model": model, "summary": summary}, indent=1) + "\n", encoding="utf-8")
    if any(row["higher_is_better"] for row in summary):
        written.append(plots.frontier(summary, out / "frontier.png", title=f"{model}: score vs density"))
    for task in dict.fromkeys(row["task"] for row in rows if row["depth"] is not None):
        path = out / f"needle_{task}.png"
        written.append(plots.needle_heatmaps(rows, task, path, title=f"{task} on {model}: score by depth and length"))
    return written
