"""``kvsim bench``: fixed-batch prefill and decode throughput, the way kernel papers (and the seed
paper's LMDeploy measurements) report it, for one point or a whole sweep in one process.

A point is B identical requests: the whole prompt of each in one prefill step (which samples the first
token), then N - 1 decode steps. ``prefill_throughput`` = B x L / prefill step time,
``decode_throughput`` = B / mean decode step time. A sweep is the product of methods, batch sizes and
prompt lengths; with ``none`` among the methods every row also gets its ratio to ``none`` at the same
batch and prompt (``prefill_ratio_to_none``, ``decode_ratio_to_none``), the quantity the seed paper plots.
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

from kvsim.cost.base import StepShape
from kvsim.errors import ConfigError

BENCH_COLUMNS = [
    "model", "hardware", "engine", "method", "cost_model", "batch_size", "prompt_len", "output_len",
    "prefill_time_s", "prefill_throughput", "mean_decode_step_s", "decode_throughput", "total_time_s",
    "prefill_ratio_to_none", "decode_ratio_to_none", "kv_blocks_needed", "kv_blocks_available", "oom",
]
#: keys a grid file may hold (lists where several values make sense)
GRID_KEYS = ("model", "hardware", "engine", "method", "batch_size", "prompt_len", "output_len")


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"bench: {name}={v!r} must be a positive integer")
    return v


def bench_point(spec, cost, batch_size: int, prompt_len: int, output_len: int) -> dict:
    """One fixed-batch point on an already built spec and cost model."""
    from kvsim.build import make_kv
    from kvsim.engine.memory import num_kv_blocks

    for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("output_len", output_len)):
        _positive(name, v)
    meth = cost.method if hasattr(cost, "method") else spec.method
    blocks = num_kv_blocks(spec.model, spec.hardware, spec.config, meth)
    kv = make_kv(spec.model, meth, spec.config, max(1, blocks))
    need = batch_size * kv.lifetime_blocks(prompt_len, prompt_len + output_len - 1)
    prefill_s = cost.step_time_s(StepShape(0, 0, [(prompt_len, prompt_len, True)] * batch_size))
    decode = [cost.decode_step_time_s(batch_size, batch_size * meth.kept_tokens(prompt_len, prompt_len + i))
              for i in range(1, output_len)]  # after step i: prompt + i tokens computed
    mean_decode = sum(decode) / len(decode) if decode else 0.0
    return {
        "model": spec.model.name, "hardware": spec.hardware.name, "engine": getattr(spec, "engine", None) or "vllm",
        "method": meth.spec_string(), "cost_model": cost.name, "batch_size": batch_size, "prompt_len": prompt_len,
        "output_len": output_len, "kv_blocks_needed": need, "kv_blocks_available": blocks, "oom": need > blocks,
        "prefill_time_s": prefill_s, "mean_decode_step_s": mean_decode,
        "prefill_throughput": batch_size * prompt_len / prefill_s,
        "decode_throughput": batch_size / mean_decode if mean_decode else None,
        "total_time_s": prefill_s + sum(decode),
    }


def bench(model="llama-3.1-8b", hardware="h100", method="none", batch_size=8, prompt_len=1024, output_len=128,
          config=None, profile=None, auto_profile=True, engine=None) -> dict:
    """One point (see the module docstring)."""
    from kvsim.build import make_cost, make_spec

    for name, v in (("batch_size", batch_size), ("prompt_len", prompt_len), ("output_len", output_len)):
        _positive(name, v)
    spec = make_spec(model, hardware, method, config, profile, auto_profile=auto_profile, engine=engine)
    return bench_point(spec, make_cost(spec), batch_size, prompt_len, output_len)


def bench_sweep(methods, batch_sizes, prompt_lens, output_len=128, model="llama-3.1-8b", hardware="h100",
                config=None, profile=None, auto_profile=True, engine=None, progress: bool = False) -> list[dict]:
    """Every (method, batch size, prompt length) point, one spec and cost model per method."""
    from kvsim.build import make_cost, make_spec
    from kvsim.methods import parse_method

    methods = [m if hasattr(m, "spec_string") else parse_method(m) for m in methods]
    if not methods or not batch_sizes or not prompt_lens:
        raise ConfigError("bench: the sweep needs at least one method, batch size and prompt length")
    for b in batch_sizes:
        _positive("batch_size", b)
    for p in prompt_lens:
        _positive("prompt_len", p)
    _positive("output_len", output_len)
    total = len(methods) * len(batch_sizes) * len(prompt_lens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="pt", desc="kvsim bench", disable=not sys.stderr.isatty())
    rows = []
    try:
        for meth in methods:
            spec = make_spec(model, hardware, meth, config, profile, auto_profile=auto_profile, engine=engine)
            cost = make_cost(spec)
            for b, p in itertools.product(batch_sizes, prompt_lens):
                rows.append(bench_point(spec, cost, b, p, output_len))
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    base = {(r["batch_size"], r["prompt_len"]): r for r in rows if r["method"] == "none"}
    for r in rows:
        b = base.get((r["batch_size"], r["prompt_len"]))
        r["prefill_ratio_to_none"] = r["prefill_throughput"] / b["prefill_throughput"] if b else None
        r["decode_ratio_to_none"] = (r["decode_throughput"] / b["decode_throughput"]
                                     if b and r["decode_throughput"] and b["decode_throughput"] else None)


def load_grid(path) -> dict:
    """A YAML grid file: keys of ``GRID_KEYS``; scalars or lists. Unknown keys are refused."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: grid file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a grid file is a mapping of {', '.join(GRID_KEYS)}")
    bad = sorted(set(data) - set(GRID_KEYS))
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(repr, bad))}; a bench grid has {', '.join(GRID_KEYS)}")
    return data


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _int_list(text: str, flag: str) -> list[int]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: {part!r} is not an integer") from None
    if not out:
        raise ConfigError(f"{flag} {text!r}: no values")
    return out


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BENCH_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in BENCH_COLUMNS})
    (out / "bench.json").write_text(json.dumps(rows, indent=1) + "\n")


def format_table(rows: list[dict]) -> str:
    def f(x, d=1):
        return "-" if x is None else f"{x:,.{d}f}"

    w = max(6, *(len(r["method"]) for r in rows))
    lines = [f"{'method':<{w}} {'B':>4} {'L':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill/none':>12} {'decode/none':>11}"]
    for r in rows:
        lines.append(f"{r['method']:<{w}} {r['batch_size']:>4} {r['prompt_len']:>6} {f(r['prefill_throughput']):>14} "
                     f"{f(r['decode_throughput']):>13} {f(r['prefill_ratio_to_none'], 3):>12} {f(r['decode_ratio_to_none'], 3):>11}"
                     + ("  [OOM: KV does not fit]" if r["oom"] else ""))
    return "\n".join(lines)


__all__ = ["bench", "bench_point", "bench_sweep", "BENCH_COLUMNS", "load_grid"]
