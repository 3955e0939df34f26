"""Compile the Gluon Hopper kernel for sm_90a on any machine (no GPU needed) and print JSON.

    python gluon_sm90_compile.py '{"HEAD_DIM": 64, "dtype": "fp16"}'

Prints ``{"ptx": ..., "report": <ptxas -v output>}``. Used by test_gluon.py in a child
process with ``TRITON_INTERPRET=0``. The pattern-block and flag constexprs default to the
benchmark case (head_dim 128, 128 x 128 blocks, causal, bf16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def compile_for_sm90(dtype: str = "bf16", **constants) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from sparse_attn.backends import configs
    from sparse_attn.backends import gluon as gluon_backend
    from sparse_attn.backends.gluon import THREE_CONSUMER_MAXNREG

    persistent = constants.pop("PERSISTENT", False)
    kernel = gluon_backend._gluon_persistent_forward if persistent else gluon_backend._gluon_block_sparse_forward
    if persistent:  # host descriptors only; the one-item kernel's HOST_DESC switch is not a parameter
        constants["HOST_DESC"] = True
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({name: f"*{dtype}" for name in ("Q", "K", "V", "Out")})
    signature.update(
        {
            "Lse": "*fp32",
            "KvCounts": "*i32",
            "KvFullCounts": "*i32",
            "KvIndices": "*i32",
            "WorkOrder": "*i32",
            "BoxTable": "*i32",
            "qk_scale": "fp32",
        }
    )
    signature.update({name: "i64" for name in kernel.arg_names if name.startswith("stride_") and name[-1] in "bh"})
    values = dict(
        HEAD_DIM=128,
        BLOCK_Q=128,
        BLOCK_K=128,
        CAUSAL=True,
        WRITE_LSE=False,
        EVEN_K=True,
        EVEN_Q=True,
        HOST_DESC=False,
        BOX=False,
    )
    values.update(constants)
    values.setdefault("BLOCK_N", configs.gluon_block_n(values["BLOCK_K"]))
    values["STAGES"] = configs.gluon_stages(values["HEAD_DIM"], values["BLOCK_N"])
    if values["HOST_DESC"]:  # launch-made descriptors, typed as the launcher would type them
        from triton.experimental.gluon import language as gl

        element = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
        q_rows = 128 if values.get("CONSUMERS", 2) == 2 else 64  # three consumers: 64-row query boxes
        for name, rows in (("QDesc", q_rows), ("KDesc", values["BLOCK_N"]), ("VDesc", values["BLOCK_N"])):
            layout = gl.NVMMASharedLayout.get_default_for([rows, values["HEAD_DIM"]], element)
            signature[name] = f"tensordesc<{dtype}[{rows}, {values['HEAD_DIM']}],{layout!r}>"
    else:
        values.update(QDesc=None, KDesc=None, VDesc=None)
    if persistent:
        del values["HOST_DESC"]
    else:
        values.setdefault("CONSUMERS", 2)
    signature.update({name: "constexpr" for name in values})
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=values)
    options = {"num_warps": 4}
    if values.get("CONSUMERS", 2) == 3:  # 16 warps at launch: at most 128 registers a thread
        options["maxnreg"] = THREE_CONSUMER_MAXNREG
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    report = run_ptxas(ptx, check=True).stderr
    return {"ptx": ptx, "report": report, "shared": compiled.metadata.shared, "stages": values["STAGES"]}


def run_ptxas(ptx: str, *, check: bool) -> subprocess.CompletedProcess:
    """Assemble ``ptx`` for sm_90a with Triton's bundled ``ptxas -v`` (the report is on stderr)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        return subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(folder, "kernel.o")],
            capture_output=True,
            text=True,
            check=check,
        )


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90(**json.loads(sys.argv[1]))))
