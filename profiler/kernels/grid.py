"""What ``kvprof kernels`` measures and the resumable runner that appends every finished point to
``DIR/raw.jsonl`` at once: the methods (kvsim's registry, checked against the profiler's code in
:mod:`profiler.methods`), the grids, the plan of (table, axes) points, the raw file's header, and a
datasheet estimate for ``--dry-run``. A point is built by :mod:`profiler.kernels.bench` (linear and prefill
attention tables) or by the method's module (its own tables) and timed by :mod:`profiler.kernels.timing`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kvsim.errors import ConfigError
from kvsim.specs.model import ModelSpec
from profiler.kernels import (RAW_FORMAT, RAW_FORMAT_VERSION, RawError, append_record, point_key, raw_path,
                              read_raw)
from profiler.kernels.bench import Bench, Ctx, _linear, _nbytes, _prefill_attention
from profiler.kernels.timing import is_oom, last_level_cache_bytes, time_calls

# ================================================================================================
# methods: kvsim's registry, checked against what the profiler's code runs (profiler.methods)
# ================================================================================================


def parse_methods(text: str) -> dict:
    """``none,kivi:bits=4,group_size=64,h2o`` -> {name: kvsim Method}, one setting per method, each a
    setting kvprof's kernels run (profiler.methods.parse: a spec naming no ``impl`` gets the kernels')."""
    from profiler.methods import parse_list

    out: dict = {}
    for m in parse_list(text, "kernels"):
        if m.name in out and out[m.name] != m:
            raise ConfigError(f"kvprof kernels measures one setting per method; {m.name} is given twice "
                              f"({out[m.name].algorithm_spec()} and {m.algorithm_spec()})")
        out[m.name] = m
    return out


def knob_values(m) -> dict:
    """A method's knobs as the raw file records them (its algorithm's: every knob but ``impl``)."""
    return {k: getattr(m, k) for k in type(m).knobs() if k != "impl"}


def all_methods() -> str:
    """Every method kvprof's kernels run, as a --methods list."""
    from profiler.methods import supported

    return ",".join(supported("kernels"))


# ================================================================================================
# grids
# ================================================================================================


def _pow2(lo: int, hi: int) -> list[int]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= 2
    return out


def _pow2_and_mid(lo: int, hi: int) -> list[int]:
    """Powers of two with the 1.5x midpoints: 1, 2, 3, 4, 6, 8, 12, ..."""
    out = []
    for p in _pow2(lo, hi):
        out.append(p)
        if p > 1 and p * 3 // 2 <= hi:
            out.append(p * 3 // 2)
    return sorted(set(out))


def _log_spaced(lo: int, hi: int, per_octave: int, multiple: int) -> list[int]:
    n = round(math.log2(hi / lo) * per_octave)
    return sorted({int(round(lo * 2 ** (i / per_octave) / multiple)) * multiple for i in range(n + 1)})


@dataclass(frozen=True)
class Grid:
    name: str
    num_tokens: tuple[int, ...]
    batch_size: tuple[int, ...]
    kv_tokens: tuple[int, ...]
    chunk_tokens: tuple[int, ...]
    #: kv_tokens of the prefill tables: the decode values plus short contexts, so that the diagonal
    #: kv == chunk (a whole short prompt in one chunk) is measured down to the smallest chunk
    prefill_kv_tokens: tuple[int, ...]
    #: decode points with batch_size * kv_tokens above this are not measured (more KV than any GPU holds)
    max_batch_kv_tokens: int
    warmup: int
    min_reps: int
    max_reps: int
    #: aim for this much timed work per point (repeats = target / first time, clamped)
    target_s: float
    #: at most this many rotated input sets per point
    max_rotation: int = 8
    block_size: int = 16


GRIDS = {
    # CUDA: batch 1..256 (powers of two and 1.5x midpoints), kv 128..32768 (sqrt(2) steps, multiples
    # of 16), chunk 16..8192 (powers of two), linear token counts 1..16384 (powers of two and midpoints).
    "full": Grid(
        "full",
        num_tokens=tuple(_pow2_and_mid(1, 16384)),
        batch_size=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256),
        kv_tokens=tuple(_log_spaced(128, 32768, 2, 16)),
        chunk_tokens=tuple(_pow2(16, 8192)),
        prefill_kv_tokens=(16, 32, 64) + tuple(_log_spaced(128, 32768, 2, 16)),
        max_batch_kv_tokens=2**21,
        warmup=3, min_reps=5, max_reps=50, target_s=0.05,
    ),
    # CPU / CI: a handful of points per table; the whole path in well under a minute on 2 cores.
    "tiny": Grid(
        "tiny",
        num_tokens=(1, 8, 64),
        batch_size=(1, 2, 4),
        kv_tokens=(128, 256, 512),
        chunk_tokens=(16, 64, 256),
        prefill_kv_tokens=(64, 128, 256, 512),
        max_batch_kv_tokens=2**11,
        warmup=0, min_reps=3, max_reps=5, target_s=0.005, max_rotation=2,
    ),
}


