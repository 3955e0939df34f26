"""The README's Python snippets run as written, each in a fresh interpreter (on the CPU in CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


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
