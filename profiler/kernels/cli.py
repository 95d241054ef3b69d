"""``kvprof kernels``: measure the kernel grid for one model into ``DIR/raw.jsonl`` (resumable)."""

from __future__ import annotations

import argparse
import shlex
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvprof kernels",
        description="Time linear, attention and method kernels with torch over a grid of batch size x context "
                    "length (and prefill chunk); every finished point is appended to DIR/raw.jsonl, and the same "
                    "command after a kill resumes where it stopped. Then: kvprof fit DIR --out PROFILE.json")
    p.add_argument("--model", required=True, help="shipped model name (llama-3.1-8b) or a path to a HF config.json")
    p.add_argument("--methods", default=None,
                   help="comma-separated method specs, parsed by kvsim's registry (e.g. none,kivi:bits=4,"
                        "h2o:budget=512,window=32); default: every method kvprof's kernels run (profiler.methods)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (raw.jsonl is created or resumed)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--grid", choices=("full", "tiny"), default=None,
                   help="grid size (default: full on cuda, tiny on cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="activation / weight / KV dtype (default bfloat16)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: shapes are one GPU's shard (default 1)")
    p.add_argument("--tables", default=None,
                   help="only tables with these names or name prefixes, comma-separated (e.g. linear,attention.decode)")
    p.add_argument("--retry-oom", action="store_true", help="re-measure points recorded as out of memory")
    p.add_argument("--contiguous-decode", action="store_true",
                   help="time decode attention of paged methods over a contiguous cache instead of gathering blocks")
    p.add_argument("--dry-run", action="store_true",
                   help="print points per table and an H100 datasheet-roofline estimate of the run time; measure nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from kvsim.errors import KvsimError
    from kvsim.specs.model import load_model

    try:
        import torch
    except ImportError:
        print("kvprof kernels: needs torch (pip install 'kvsim[profile]')", file=sys.stderr)
        return 2
    from profiler.kernels import RawError
    from profiler.kernels import grid as G

    try:
        model = load_model(args.model)
        methods = G.parse_methods(args.methods or G.all_methods())
    except (KvsimError, ValueError) as e:
        print(f"kvprof kernels: {e}", file=sys.stderr)
        return 2
    if args.tp < 1:
        print("kvprof kernels: --tp must be >= 1", file=sys.stderr)
        return 2
    device = args.device
    grid = G.GRIDS[args.grid or ("full" if device.startswith("cuda") else "tiny")]
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
    if args.dry_run:
        points = G.plan(grid, model, methods, tables)
        print(f"{len(points)} points, grid {grid.name}, model {model.name}, tp {args.tp}")
        total = G.print_estimate(G.estimate(grid, model, methods, args.tp, contiguous_decode=args.contiguous_decode,
                                            tables=tables))
        slow = G.estimate(grid, model, methods, args.tp, contiguous_decode=args.contiguous_decode, tables=tables,
                          **G.PESSIMISTIC)
        slow_total = sum(v["est_s"] for v in slow.values())
        print(f"estimate on an H100, not a measurement: {total / 60:.1f} min at datasheet peaks with 10 ms overhead "
              f"per point; {slow_total / 60:.1f} min at 30 % of peak with 50 ms per point")
        return 0
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("kvprof kernels: no CUDA device here; --device cpu runs the tiny CI grid", file=sys.stderr)
        return 2
    if device != "cpu" and not device.startswith("cuda"):
        print(f"kvprof kernels: --device {device!r}: use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(device)  # plain "cuda" has no index, which some torch versions refuse here
    command = "kvprof kernels " + shlex.join(argv)
    try:
        raw = G.run_grid(args.out, model, methods, device=device, dtype=getattr(torch, args.dtype), tp=args.tp,
                         grid=grid, command=command, retry_oom=args.retry_oom, tables=tables,
                         contiguous_decode=args.contiguous_decode, progress=False if args.no_progress else None)
    except RawError as e:
        print(f"kvprof kernels: {e}", file=sys.stderr)
        return 2
    print(f"raw points: {raw}\nnext: kvprof fit {raw} --out PROFILE.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
