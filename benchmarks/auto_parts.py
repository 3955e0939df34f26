"""Where ``auto``'s estimate goes at one length (GPU): each part timed alone.

On the structured inputs of ``estimators.py`` (32/8 heads, head_dim 128, bf16, 128-token blocks):
the spread probe, each default candidate judged on the probed query blocks (``capture_rows``),
the three ``xattention`` settings in one shared-scores scope (as ``auto`` runs them), the whole
pattern of each method named with ``--full``, and ``auto`` itself. Per part: the wall time of
one synchronized call after a warm-up call, the CUDA kernels and copies it launched, and their
summed GPU time (a part whose wall time is far above its GPU time is bound by host launches and
synchronisations).

    python benchmarks/auto_parts.py --length 1048576 --full anchor
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import estimators as E  # noqa: E402 (the benchmark next to this one: inputs, environment)
from sparse_attn.methods import auto as A  # noqa: E402
from sparse_attn.ops._shared_scores import shared_scores  # noqa: E402


def measure(label: str, fn) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3
    row = {"part": label, "wall_ms": wall, "gpu_ops": len(kernels), "gpu_busy_ms": busy}
    print(f"{label:55s} wall {wall:9.1f} ms  gpu ops {len(kernels):6d}  gpu busy {busy:8.1f} ms", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1048576)
    parser.add_argument("--full", nargs="*", default=["anchor"], help="methods whose whole pattern is timed too")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("auto_parts.py needs a CUDA GPU")
    device = torch.device("cuda")
    seq, block = args.length, 128
    q, k, _ = E.structured_qkv(E.Shape(seq=seq), strength=12.0, device=device)
    geometry = dict(block_q=block, block_k=block, seq_q=seq, seq_k=seq)
    blocks = A.probe_blocks(-(-seq // block), 16)

    def capture(name: str, options: dict):
        return lambda: A._candidate_pattern(name, options, q, k, causal=True, geometry=geometry, capture=blocks)

    def shared_xattention():
        with shared_scores():
            for name, options in A.DEFAULT_CANDIDATES:
                if name == "xattention":
                    capture(name, options)()

    probe = dict(query_blocks=blocks, rows=block, block_q=block, block_k=block, scale=128**-0.5, causal=True)
    rows = [measure("probe", lambda: A.probe_block_mass(q, k, **probe))]
    rows += [measure(f"capture {A.label(n, o)}", capture(n, o)) for n, o in A.DEFAULT_CANDIDATES]
    rows.append(measure("capture xattention x3, shared scores", shared_xattention))
    for name in args.full:
        whole = lambda name=name: A._candidate_pattern(name, {}, q, k, causal=True, geometry=geometry)  # noqa: E731
        rows.append(measure(f"full {name}", whole))
    config = A.AutoConfig()
    rows.append(measure("auto total", lambda: A.choose(q, k, config, causal=True, block_q=block, block_k=block)))
    _, choice = A.choose(q, k, config, causal=True, block_q=block, block_k=block)
    chosen = sorted(set(choice.names(0)))
    print("chosen:", chosen)
    if args.out is not None:
        meta = {"benchmark": "auto_parts", "seq": seq, "chosen": chosen, **E.environment(device)}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
