"""``kvprof`` entry point: dispatches to one module per subcommand, imported only when used (so
``kvprof import`` works without torch)."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "kernels": ("profiler.kernels.cli", "measure attention, linear and method kernels over a grid"),
    "step": ("profiler.kernels.step", "time whole decode steps, eager and as a CUDA graph"),
    "int4-decode": ("profiler.kernels.int4_decode", "a Triton decode kernel over bf16 and over LMDeploy-style int4 KV"),
    "fit": ("profiler.fit", "turn raw kernel points into a kvsim profile"),
    "lengths": ("profiler.lengths", "measure how compression changes output length on a real model"),
    "import": ("profiler.importers", "convert published profiles (vidur, llmservingsim) to a kvsim profile"),
    "replay": ("profiler.replay", "serve a trace on a real engine and record every request and step"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: kvprof {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
