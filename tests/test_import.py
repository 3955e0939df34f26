"""``import sparse_attn`` stays light; the optional parts load on first access."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("transformers", "matplotlib", "rich")
OPTIONAL_PARTS = ("sparse_attn.eval", "sparse_attn.cli", "sparse_attn.integrations", "sparse_attn.models")
LAZY = ("models", "patch", "record", "unpatch")


def _run(code: str) -> None:
    """Run ``code`` in a fresh interpreter (this one has imported everything already)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_import_loads_no_optional_dependency_and_no_optional_part():
    _run(
        "import sparse_attn, sys\n"
        f"assert not {set(HEAVY)!r} & set(sys.modules), {set(HEAVY)!r} & set(sys.modules)\n"
        f"loaded = [m for m in sys.modules if m.startswith({OPTIONAL_PARTS!r})]\n"
        "assert not loaded, loaded\n"
    )


def test_lazy_attributes_are_listed_and_load_on_access():
    pytest.importorskip("transformers")
    _run(
        "import sys\n"
        "import sparse_attn as sa\n"
        f"assert set({LAZY!r}) <= set(dir(sa)) and set({LAZY!r}) <= set(sa.__all__)\n"
        "assert 'sparse_attn.models' not in sys.modules\n"
        "import sparse_attn.integrations as integrations, sparse_attn.models as models\n"
        "assert sa.models is models and callable(sa.models.load)\n"
        "assert (sa.patch, sa.record, sa.unpatch) == (integrations.patch, integrations.record, integrations.unpatch)\n"
        "from sparse_attn import patch, record, unpatch\n"
        "assert patch is integrations.patch\n"
        "try:\n"
        "    sa.no_such_attribute\n"
        "except AttributeError as error:\n"
        "    assert 'no_such_attribute' in str(error)\n"
        "else:\n"
        "    raise AssertionError('sa.no_such_attribute did not raise')\n"
    )
