"""The README's and docs/' Python snippets run as written, each in a fresh interpreter (on the CPU in
CI), and their relative links (files and #anchors) resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    snippet
    for page in PAGES
    for snippet in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
]


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index):
    result = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index]],
        capture_output=True,
        text=True,
        timeout=600,
        # conftest sets TRITON_INTERPRET for the kernel tests; a user running a snippet has not.
        env={key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"},
    )
    assert result.returncode == 0, f"snippet {index} failed:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"snippet {index} printed nothing"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    assert not broken, "\n".join(broken)


def test_anchor_rule():
    assert _anchor(" Measured on one H200 (torch 2.11, Triton 3.6; 2026-12-01)") == (
        "measured-on-one-h200-torch-211-triton-36-2026-12-01"
    )
    assert _anchor("NSA's dense start") == "nsas-dense-start"
