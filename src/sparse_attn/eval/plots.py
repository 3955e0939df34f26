"""PNG plots with matplotlib: the accuracy/density frontier, needle heatmaps, one layer's block mask.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so plotting never needs
a display nor touches global state.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import torch

from .grid import DENSE


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


# Each method keeps one colour and marker in every panel; 20 colours and 7 markers tell up to
# 140 methods apart (matplotlib's default cycle repeats after 10 and restarts per panel).
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _method_styles(methods) -> dict[str, dict]:
    """A colour and marker per method name (any iterable), assigned in sorted name order."""
    from matplotlib import colormaps

    colours = colormaps["tab20"]
    return {
        method: {"color": colours(index % 20), "marker": MARKERS[index % len(MARKERS)]}
        for index, method in enumerate(sorted(methods))
    }


def _length_name(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def frontier(summary: list[dict], path: Path, *, title: str) -> Path:
    """Score vs density, one panel per length and one line per method through its variants.

    Uses the summary rows of higher-is-better tasks, averaged over those tasks. Dense is
    the dashed ceiling. Returns ``path``.
    """
    points: dict[tuple, list[dict]] = defaultdict(list)
    for row in summary:
        if row["higher_is_better"]:
            points[(row["label"], row["length"])].append(row)
    if not points:
        raise ValueError("no accuracy results to plot a frontier from")
    lengths = sorted({length for _, length in points})
    styles = _method_styles({rows[0]["method"] for rows in points.values()} - {DENSE})
    figure = _figure(4.2 * len(lengths) + 1.8, 3.8)
    axes = figure.subplots(1, len(lengths), squeeze=False)[0]
    for axis, length in zip(axes, lengths, strict=True):
        lines: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for (label, row_length), rows in points.items():
            densities = [row["density"] for row in rows if row["density"] is not None]
            if row_length != length or not densities:
                continue
            score = statistics.fmean(row["score"] for row in rows)
            lines[rows[0]["method"]].append((statistics.fmean(densities), score, label))
        # Dense goes underneath, so a method that keeps every block stays visible on top of it.
        for density, score, _ in lines.pop(DENSE, []):
            axis.axhline(score, color="black", linestyle="--", linewidth=1, zorder=1)
            axis.plot([density], [score], marker="*", markersize=14, color="black", label=DENSE, zorder=1)
        for method, line in sorted(lines.items()):
            line.sort()
            axis.plot([p[0] for p in line], [p[1] for p in line], label=method, zorder=3, **styles[method])
        axis.set_title(f"{_length_name(length)} tokens")
        axis.set_xlabel("density (computed / causal blocks)")
        axis.set_xlim(0, 1.05)
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("score (mean over accuracy tasks)")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    figure.legend(unique.values(), unique.keys(), loc="outside right upper", fontsize="small")
    figure.suptitle(title)
    figure.savefig(path)
    return path


def needle_heatmaps(rows: list[dict], task: str, path: Path, *, title: str) -> Path:
    """The needle heatmap of ``task``: score by depth (rows) × length (columns), one panel per method variant."""
    task_rows = [row for row in rows if row["task"] == task and row["depth"] is not None]
    if not task_rows:
        raise ValueError(f"no results with a depth for task {task!r}")
    labels = list(dict.fromkeys(row["label"] for row in task_rows))
    lengths = sorted({row["length"] for row in task_rows})
    depths = sorted({row["depth"] for row in task_rows})
    columns = min(len(labels), 4)
    panel_rows = -(-len(labels) // columns)
    figure = _figure(1.0 + columns * (1.2 + 0.7 * len(lengths)), 0.8 + panel_rows * (1.0 + 0.35 * len(depths)))
    axes = figure.subplots(panel_rows, columns, squeeze=False).ravel()
    image = None
    for axis, label in zip(axes, labels, strict=False):  # the last row of panels may have spare axes
        scores = torch.full((len(depths), len(lengths)), float("nan"))
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                cell = [
                    r["score"]
                    for r in task_rows
                    if r["label"] == label and r["depth"] == depth and r["length"] == length
                ]
                if cell:
                    scores[i, j] = statistics.fmean(cell)
        image = axis.imshow(scores.numpy(), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not torch.isnan(scores[i, j]):
                    axis.text(j, i, f"{float(scores[i, j]):.2f}", ha="center", va="center", fontsize=7)
        axis.set_title(label.replace(":", "\n").replace(",", ", "), fontsize=8)
        axis.set_xticks(range(len(lengths)), [_length_name(length) for length in lengths], fontsize=8)
        axis.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths], fontsize=8)
        axis.set_xlabel("length", fontsize=8)
        axis.set_ylabel("depth", fontsize=8)
    for axis in axes[len(labels) :]:
        axis.set_visible(False)
    figure.colorbar(image, ax=list(axes[: len(labels)]), label="score", shrink=0.8)
    figure.suptitle(title)
    figure.savefig(path)
    return path


def block_mask(
    mask: torch.Tensor, path: Path, *, title: str, block_size: int, needle_spans: tuple[tuple[int, int], ...] = ()
) -> Path:
    """One layer's block mask, one panel per head: computed blocks dark, causally invalid ones grey.

    ``mask`` is bool ``(H, n_q_blocks, n_kv_blocks)``; ``needle_spans`` (token positions)
    are marked as red lines at their key blocks.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    heads, q_blocks, kv_blocks = mask.shape
    offset = kv_blocks - q_blocks  # queries are the last blocks of the keys
    query = torch.arange(q_blocks)[:, None] + offset
    key = torch.arange(kv_blocks)[None, :]
    # 0: outside the causal triangle, 1: skipped, 2: computed.
    codes = torch.where(key <= query, 1 + mask.long(), torch.zeros_like(mask, dtype=torch.long))
    colors = ListedColormap(["#dddddd", "#ffffff", "#1f3b73"])
    columns = min(heads, 4)
    panel_rows = -(-heads // columns)
    figure = _figure(0.6 + 3.4 * columns, 0.6 + 3.4 * panel_rows)
    axes = figure.subplots(panel_rows, columns, squeeze=False).ravel()
    for head, axis in enumerate(axes[:heads]):
        computed = mask[head][key.expand(q_blocks, -1) <= query].float().mean()
        axis.imshow(codes[head].numpy(), cmap=colors, vmin=0, vmax=2, interpolation="nearest")
        for start, _ in needle_spans:
            axis.axvline(start // block_size, color="red", linewidth=0.8)
        axis.set_title(f"head {head}: density {float(computed):.2f}", fontsize=9)
        axis.set_xlabel(f"key block ({block_size} tokens)", fontsize=8)
        axis.set_ylabel("query block", fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in axes[heads:]:
        axis.set_visible(False)
    legend = "computed blocks dark, skipped white" + (", needle's key block red" if needle_spans else "")
    figure.suptitle(f"{title}\n{legend}")
    figure.savefig(path)
    return path
