"""Compile the Gluon dK/dV kernel (or, with ``"KERNEL": "dq"``, the dQ kernel) for sm_90a on any machine (no GPU needed) and print JSON.

    python gluon_backward_sm90_compile.py '{"HEAD_DIM": 64, "dtype": "fp16", "CAUSAL": false}'

Prints ``{"ptx", "report" (ptxas -v), "shared" (bytes)}``. Used by test_gluon_backward.py in a
child process with ``TRITON_INTERPRET=0``; defaults: head_dim 128, 128 x 128 blocks, causal, bf16.
"""

from __future__ import annotations

import json
import sys

from gluon_sm90_compile import run_ptxas


def compile_for_sm90(dtype: str = "bf16", **constants) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from sparse_attn.backends import gluon_backward

    is_dq = constants.pop("KERNEL", "dkdv") == "dq"
    kernel = gluon_backward._gluon_dq if is_dq else gluon_backward._gluon_dkdv
    step = "STEP_N" if is_dq else "STEP_M"
    values = dict(HEAD_DIM=128, BLOCK_Q=128, BLOCK_K=128, CAUSAL=True, BOX=False, EVEN_Q=True, EVEN_K=True)
    values[step] = 64
    values.update(constants)
    wide = values[step] == 128
    stages = {
        (False, False): gluon_backward.STAGES,
        (False, True): gluon_backward.WIDE_STAGES,
        (True, False): gluon_backward.DQ_STAGES,
        (True, True): gluon_backward.DQ_WIDE_STAGES,
    }[is_dq, wide]
    values["STAGES"] = stages[values["HEAD_DIM"]]
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({name: f"*{dtype}" for name in ("DK", "DV", "DQ") if name in kernel.arg_names})
    lists = ("KvCounts", "KvIndices", "WorkOrder") if is_dq else ("QCounts", "QIndices", "WorkOrder")
    signature.update({"Lse": "*fp32", "Delta": "*fp32", **{name: "*i32" for name in (*lists, "BoxTable")}})
    signature.update({"scale": "fp32", "qk_scale": "fp32"})
    signature.update({name: "i64" for name in kernel.arg_names if name.startswith("stride_") and name[-1] in "bh"})
    element = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    dim = values["HEAD_DIM"]
    tiles = (128, 128, values[step], values[step]) if is_dq else (values[step], values[step], 128, 128)
    for name, rows in zip(("QDesc", "DODesc", "KDesc", "VDesc"), tiles, strict=True):
        layout = gl.NVMMASharedLayout.get_default_for([rows, dim], element)
        signature[name] = f"tensordesc<{dtype}[{rows}, {dim}],{layout!r}>"
    signature.update({name: "constexpr" for name in values})
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=values)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    return {"ptx": ptx, "report": run_ptxas(ptx, check=True).stderr, "shared": compiled.metadata.shared}


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90(**json.loads(sys.argv[1]))))
