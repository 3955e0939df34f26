"""``import sparse_attn`` loads no kernel module and no Triton; a backend's module loads when a call first needs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KERNEL_MODULES = {"sparse_attn.backends." + name for name in ("flex", "triton", "gluon", "launch")}


def _modules_after(code: str) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_import_loads_no_kernel_module_and_no_triton():
    loaded = _modules_after("import sparse_attn")
    assert not KERNEL_MODULES & loaded
    assert "triton" not in loaded


@pytest.mark.parametrize(
    "backend, loaded, not_loaded",
    [
        ("reference", {"sparse_attn.backends.reference"}, KERNEL_MODULES),
        ("flex", {"sparse_attn.backends.flex"}, KERNEL_MODULES - {"sparse_attn.backends.flex"}),
    ],
)
def test_a_backend_loads_on_first_use(backend, loaded, not_loaded):
    code = (
        "import torch, sparse_attn as sa\n"
        "q = torch.randn(1, 1, 32, 16)\n"
        f"sa.block_sparse_attention(q, q, q, sa.dense_pattern(seq_q=32, block_q=16, block_k=16), backend={backend!r})"
    )
    modules = _modules_after(code)
    assert loaded <= modules
    assert not not_loaded & modules


def test_auto_on_cpu_compiles_nothing():
    # Compiled FlexAttention specializes per input shape; auto on CPU must not stall on it.
    code = (
        "import torch, sparse_attn as sa\n"
        "for seq in (200, 333):\n"
        "    q = torch.randn(1, 4, seq, 64)\n"
        "    k = torch.randn(1, 2, seq, 64)\n"
        "    sa.sparse_attention(q, k, k, method='random', density=0.5, block_q=64, block_k=64)"
    )
    modules = _modules_after(code)
    assert "sparse_attn.backends.flex" not in modules
    assert not {"torch._dynamo", "torch._inductor"} & modules


def test_token_kernel_backward_module_imports_first():
    """The token kernel's forward, gathered and backward modules read each other; importing the
    backward one first (as a benchmark that sets its options does) was circular."""
    modules = _modules_after("from sparse_attn.backends import triton_tokens_backward")
    assert {"sparse_attn.backends.triton_tokens", "sparse_attn.backends.triton_tokens_gathered"} <= modules