def plan(grid: Grid, model: ModelSpec, methods: dict, tables: list[str] | None = None) -> list[tuple[str, dict]]:
    """Every (table, axes) point, in measuring order (linear, prefill, decode; small to large)."""
    from profiler.methods import MethodSupport, support

    def has(name: str, hook: str) -> bool:  # the method's module builds this table
        return getattr(type(support(name)), hook) is not getattr(MethodSupport, hook)

    names = ["linear.qkv", "linear.o", "linear.moe" if model.is_moe else "linear.mlp", "linear.other", "linear.lm_head"]
    prefill = ["attention.prefill.flash"]
    if any(support(m).eager_prefill for m in methods):
        prefill.append("attention.prefill.eager")
    prefill += [f"extra.prefill.{m}" for m in methods if has(m, "prefill_extra")]
    decode = [f"attention.decode.{m}" for m in methods]
    decode += [f"extra.decode.{m}" for m in methods if has(m, "decode_extra")]
    out: list[tuple[str, dict]] = []
    for t in names:
        out += [(t, {"num_tokens": n}) for n in grid.num_tokens]
    for t in prefill:
        out += [(t, {"chunk_tokens": c, "kv_tokens": kv}) for c in grid.chunk_tokens for kv in grid.prefill_kv_tokens if kv >= c]
    for t in decode:
        out += [(t, {"batch_size": b, "kv_tokens": kv}) for b in grid.batch_size for kv in grid.kv_tokens
                if b * kv <= grid.max_batch_kv_tokens]
    if tables:
        out = [p for p in out if any(p[0] == t or p[0].startswith(t.rstrip(".") + ".") for t in tables)]
    return out


# ================================================================================================
# one point: built (profiler.kernels.bench, the method's module) and timed (profiler.kernels.timing)
# ================================================================================================


def build_bench(table: str, axes: dict, ctx: Ctx) -> Bench:
    """The kernel and its inputs for one grid point; a method's tables come from its module."""
    if table.startswith("linear."):
        return _linear(table, axes["num_tokens"], ctx)
    if table.startswith("attention.prefill."):
        return _prefill_attention(table, axes["chunk_tokens"], axes["kv_tokens"], ctx)
    kind, _, name = table.rpartition(".")
    from profiler.methods import support

    sup, method = support(name), ctx.method(name)
    if kind == "extra.prefill":
        b = sup.prefill_extra(ctx, method, axes["chunk_tokens"], axes["kv_tokens"])
    elif kind == "attention.decode":
        b = sup.decode_attention(ctx, method, axes["batch_size"], axes["kv_tokens"])
    elif kind == "extra.decode":
        b = sup.decode_extra(ctx, method, axes["batch_size"], axes["kv_tokens"])
    else:
        b = None
    if b is None:
        raise KeyError(f"no kernel for table {table!r}")
    return b


