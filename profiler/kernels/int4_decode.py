"""``kvprof int4-decode``: a Triton decode-attention kernel over a bf16 cache and over an int4 cache in
LMDeploy's layout (codes per token and head, an fp16 scale and zero point each), same structure, timed
side by side.

Why: kvsim's measured LMDeploy int4 term (about 100 CUDA-core operations per KV element, fitted on a
48 GB Ampere card) predicts that on a GPU whose FP32 rate is small next to its bandwidth, such as
Hopper, 4-bit decode attention is slower than bf16, not faster. This measures that kind of kernel (one
program per sequence and head, one pass over the context, dequantisation in registers, reductions on
the CUDA cores, as the engine's Triton kernels do) on the GPU at hand. It is not LMDeploy's kernel.

The int4 codes hold dimension j in the low nibble and dimension j + D/2 in the high one, so the two
halves of the query and of the output are handled apart without an interleave. ``--check`` compares
both kernels with a float64 reference (runs on CPU with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvprof int4-decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for int4_decode.jsonl")
    p.add_argument("--check", action="store_true", help="compare both kernels with a float64 reference and exit")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    d = args.head_dim
    if d < 2 or d & (d - 1):
        print(f"kvprof int4-decode: --head-dim {d}: must be a power of two (the kernel splits it in halves)",
              file=sys.stderr)
        return 2
    if args.heads < 1:
        print(f"kvprof int4-decode: --heads {args.heads}: must be positive", file=sys.stderr)
        return 2
    try:
        import torch
        import triton

        from profiler.kernels.int4_triton import bench, check
    except ImportError as e:
        print(f"kvprof int4-decode: needs torch and triton ({e}); on a CPU, TRITON_INTERPRET=1 runs --check",
              file=sys.stderr)
        return 2
    if args.check or not torch.cuda.is_available():
        err = check("cuda" if torch.cuda.is_available() else "cpu")
        print(f"kvprof int4-decode: both kernels match the float64 reference (max abs error {err:.2e})")
        return 0
    check("cuda")
    rows = []
    t0 = time.perf_counter()
    for B in (1, 16, 64):
        for L in (1024, 4096, 8192):
            r = bench(B, L, args.heads, args.head_dim)
            rows.append(r)
            print(json.dumps(r), flush=True)
    header = {"record": "header", "format": "kvprof-int4-decode", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__,
              "triton": triton.__version__, "cuda": torch.version.cuda, "command": "kvprof int4-decode " + " ".join(argv or sys.argv[1:])}
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "int4_decode.jsonl", "w") as f:
            f.write(json.dumps(header) + "\n")
            for r in rows:
                f.write(json.dumps({"record": "point", **r}) + "\n")
    print(f"kvprof int4-decode: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
