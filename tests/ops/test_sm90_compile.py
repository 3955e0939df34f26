"""Operator kernels that run on CUDA by default compile for sm_90a (Hopper), checked on any machine.

The CPU tests run these kernels under Triton's interpreter, which never compiles them; this
compiles them ahead of time for sm_90a in a child process and runs ptxas on the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_operator_kernels_compile_for_sm90():
    script = os.path.join(os.path.dirname(__file__), "triton_sm90_compile.py")
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, env=environment, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert set(results) == {
        "mask_lists", "lowbit_absmax", "lowbit_encode", "selection_mass", "antidiagonal_tma_bf16",
        "antidiagonal_tma_fp8",
    }  # fmt: skip
    for name, result in results.items():
        assert result["returncode"] == 0, (name, result["report"])
    # The scoring kernel's TMA mode issues bulk tensor copies; the fp8 codes come from the
    # direct float32 -> e4m3 conversion (after the kernel's own rounding to the e4m3 grid).
    assert results["antidiagonal_tma_bf16"]["ptx_has"]["cp.async.bulk.tensor"]
    assert results["antidiagonal_tma_fp8"]["ptx_has"]["cp.async.bulk.tensor"]
    assert results["lowbit_encode"]["ptx_has"]["cvt.rn.satfinite.e4m3x2.f32"]