def measure_point(table: str, axes: dict, ctx: Ctx) -> dict:
    """Time one point; an out-of-memory point is recorded as ``{"oom": true}`` instead of raising."""
    rec: dict = {"record": "point", "table": table, "axes": dict(axes)}
    oom_msg = None
    try:
        ctx.start_table(table)
        bench = build_bench(table, axes, ctx)
        sets = [bench.make_args(0)]
        per_set = max(1, _nbytes(sets[0]))
        n_rot = max(1, min(ctx.grid.max_rotation, math.ceil(2 * last_level_cache_bytes(ctx.device) / per_set)))
        sets += [bench.make_args(r) for r in range(1, n_rot)]
        times = [t / bench.divisor for t in time_calls(bench.fn, sets, ctx.device, ctx.grid)]
        rec.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times), repeats=len(times),
                   rotation=n_rot, divisor=bench.divisor, oom=False)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(exc):
            raise
        oom_msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    finally:
        sets = bench = None  # noqa: F841 (free the inputs before the next point)
    if oom_msg is not None:
        ctx.start_table("")  # drop cached weights too
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
        rec.update(oom=True, error=oom_msg)
    return rec


# ================================================================================================
# header and runner
# ================================================================================================


def _driver_version() -> str | None:
    try:
        m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", Path("/proc/driver/nvidia/version").read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_header(ctx: Ctx, command: str) -> dict:
    cuda = ctx.device.startswith("cuda")
    return {
        "record": "header", "format": RAW_FORMAT, "format_version": RAW_FORMAT_VERSION,
        "device": torch.cuda.get_device_name(ctx.device) if cuda else _cpu_name(),
        "device_type": "cuda" if cuda else ctx.device,
        "driver": _driver_version() if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "model": ctx.model.name, "model_spec": dataclasses.asdict(ctx.model),
        "tensor_parallel_size": ctx.tp, "methods": {n: knob_values(m) for n, m in ctx.methods.items()},
        "implementations": {n: getattr(m, "impl", None) for n, m in ctx.methods.items()}, "grid": ctx.grid.name,
        "block_size": ctx.grid.block_size, "decode_kv": "contiguous" if ctx.contiguous_decode else "paged",
        "timing": {"warmup": ctx.grid.warmup, "min_reps": ctx.grid.min_reps, "max_reps": ctx.grid.max_reps,
                   "target_s": ctx.grid.target_s, "max_rotation": ctx.grid.max_rotation, "clock": "cuda events" if cuda else "perf_counter_ns",
                   "statistic": "median"},
    }


_SAME = ("device", "device_type", "dtype", "model_spec", "tensor_parallel_size", "grid", "block_size", "decode_kv")


def _check_resumable(path: Path, old: dict, sessions: list, new: dict) -> None:
    for key in _SAME:
        if old.get(key) != new.get(key):
            raise RawError(f"{path}: cannot resume: it was measured with {key}={old.get(key)!r}, this run has "
                           f"{key}={new.get(key)!r}; use another --out directory")
    seen = dict(old.get("methods") or {})
    for s in sessions:
        seen.update(s.get("methods") or {})
    for name, knobs in new["methods"].items():
        if name in seen and seen[name] != knobs:
            raise RawError(f"{path}: cannot resume: method {name} was measured with {seen[name]}, this run asks "
                           f"{knobs}; use another --out directory")


