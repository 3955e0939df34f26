"""The tree stays clean under the ruff configuration in pyproject.toml (lint rules and formatter).

Runs ``ruff check`` and ``ruff format --check`` on the Python folders from the repository root,
so CI fails on a lint finding or an unformatted file. ruff is in the ``test`` extra.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The Python folders; README.md and benchmarks/results hold no code ruff should judge.
PATHS = ["src", "tests", "benchmarks"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')"
)


def run_ruff(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *arguments, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_check_is_clean():
    result = run_ruff("check", "--no-fix", "--output-format", "concise")
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_ruff_format_is_clean():
    result = run_ruff("format", "--check")
    assert result.returncode == 0, f"ruff format would change files:\n{result.stdout}{result.stderr}"
