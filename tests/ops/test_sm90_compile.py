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
        "antidiagonal_tma_fp8", "vertical_slash_blocks", "block_max_split", "block_max_d256",
        "gathered_block_max_bf16", "gathered_block_max_d256",
        "anchor_region_bf16", "anchor_region_d256", "lowbit_margin_int8", "lowbit_margin_fp8_d256",
        "nsa_decode_compressed", "nsa_decode_scores", "nsa_decode_attend", "nsa_decode_combine", "gated_sum",
        "gated_sum_backward", "gated_sum_backward_folded", "residue_rows", "compressed_scores_pointers",
        "compressed_scores_tma", "causal_top_blocks_rounds", "causal_top_blocks_topk", "causal_top_blocks_gated",
    }  # fmt: skip
    for name, result in results.items():
        assert result["returncode"] == 0, (name, result["report"])
    # The scoring kernel's TMA mode issues bulk tensor copies; the fp8 codes come from the
    # direct float32 -> e4m3 conversion (after the kernel's own rounding to the e4m3 grid).
    assert results["antidiagonal_tma_bf16"]["ptx_has"]["cp.async.bulk.tensor"]
    assert results["antidiagonal_tma_fp8"]["ptx_has"]["cp.async.bulk.tensor"]
    assert results["lowbit_encode"]["ptx_has"]["cvt.rn.satfinite.e4m3x2.f32"]
    # SALE's margins come from the 8-bit codes' own tensor-core products (warpgroup MMA).
    assert results["lowbit_margin_int8"]["ptx_has"]["wgmma"]
    assert results["lowbit_margin_fp8_d256"]["ptx_has"]["wgmma"]
    # NSA's selection scores: 64-row warpgroup MMA; the descriptor mode's query tiles by bulk tensor copies.
    assert results["compressed_scores_pointers"]["ptx_has"]["wgmma"]
    assert results["compressed_scores_tma"]["ptx_has"]["cp.async.bulk.tensor"]
    # The ranking kernels in the forms timed (causal_top_blocks.triton._rounds) spill nothing.
    for name in ("causal_top_blocks_rounds", "causal_top_blocks_gated"):
        assert "stack size" not in " ".join(results[name]["report"]), (name, results[name]["report"])
    # The scoring epilogue's exponentials: two per half-precision instruction.
    assert results["antidiagonal_tma_bf16"]["ptx_has"]["ex2.approx.f16x2"]


def _probe_cases() -> dict:
    """The last-query probe's kernels at FlexPrefill's shape (128 rows, head_dim 128, causal) with
    their launch choices, and head_dim 256 in fp16 (read in head-dim slices)."""
    from sparse_attn.ops.last_query_probe import triton as probe

    config, sliced = probe._launch_config(128), probe._launch_config(128, sliced=True)
    rows = dict(HEAD_DIM=128, BLOCK=128, BLOCK_D=128, CAUSAL=True, DOT_FP32=False, PRECISION="tf32")
    stats = {"RowMax": "*fp32", "RowSum": "*fp32", "qk_scale": "fp32"}
    sums = {**stats, "Vertical": "*fp32", "Slash": "*fp32", "SeamLow": "*fp32", "SeamHigh": "*fp32"}
    return {
        "stats": (
            probe._probe_row_stats, {"Q": "*bf16", "K": "*bf16", **stats},
            dict(rows, BLOCK_N=config.pass1_keys), config.pass1_warps,
        ),
        "sums": (
            probe._probe_sums, {"Q": "*bf16", "K": "*bf16", **sums},
            dict(rows, SHEAR_GROUP=config.shear_group, SLASH=True), config.warps,
        ),
        "sums_no_slash": (
            probe._probe_sums, {"Q": "*bf16", "K": "*bf16", **sums},
            dict(rows, SHEAR_GROUP=config.shear_group, SLASH=False), config.warps,
        ),
        "sums_d256": (
            probe._probe_sums, {"Q": "*fp16", "K": "*fp16", **sums},
            dict(rows, HEAD_DIM=256, BLOCK_D=64, SHEAR_GROUP=sliced.shear_group, SLASH=True), sliced.warps,
        ),
        "seams": (probe._slash_seams, {"Slash": "*fp32", "SeamLow": "*fp32", "SeamHigh": "*fp32"}, dict(BLOCK=128), 4),
    }  # fmt: skip


def test_last_query_probe_kernels_compile_for_sm90():
    # This file run as a script compiles them (a child process, without the interpreter).
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=environment, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert set(results) == {"stats", "sums", "sums_no_slash", "sums_d256", "seams"}
    for name, (returncode, report) in results.items():
        assert returncode == 0, (name, report)


if __name__ == "__main__":
    from triton_sm90_compile import compile_for_sm90

    compiled = {}
    for name, (fn, signature, constexprs, warps) in _probe_cases().items():
        returncode, report, _ = compile_for_sm90(fn, signature, constexprs, warps)
        compiled[name] = (returncode, report)
    print(json.dumps(compiled))