def run_grid(out_dir, model: ModelSpec, methods: dict, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
             tp: int = 1, grid: Grid | None = None, command: str = "", retry_oom: bool = False,
             tables: list[str] | None = None, contiguous_decode: bool = False, progress: bool | None = None) -> Path:
    """Measure every point of the grid not yet in ``out_dir/raw.jsonl``; returns the raw file's path."""
    grid = grid or GRIDS["full" if device.startswith("cuda") else "tiny"]
    ctx = Ctx(model, methods, device, dtype, tp, grid, contiguous_decode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = raw_path(out)
    header = make_header(ctx, command)
    done: dict = {}
    if raw.exists() and raw.stat().st_size > 0:
        try:
            old, sessions, done = read_raw(raw, repair=True)
        except RawError:
            if raw.stat().st_size > 0:  # a real problem (not just a header cut off by a kill)
                raise
            old = None
        if old is not None:
            _check_resumable(raw, old, sessions, header)
    else:
        old = None
    points = plan(grid, model, methods, tables)
    skip = {k for k, rec in done.items() if not (retry_oom and rec.get("oom"))}
    todo = [(t, a) for t, a in points if point_key(t, a) not in skip]
    from tqdm import tqdm

    with open(raw, "a") as f, torch.inference_mode():
        if old is None:
            append_record(f, header)
        elif todo:
            append_record(f, {"record": "session", "date": header["date"], "command": command, "methods": header["methods"],
                              "torch": header["torch"], "driver": header["driver"]})
        bar = tqdm(total=len(points), initial=len(points) - len(todo), unit="pt", desc="kvprof kernels",
                   disable=progress is False, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
        try:
            for table, axes in todo:
                bar.set_postfix_str(f"{table} {','.join(map(str, axes.values()))}", refresh=False)
                append_record(f, measure_point(table, axes, ctx))
                bar.update()
        finally:
            bar.close()
    return raw


# ================================================================================================
# --dry-run: point counts and a datasheet-roofline estimate of the run time (no measurement)
# ================================================================================================


def estimate(grid: Grid, model: ModelSpec, methods: dict, tp: int = 1, peak_flops: float = 989.4e12,
             peak_bw: float = 3350e9, overhead_s: float = 0.010, call_floor_s: float = 20e-6,
             gen_bw: float = 1e12, contiguous_decode: bool = False, tables=None) -> dict:
    """Per table: points and estimated wall seconds under stated assumptions (see docs/kvprof-kernels.md).

    Per point: ``overhead_s`` (Python, allocation, events) + input generation (bytes / ``gen_bw``, times
    the rotation count) + (warmup + 1 + reps) x kernel time, kernel time = max(FLOPs / peak, bytes / bw,
    ``call_floor_s``) and reps = clamp(target / kernel time). Inputs are sized on the meta device.
    """
    ctx = Ctx(model, methods, "meta", torch.bfloat16, tp, grid, contiguous_decode)
    per: dict[str, list] = {}
    l2 = 50 * 2**20
    for table, axes in plan(grid, model, methods, tables):
        b = build_bench(table, axes, ctx)
        set_bytes = max(1, _nbytes(b.make_args(0)))
        ctx._cache.clear()
        n_rot = max(1, min(grid.max_rotation, math.ceil(2 * l2 / set_bytes)))
        t = b.divisor * max(b.flops / peak_flops, b.bytes / peak_bw, call_floor_s)  # one timed call
        reps = max(grid.min_reps, min(grid.max_reps, math.ceil(grid.target_s / t)))
        wall = overhead_s + n_rot * set_bytes / gen_bw + (grid.warmup + 1 + reps) * t
        entry = per.setdefault(table, [0, 0.0, 0])
        entry[0] += 1
        entry[1] += wall
        entry[2] = max(entry[2], set_bytes)
    return {t: {"points": v[0], "est_s": v[1], "max_input_bytes": v[2]} for t, v in per.items()}


#: the pessimistic variant --dry-run prints too: 30 % of the datasheet peaks, 50 ms overhead per point
PESSIMISTIC = dict(peak_flops=0.3 * 989.4e12, peak_bw=0.3 * 3350e9, overhead_s=0.05, call_floor_s=50e-6, gen_bw=0.3e12)


def print_estimate(est: dict, file=None) -> float:
    file = file or sys.stdout
    total_p = sum(v["points"] for v in est.values())
    total_s = sum(v["est_s"] for v in est.values())
    print(f"{'table':<32} {'points':>7} {'est. s':>8} {'max input GB':>13}", file=file)
    for t, v in est.items():
        print(f"{t:<32} {v['points']:>7} {v['est_s']:>8.1f} {v['max_input_bytes'] / 1e9:>13.2f}", file=file)
    print(f"{'total':<32} {total_p:>7} {total_s:>8.1f}", file=file)
    return total_s
