"""``kvsim validate``: replay a measured serving run and say how far kvsim is from it.

A *case* is a folder in the format of ``shared/validation`` (and of ``kvprof replay``'s output):

    run.yaml        engine options in vLLM's names, plus descriptive keys (model HF id, gpu.sku, workload)
    measured.csv    one row per request: request_id, arrival_time_s (realised), prompt_tokens,
                    output_tokens, ttft_ms, tpot_ms, e2el_ms[, queue_ms]
    anchor.txt      optional: another simulator's published predicted-vs-measured table for the run
    steps.csv       optional: one row per measured engine step (columns in docs/fidelity.md)
    engine_timeseries.csv   optional: per-second running / waiting counts of the real engine

The case's workload (``workload:`` in run.yaml, relative to it) is replayed with exactly the run's
engine options, each request arriving at its *realised* time from measured.csv (the tightest replay),
and predictions are joined to measurements by ``request_id``. Percentiles are numpy's linear
interpolation (as vLLM's benchmark and the anchors use); ``request_throughput`` = completed requests /
(last finish - first arrival), the same definition for both sides.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import yaml

from kvsim.config import EngineConfig, config_from_mapping
from kvsim.errors import ConfigError
from kvsim.specs.model import HF_MODELS  # Hugging Face ids -> shipped names

METRICS = ("ttft_ms", "tpot_ms", "e2el_ms")
STATS = ("mean", "p50", "p90", "p99")
ERROR_COLUMNS = ["case", "metric", "stat", "predicted", "measured", "error_pct"]

#: GPU product names (CUDA device names) -> kvsim hardware names; matched as regexes, first wins
GPU_SKUS = [
    (r"rtx\s*pro\s*6000", "rtx-pro-6000"),
    (r"rtx\s*4090", "rtx-4090"),
    (r"rtx\s*a6000", "rtx-a6000"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b", "h100"),
    (r"\ba100\b", "a100"),
    (r"\bl40s\b", "l40s"),
    (r"\ba40\b", "a40"),
]
#: run.yaml keys that name the case itself (neither engine options nor run descriptions)
CASE_KEYS = {"case_id"}

#: columns of steps.csv (one row per engine step); see docs/fidelity.md
STEP_COLUMNS = ["step", "replica", "start_s", "end_s", "duration_ms", "num_prefill_tokens", "num_prefill_seqs",
                "num_decode_seqs", "decode_kv_tokens", "prefill_chunks", "num_preempted"]
#: optional: the largest KV-token count among the step's decodes (``StepShape.decode_max_kept``)
MAX_KV_COLUMN = "decode_max_kv_tokens"


# ------------------------------------------------------------------------------------------------
# reading a case
@dataclass
class Case:
    path: Path
    case_id: str
    run_yaml: Path
    config: EngineConfig
    extra: dict
    model: str
    hardware: str
    method: str | None
    workload: Path
    measured: list[dict]
    anchor: dict | None = None
    steps_csv: Path | None = None
    timeseries_csv: Path | None = None
    #: set by case_requests when prompt identity was inferred from a repeating cycle
    prompt_repetition: object | None = None


def model_name(value, source: str) -> str:
    from kvsim.specs.model import load_model

    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: key 'model': value {value!r} is not a model name")
    key = value.strip().lower()
    if key in HF_MODELS:
        return HF_MODELS[key]
    path = Path(value.strip())
    if not path.is_absolute():
        path = Path(source).parent / path
    if value.strip().endswith(".json") or path.is_dir():
        try:
            load_model(str(path))
        except Exception as e:
            raise ConfigError(f"{source}: key 'model': value {value!r}: {e}") from None
        return str(path)  # a config.json: kept as a path, which make_spec loads
    try:
        return load_model(value.strip()).name
    except Exception:
        raise ConfigError(f"{source}: key 'model': value {value!r} is neither a known Hugging Face id "
                          f"({', '.join(sorted(HF_MODELS))}) nor a kvsim model name") from None


def hardware_name(extra: dict, source: str, override: str | None = None) -> str:
    from kvsim.specs.hardware import load_hardware

    if override:
        return load_hardware(override).name
    if extra.get("hardware"):
        try:
            return load_hardware(str(extra["hardware"])).name
        except Exception as e:
            raise ConfigError(f"{source}: key 'hardware': value {extra['hardware']!r}: {e}") from None
    gpu = extra.get("gpu")
    sku = gpu.get("sku") if isinstance(gpu, dict) else gpu
    if not sku:
        raise ConfigError(f"{source}: neither 'hardware' nor 'gpu.sku' is given: cannot tell the GPU")
    for pat, name in GPU_SKUS:
        if re.search(pat, str(sku).lower()):
            return name
    try:
        return load_hardware(str(sku)).name
    except Exception:
        hint = ("; this run was on a CPU (kvprof replay without a GPU, e.g. --tiny): kvsim models GPUs, so "
                "`kvsim validate --hardware NAME` replays it on one (the errors then compare a CPU with a "
                "modelled GPU and check the case format, not kvsim's fidelity)" if "cpu" in str(sku).lower() else
                "; `kvsim validate --hardware NAME` names the GPU to model (`kvsim hardware` lists them)")
        raise ConfigError(f"{source}: key 'gpu.sku': value {sku!r} is not a GPU kvsim knows{hint}") from None


def _read_measured(path: Path) -> list[dict]:
    need = ("request_id", "arrival_time_s", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2el_ms")
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        missing = [c for c in need if c not in (rd.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = []
        for i, r in enumerate(rd, start=2):
            try:
                rows.append({
                    "request_id": r["request_id"],
                    "arrival_time_s": float(r["arrival_time_s"]),
                    "prompt_tokens": int(r["prompt_tokens"]),
                    "output_tokens": int(r["output_tokens"]),
                    "ttft_ms": float(r["ttft_ms"]),
                    "tpot_ms": float(r["tpot_ms"]) if r["tpot_ms"] not in ("", None) else math.nan,
                    "e2el_ms": float(r["e2el_ms"]),
                    "queue_ms": float(r["queue_ms"]) if r.get("queue_ms") not in ("", None) else math.nan,
                })
            except (TypeError, ValueError) as e:
                raise _measured_error(path, i, r, e) from None
    return rows


def _measured_error(path, line: int, r: dict, e: Exception) -> ConfigError:
    """The first field of a measured.csv row that does not convert, named with its value."""
    for k, conv in (("arrival_time_s", float), ("prompt_tokens", int), ("output_tokens", int), ("ttft_ms", float),
                    ("tpot_ms", float), ("e2el_ms", float), ("queue_ms", float)):
        v = r.get(k)
        if v in ("", None) and k in ("tpot_ms", "queue_ms"):
            continue
        try:
            conv(v)
        except (TypeError, ValueError):
            return ConfigError(f"{path}:{line}: field '{k}': bad value {v!r}")
    return ConfigError(f"{path}:{line}: bad value ({e})")


def read_anchor(path: Path) -> dict | None:
    """LLMServingSim's ``summary.txt`` (vLLM vs Sim, mean/median/p90/p95/p99 of TTFT, TPOT, latency)."""
    if not path.is_file():
        return None
    names = {"ttft": "ttft_ms", "tpot": "tpot_ms", "latency": "e2el_ms"}
    stats = {"mean": "mean", "median": "p50", "p90": "p90", "p95": "p95", "p99": "p99"}
    out: dict = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*(TTFT|TPOT|Latency)\s+(Mean|Median|P\d+)\s+([-\d.]+)\s+([-\d.]+)\s+([-+\d.]+)%", line, re.I)
        if m:
            metric, stat = names[m.group(1).lower()], stats.get(m.group(2).lower())
            if stat:
                out.setdefault(metric, {})[stat] = {"measured": float(m.group(3)), "sim": float(m.group(4)),
                                                    "diff_pct": float(m.group(5))}
    header = path.read_text().splitlines()[0] if out else ""
    return {"metrics": out, "header": header} if out else None


#: the first vLLM release that schedules asynchronously by default (release notes of v0.14.0:
#: "Async scheduling is now enabled by default", https://github.com/vllm-project/vllm/releases/tag/v0.14.0)
VLLM_ASYNC_DEFAULT_SINCE = (0, 14)


def vllm_async_by_default(extra: dict, source: str) -> bool:
    """Whether a case that does not record ``async_scheduling`` ran with it: vLLM >= 0.14 by default."""
    if str(extra.get("engine", "vllm")).lower() != "vllm" or "engine_version" not in extra:
        return False
    m = re.match(r"^\s*(\d+)\.(\d+)", str(extra["engine_version"]))
    if not m:
        raise ConfigError(f"{source}: key 'engine_version': value {extra['engine_version']!r} is not a version")
    return (int(m.group(1)), int(m.group(2))) >= VLLM_ASYNC_DEFAULT_SINCE


def load_case(case_dir, hardware: str | None = None) -> Case:
    """Read a measured case folder; ``hardware`` overrides the GPU its run.yaml names."""
    d = Path(case_dir)
    run = d / "run.yaml"
    if not run.is_file():
        raise ConfigError(f"{d}: not a validation case (no run.yaml)")
    try:
        data = yaml.safe_load(run.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{run}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{run}: top level must be a mapping of engine options")
    case_id = str(data.get("case_id") or d.name)
    engine_keys = {k: v for k, v in data.items() if k not in CASE_KEYS}
    cfg, extra = config_from_mapping(engine_keys, source=str(run))
    if "num_gpu_blocks" in extra and cfg.num_gpu_blocks_override is None:
        nb = extra["num_gpu_blocks"]
        if isinstance(nb, bool) or not isinstance(nb, int) or nb < 1:
            raise ConfigError(f"{run}: key 'num_gpu_blocks': value {nb!r} is not a positive integer")
        cfg = dataclasses.replace(cfg, num_gpu_blocks_override=nb)
    if "async_scheduling" not in engine_keys and vllm_async_by_default(extra, str(run)):
        cfg = dataclasses.replace(cfg, async_scheduling=True)
    if "model" not in extra:
        raise ConfigError(f"{run}: key 'model' is missing")
    model = model_name(extra["model"], str(run))
    hw = hardware_name(extra, str(run), hardware)
    wl = extra.get("workload")
    if not wl:
        raise ConfigError(f"{run}: key 'workload' is missing (path of the trace, relative to run.yaml)")
    workload = (run.parent / str(wl)).resolve()
    if not workload.is_file():
        raise ConfigError(f"{run}: key 'workload': value {wl!r}: no such file {workload}")
    meas_path = d / "measured.csv"
    if not meas_path.is_file():
        raise ConfigError(f"{d}: measured.csv is missing")
    method = extra.get("method")
    return Case(d, case_id, run, cfg, extra, model, hw, str(method) if method else None, workload,
                _read_measured(meas_path), read_anchor(d / "anchor.txt"),
                d / "steps.csv" if (d / "steps.csv").is_file() else None,
                d / "engine_timeseries.csv" if (d / "engine_timeseries.csv").is_file() else None)


#: a workload without prefix hashes whose prompt lengths repeat with a period P at this rate or more is
#: read as a list of P prompts sent in turn (see ``repeated_prompts``)
REPEAT_MIN_MATCH = 0.95


@dataclass
class PromptRepetition:
    period: int
    match: float          # fraction of requests whose prompt length equals that of the request P earlier
    shared: int           # requests given their prompt's hashes (length equal to the period slot's)
    total: int

    def describe(self) -> str:
        return (f"prompts repeat every {self.period} requests ({self.match:.1%} of lengths match): "
                f"{self.shared} of {self.total} requests share their prompt's prefix hashes")


def repeated_prompts(reqs, block_tokens: int = 16, max_period: int | None = None) -> PromptRepetition | None:
    """A synthetic workload generated from a fixed list of P prompts sent in turn (inference-perf's
    data generators cycle their pre-generated prompts: ``prompts[data_index % len(prompts)]``) repeats
    each prompt every P requests, and with prefix caching the server computes only its last tokens. The
    workload file has no token ids or hashes, but the prompt lengths betray the cycle: find the smallest
    P whose lengths repeat for at least ``REPEAT_MIN_MATCH`` of the requests, and give every request
    whose length equals its slot's (``index mod P``) most common length the chained block hashes of that
    slot's prompt. A request whose length differs is left without hashes (nothing shared). In file order;
    modifies ``reqs`` in place; None (nothing changed) when any request has hashes or no period fits."""
    from collections import Counter

    n = len(reqs)
    if n < 8 or any(r.prefix_hashes for r in reqs):
        return None
    lens = [r.prompt_tokens for r in reqs]
    best = None
    for period in range(1, min(max_period or n // 4, n // 4) + 1):
        same = sum(1 for i in range(n - period) if lens[i] == lens[i + period])
        if same >= REPEAT_MIN_MATCH * (n - period):
            best = (period, same / (n - period))
            break
    if best is None or best[0] == 1:  # one length throughout says nothing about identity
        return None
    period, match = best
    slot_len = {k: Counter(lens[k::period]).most_common(1)[0][0] for k in range(period)}
    shared = 0
    for i, r in enumerate(reqs):
        k = i % period
        if r.prompt_tokens != slot_len[k] or r.prompt_tokens < block_tokens:
            continue
        # block j of prompt k: distinct across prompts and positions, the same for every resend
        r.prefix_hashes = tuple((k + 1) * (1 << 24) + j for j in range(r.prompt_tokens // block_tokens))
        r.hash_block_tokens = block_tokens
        shared += 1
    return PromptRepetition(period, match, shared, n)


def case_requests(case: Case, arrivals: str = "measured", prompt_identity: str = "infer"):
    """The workload's requests, arriving at the realised times of measured.csv (``arrivals='measured'``)
    or at the workload's intended times shifted so the first is 0 (``'workload'``). With
    ``prompt_identity='infer'`` a workload without prefix hashes whose prompts repeat in a cycle gets
    them (``repeated_prompts``; the finding is kept in ``case.prompt_repetition``)."""
    from kvsim.workload.readers import read_trace

    reqs = [r for r in read_trace(case.workload)]
    case.prompt_repetition = repeated_prompts(reqs) if prompt_identity == "infer" else None
    meas = {m["request_id"]: m for m in case.measured}
    ids = {r.request_id for r in reqs}
    missing = [m for m in meas if m not in ids]
    if missing:
        raise ConfigError(f"{case.path / 'measured.csv'}: request_id {missing[0]!r} is not in the workload {case.workload}")
    out = []
    t0 = min(r.arrival_time_s for r in reqs if r.request_id in meas) if reqs else 0.0
    for r in reqs:
        m = meas.get(r.request_id)
        if m is None:
            continue
        if m["prompt_tokens"] != r.prompt_tokens:
            raise ConfigError(f"{case.path / 'measured.csv'}: {r.request_id}: prompt_tokens {m['prompt_tokens']} "
                              f"differs from the workload's {r.prompt_tokens}")
        r.output_tokens = m["output_tokens"]
        r.arrival_time_s = m["arrival_time_s"] if arrivals == "measured" else r.arrival_time_s - t0
        out.append(r)
    out.sort(key=lambda r: r.arrival_time_s)
    return out


#: time a request spends outside the engine when it is timed at an HTTP client (vLLM's OpenAI server:
#: HTTP request and response, prompt tokenisation, hand-off to and from the engine core, detokenisation,
#: server-sent events). See docs/fidelity.md, "Client overhead", for the value and how it was chosen.
CLIENT_OVERHEAD_MS = 8.7


def measured_at(case: Case) -> str:
    """``client`` or ``engine``: run.yaml's ``measured_at`` where given, else ``engine`` when measured.csv
    has engine-side queue times (vLLM's per-request engine stats, kvprof replay) and ``client`` when not."""
    v = case.extra.get("measured_at")
    if v is not None:
        if v not in ("client", "engine"):
            raise ConfigError(f"{case.run_yaml}: key 'measured_at': value {v!r} is not 'client' or 'engine'")
        return v
    has_queue = any(not math.isnan(m.get("queue_ms", math.nan)) for m in case.measured)
    return "engine" if has_queue else "client"


def case_client_overhead_ms(case: Case) -> float:
    """What kvsim adds to a case's predicted TTFT and e2el: run.yaml's ``client_overhead_ms`` where given,
    else ``CLIENT_OVERHEAD_MS`` for times taken at a client and 0 for times taken in the engine."""
    v = case.extra.get("client_overhead_ms")
    if v is not None:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{case.run_yaml}: key 'client_overhead_ms': value {v!r} is not a number") from None
        if not v >= 0:
            raise ConfigError(f"{case.run_yaml}: key 'client_overhead_ms': value {v!r} must be >= 0")
        return v
    return CLIENT_OVERHEAD_MS if measured_at(case) == "client" else 0.0


# ------------------------------------------------------------------------------------------------
# statistics
def stat(values, name: str) -> float:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan
    if name == "mean":
        return float(v.mean())
    return float(np.percentile(v, float(name[1:])))


def throughput(arrivals, finishes) -> float:
    if not finishes:
        return math.nan
    span = max(finishes) - min(arrivals)
    return len(finishes) / span if span > 0 else math.nan


def err_pct(pred: float, meas: float) -> float:
    if meas is None or pred is None or math.isnan(meas) or math.isnan(pred) or meas == 0:
        return math.nan
    return (pred - meas) / meas * 100.0


# ------------------------------------------------------------------------------------------------
# replay with a step log
class StepLog:
    """Wraps a replica's cost model and writes down every step it costs; a step enters the log when
    the replica commits it (a fast-forward stretch cut short by an arrival keeps only its first steps)."""

    def __init__(self, cost, replica_id: int, sink: list):
        self.inner = cost
        self.name = cost.name
        self.replica_id = replica_id
        self.sink = sink
        self.now = 0.0
        self.planned: list = []

    def _log(self, nd, kv, chunks, dt, mk=0):
        self.planned.append((self.replica_id, self.now, dt, nd, kv, chunks, mk))
        self.now += dt

    def committed(self, n: int) -> None:
        self.sink.extend(self.planned[:n])
        self.planned = []

    def step_time_s(self, shape):
        dt = self.inner.step_time_s(shape)
        self._log(shape.num_decode_seqs, shape.decode_kept_tokens, list(shape.prefill_chunks), dt, shape.decode_max_kept)
        return dt

    def decode_step_time_s(self, num_seqs, kept, max_kept=0):
        dt = self.inner.decode_step_time_s(num_seqs, kept, max_kept)
        self._log(num_seqs, kept, [], dt, max_kept)
        return dt

    def decode_step_fn(self, num_seqs):
        # every step goes through the log (not the inner model's own per-batch function)
        return partial(self.decode_step_time_s, num_seqs)

    def breakdown(self, shape):
        return self.inner.breakdown(shape)

    def __getattr__(self, k):
        return getattr(self.inner, k)


def _wrap_begin(replica, log: StepLog):
    orig_begin, orig_commit = replica.begin, replica.commit

    def begin(now, horizon_s=float("inf")):
        log.now = now
        log.planned = []
        return orig_begin(now, horizon_s)

    def commit():
        p = replica.pending
        if p is not None and not p.ff_steps and log.planned:
            # a lockstep group's step lasts the group's time, not the rank's own (kvsim.engine.sim)
            rid, start, _, nd, kv, chunks, mk = log.planned[0]
            log.planned[0] = (rid, start, p.end_s - p.start_s, nd, kv, chunks, mk)
        log.committed(p.ff_steps if p is not None and p.ff_steps else 1)
        return orig_commit()

    replica.begin = begin
    replica.commit = commit


def profile_engine(prof) -> str:
    """Which serving stack's kernels a profile times: ``vllm`` (LLMServingSim's profiles are vLLM 0.19's
    own layers), ``sarathi`` (Vidur's: Sarathi-Serve's eager layers, cuBLAS and unfused norms of 2024),
    ``kvprof`` (kvprof's plain torch kernels), else ``unknown``."""
    prov = getattr(prof, "provenance", None) or {}
    src = str(prov.get("source", ""))
    if "vllm" in prov or "llmservingsim" in src:
        return "vllm"
    if "vidur" in src:
        return "sarathi"
    if "kvprof" in src:
        return "kvprof"
    return "unknown"


def resolve_spec(case: Case, use_profile: bool = True, profile=None, roofline_params: str = "withheld"):
    """The RunSpec of a case. Without a profile the roofline's params are the calibration fitted with
    this (hardware, model) withheld (``roofline_params='withheld'``) or on everything (``'calibrated'``).

    The committed profile of the case's (model, GPU, TP) is used unless it times another serving stack's
    kernels than the case's vLLM run (Vidur's Sarathi-Serve profiles): then the roofline calibrated on
    that profile's kernel timings stands in (``spec.skipped_profile`` names it). ``profile`` given
    explicitly is always used."""
    from kvsim import api

    spec = api.make_spec(case.model, case.hardware, case.method, case.config,
                         profile=profile if use_profile else None, auto_profile=use_profile)
    spec.skipped_profile = None
    if (use_profile and profile is None and spec.profile is not None
            and str(case.extra.get("engine", "vllm")).lower() == "vllm" and profile_engine(spec.profile) == "sarathi"):
        spec.skipped_profile = spec.profile.name
        spec.profile = None
        roofline_params = "calibrated"
    if spec.profile is None:
        from kvsim.cost.roofline import calibrated_params

        params = None
        if roofline_params == "withheld":
            from kvsim.cost.roofline import withheld_params

            params = withheld_params(case.hardware, case.model)
        spec.roofline_params = params or calibrated_params(case.hardware)
    return spec


def simulate(case: Case, spec, arrivals: str = "measured", timeline_out=None, progress=None,
             prompt_identity: str = "infer"):
    """Replay the case; returns (summary, rows by request_id, step log)."""
    from kvsim import api
    from kvsim.engine.cluster import make_router
    from kvsim.engine.output_length import LengthSampler
    from kvsim.engine.sim import Simulation
    from kvsim.metrics.collector import Recorder
    from kvsim.methods.base import LengthRatio
    from kvsim.metrics.summary import build_summary

    rec = Recorder(None, timeline_out, spec.slo, 1.0, keep_rows=True)
    replicas = api.build_replicas(spec, rec, True)
    steps: list = []
    for r in replicas:
        log = StepLog(r.cost, r.id, steps)
        r.cost = log
        _wrap_begin(r, log)
    # a measured case pins every request's output length (ignore_eos): no length ratio is sampled
    lengths = LengthRatio(source="measured case: output lengths as served")
    sim = Simulation(replicas, make_router(spec.config.router), rec, LengthSampler(lengths, spec.config.seed), progress)
    w0 = time.perf_counter()
    sim.run(case_requests(case, arrivals, prompt_identity))
    wall = time.perf_counter() - w0
    for r in replicas:  # unwrap: summary reads cost.name
        r.cost = r.cost.inner
    summary = build_summary(spec, rec, replicas, lengths, sim, wall)
    rows = {r["request_id"]: r for r in rec.rows if r["status"] == "completed"}
    return summary, rows, steps


# ------------------------------------------------------------------------------------------------
# measured steps
def _parse_chunks(text: str):
    chunks = []
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        a = part.split(":")
        if len(a) != 3:
            raise ValueError(f"prefill chunk {part!r} is not new:kv_total:last")
        chunks.append((int(a[0]), int(a[1]), a[2].strip() in ("1", "true", "True")))
    return chunks


def step_errors(steps_csv: Path, cost) -> tuple[list[dict], dict]:
    """Cost each measured step's shape with kvsim's cost model; per-step rows and a summary."""
    from kvsim.cost.base import StepShape

    out = []
    with open(steps_csv, newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            try:
                nd = int(r["num_decode_seqs"])
                kv = int(r["decode_kv_tokens"])
                chunks = _parse_chunks(r.get("prefill_chunks", ""))
                meas = float(r["duration_ms"])
                mk = int(r.get(MAX_KV_COLUMN) or 0)
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{steps_csv}:{i}: bad step row ({e})") from None
            if nd == 0 and not chunks:
                continue
            pred = cost.step_time_s(StepShape(nd, kv, chunks, mk)) * 1e3
            out.append({"step": r.get("step", i - 1), "kind": "decode" if not chunks else ("prefill" if nd == 0 else "mixed"),
                        "num_decode_seqs": nd, "decode_kv_tokens": kv, "num_prefill_tokens": sum(c[0] for c in chunks),
                        "measured_ms": meas, "predicted_ms": pred, "error_pct": err_pct(pred, meas)})
    summ = {}
    for kind in ("all", "decode", "mixed", "prefill"):
        sel = [o for o in out if kind == "all" or o["kind"] == kind]
        if not sel:
            continue
        e = np.array([o["error_pct"] for o in sel])
        summ[kind] = {"steps": len(sel), "median_abs_error_pct": float(np.median(np.abs(e))),
                      "p90_abs_error_pct": float(np.percentile(np.abs(e), 90)),
                      "total_time_error_pct": err_pct(sum(o["predicted_ms"] for o in sel), sum(o["measured_ms"] for o in sel))}
    return out, summ


# ------------------------------------------------------------------------------------------------
# one case
@dataclass
class CaseResult:
    case: Case
    errors: list[dict]
    summary: dict
    joined: list[dict]
    steps: list = field(default_factory=list)
    step_summary: dict | None = None
    label: str = ""
    diagnostics: dict = field(default_factory=dict)


def validate_case(case: Case, out_dir: Path | None = None, use_profile: bool = True, profile=None,
                  roofline_params: str = "withheld", arrivals: str = "measured", plot: bool = True,
                  progress=None, prompt_identity: str = "infer", client_overhead_ms=None,
                  roofline_overrides=None) -> CaseResult:
    """``client_overhead_ms``: added to every predicted TTFT and e2el; None: the case's own
    (``case_client_overhead_ms``). ``roofline_overrides``: roofline parameters replaced for this run
    (a mapping of ``RooflineParams`` fields; for fitting studies such as results/validation/h100_fit.py)."""
    spec = resolve_spec(case, use_profile, profile, roofline_params)
    if roofline_overrides:
        from kvsim.cost.roofline import calibrated_params

        base = spec.roofline_params or calibrated_params(case.hardware)
        spec.roofline_params = dataclasses.replace(base, **roofline_overrides)
    tl_buf = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tl_buf = open(out_dir / "timeline.csv", "w", newline="")
    try:
        summary, rows, steps = simulate(case, spec, arrivals, tl_buf, progress, prompt_identity)
    finally:
        if tl_buf:
            tl_buf.close()
    client_ms = case_client_overhead_ms(case) if client_overhead_ms is None else float(client_overhead_ms)
    joined = []
    for m in case.measured:
        p = rows.get(m["request_id"])
        j = {"request_id": m["request_id"], "arrival_time_s": m["arrival_time_s"], "prompt_tokens": m["prompt_tokens"],
             "output_tokens": m["output_tokens"]}
        for k in METRICS:
            j[f"measured_{k}"] = m[k]
            v = p[k] if p else None
            if v is not None and k != "tpot_ms":  # a constant on TTFT and e2el leaves their difference alone
                v += client_ms
            j[f"predicted_{k}"] = v
        j["measured_queue_ms"] = m.get("queue_ms")
        j["predicted_num_preemptions"] = p["num_preemptions"] if p else None
        j["predicted_prefix_hit_tokens"] = p["prefix_hit_tokens"] if p else None
        j["predicted_replica"] = p["replica"] if p else None
        joined.append(j)
    errors = []
    for k in METRICS:
        for s in STATS:
            pv = stat([j[f"predicted_{k}"] for j in joined], s)
            mv = stat([j[f"measured_{k}"] for j in joined], s)
            errors.append({"case": case.case_id, "metric": k, "stat": s, "predicted": pv, "measured": mv,
                           "error_pct": err_pct(pv, mv)})
    m_arr = [m["arrival_time_s"] for m in case.measured]
    m_fin = [m["arrival_time_s"] + m["e2el_ms"] / 1e3 for m in case.measured]
    p_fin = [j["arrival_time_s"] + j["predicted_e2el_ms"] / 1e3 for j in joined if j["predicted_e2el_ms"] is not None]
    pt, mt = throughput(m_arr, p_fin), throughput(m_arr, m_fin)
    errors.append({"case": case.case_id, "metric": "request_throughput", "stat": "value", "predicted": pt,
                   "measured": mt, "error_pct": err_pct(pt, mt)})
    if spec.profile is not None:
        label = "profile"
    else:
        src = (spec.roofline_params.source if spec.roofline_params is not None else "") or ""
        label = "roofline (withheld)" if " without " in src else "roofline (calibrated)"
    res = CaseResult(case, errors, summary, joined, steps, label=label)
    res.diagnostics = diagnostics(case, summary, joined, steps)
    res.diagnostics["client_overhead_ms"] = client_ms
    res.diagnostics["skipped_profile"] = getattr(spec, "skipped_profile", None)
    res.diagnostics["measured_at"] = measured_at(case)
    rep = case.prompt_repetition
    res.diagnostics["prompt_repetition"] = rep.describe() if rep is not None else None
    if case.steps_csv is not None:
        base_cost = _cost_of(spec)
        res.steps_measured, res.step_summary = step_errors(case.steps_csv, base_cost)
    if out_dir is not None:
        write_case_outputs(res, out_dir, plot)
    return res


def _cost_of(spec):
    from kvsim.api import make_cost

    return make_cost(spec)


def diagnostics(case: Case, summary: dict, joined: list[dict], steps: list) -> dict:
    """Step- and request-level figures that say where an error comes from."""
    d = {
        "cost_model": summary["cost_model"],
        "kv_blocks_per_replica": summary["kv_blocks_per_replica"],
        "peak_kv_blocks_used": summary["peak_kv_blocks_used"],
        "num_preemptions": summary["num_preemptions"],
        "prefix_cache_hit_rate": summary["prefix_cache_hit_rate"],
        "peak_batch_size": summary["peak_batch_size"],
        "mean_batch_size": summary["mean_batch_size"],
        "engine_steps": summary["sim"]["engine_steps"],
        "sim_wall_s": summary["sim"]["wall_s"],
    }
    dec = [s for s in steps if not s[5]]
    mix = [s for s in steps if s[5]]
    d["decode_steps"] = len(dec)
    d["mixed_steps"] = len(mix)
    d["mean_decode_step_ms"] = 1e3 * float(np.mean([s[2] for s in dec])) if dec else None
    d["mean_mixed_step_ms"] = 1e3 * float(np.mean([s[2] for s in mix])) if mix else None
    d["mean_decode_batch"] = float(np.mean([s[3] for s in dec])) if dec else None
    d["prefill_tokens_computed"] = int(sum(c[0] for s in mix for c in s[5]))
    d["prompt_tokens_total"] = int(sum(m["prompt_tokens"] for m in case.measured))
    q = [j["measured_queue_ms"] for j in joined if j["measured_queue_ms"] is not None and not math.isnan(j["measured_queue_ms"])]
    d["measured_queue_ms_mean"] = float(np.mean(q)) if q else None
    # decode-phase time per output token, predicted and measured (TPOT without the queue)
    return d


# ------------------------------------------------------------------------------------------------
# outputs
def _f(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{nd}f}"


def write_case_outputs(res: CaseResult, out: Path, plot: bool = True) -> None:
    cols = list(res.joined[0]) if res.joined else []
    with open(out / "requests_joined.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for j in res.joined:
            w.writerow({k: ("" if v is None else v) for k, v in j.items()})
    with open(out / "steps.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(STEP_COLUMNS + [MAX_KV_COLUMN])
        for i, (rep, t0, dt, nd, kv, chunks, mk) in enumerate(res.steps):
            w.writerow([i, rep, f"{t0:.6f}", f"{t0 + dt:.6f}", f"{dt * 1e3:.4f}", sum(c[0] for c in chunks), len(chunks),
                        nd, kv, ";".join(f"{a}:{b}:{int(c)}" for a, b, c in chunks), "", mk])
    if getattr(res, "steps_measured", None):
        with open(out / "step_errors.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(res.steps_measured[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(res.steps_measured)
    (out / "summary.json").write_text(json.dumps({"summary": res.summary, "diagnostics": res.diagnostics,
                                                  "step_errors": res.step_summary}, indent=2, default=str) + "\n")
    write_errors_csv(res.errors, out / "errors.csv")
    (out / "errors.md").write_text(format_case_md(res))
    if plot:
        plot_case(res, out / "latency.png")


def write_errors_csv(errors: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(ERROR_COLUMNS)
        for e in errors:
            w.writerow([e["case"], e["metric"], e["stat"], _num(e["predicted"]), _num(e["measured"]), _num(e["error_pct"], 3)])


def _num(x, nd=4):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{nd}f}"


#: targets for cases timed at an HTTP client (the H100 serving runs; issue 15): TTFT carries the client's
#: own overhead and a step or two of scheduling lag, so it gets a wider band
CLIENT_TARGETS = {"ttft_ms": 15.0, "tpot_ms": 5.0, "e2el_ms": 5.0}


def target_pct(res: CaseResult, metric: str, stat_name: str, floor: float = 3.0) -> float:
    """The target for mean/p50: 3 %, or the anchor's published error where that is larger; for a case
    timed at a client without an anchor, ``CLIENT_TARGETS``."""
    a = (res.case.anchor or {}).get("metrics", {}).get(metric, {}).get(stat_name)
    if a:
        return max(floor, abs(a["diff_pct"]))
    if measured_at(res.case) == "client" and metric in CLIENT_TARGETS:
        return CLIENT_TARGETS[metric]
    return floor


def format_case_md(res: CaseResult) -> str:
    c = res.case
    lines = [f"### {c.case_id}  ({c.model} on {c.hardware}, cost model: {res.summary['cost_model']})", "",
             "| metric | stat | measured | kvsim | kvsim err % | anchor sim | anchor err % | target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for e in res.errors:
        a = (c.anchor or {}).get("metrics", {}).get(e["metric"], {}).get(e["stat"])
        tgt = ""
        if e["stat"] in ("mean", "p50"):
            t = target_pct(res, e["metric"], e["stat"])
            ok = not math.isnan(e["error_pct"]) and abs(e["error_pct"]) <= t
            tgt = f"{'ok' if ok else 'MISS'} (±{t:.1f}%)"
        lines.append(f"| {e['metric']} | {e['stat']} | {_f(e['measured'])} | {_f(e['predicted'])} | {_f(e['error_pct'], 1)} | "
                     f"{_f(a['sim']) if a else '-'} | {_f(a['diff_pct'], 1) if a else '-'} | {tgt} |")
    d = res.diagnostics
    lines += ["", f"KV blocks/replica {d['kv_blocks_per_replica']}, peak used {d['peak_kv_blocks_used']}; "
              f"preemptions {d['num_preemptions']}; prefix hit rate "
              f"{_f(100 * d['prefix_cache_hit_rate'], 1) if d['prefix_cache_hit_rate'] is not None else '-'}%; "
              f"batch peak {d['peak_batch_size']}, mean {_f(d['mean_batch_size'], 1)}; steps {d['engine_steps']} "
              f"({d['decode_steps']} decode, mean {_f(d['mean_decode_step_ms'])} ms at mean batch {_f(d['mean_decode_batch'], 1)}; "
              f"{d['mixed_steps']} with prefill, mean {_f(d['mean_mixed_step_ms'])} ms); prefill tokens computed "
              f"{d['prefill_tokens_computed']:,} of {d['prompt_tokens_total']:,} prompt tokens."]
    if res.step_summary:
        lines += ["", "Step time, kvsim's cost model on each measured step's shape:", "",
                  "| steps | n | median abs err % | p90 abs err % | total time err % |", "|---|---:|---:|---:|---:|"]
        for k, v in res.step_summary.items():
            lines.append(f"| {k} | {v['steps']} | {_f(v['median_abs_error_pct'], 1)} | {_f(v['p90_abs_error_pct'], 1)} | "
                         f"{_f(v['total_time_error_pct'], 1)} |")
    return "\n".join(lines) + "\n"


def plot_case(res: CaseResult, path: Path) -> None:
    from kvsim.metrics.plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, k in zip(axes[0], METRICS):
        m = np.sort([j[f"measured_{k}"] for j in res.joined if j[f"measured_{k}"] is not None and not math.isnan(j[f"measured_{k}"])])
        p = np.sort([j[f"predicted_{k}"] for j in res.joined if j[f"predicted_{k}"] is not None])
        ax.plot(m, np.linspace(0, 1, len(m)), label="measured", lw=1.4)
        ax.plot(p, np.linspace(0, 1, len(p)), label=f"kvsim ({res.label})", lw=1.4, ls="--")
        a = (res.case.anchor or {}).get("metrics", {}).get(k, {})
        if a:
            qs = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")]
            ax.plot([a[s]["sim"] for _, s in qs if s in a], [q for q, s in qs if s in a], "k^", ms=5, label="anchor sim (p50/p90/p99)")
        ax.set_xlabel(k)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, k in zip(axes[1], METRICS):
        xs = [j[f"measured_{k}"] for j in res.joined if j[f"predicted_{k}"] is not None]
        ys = [j[f"predicted_{k}"] for j in res.joined if j[f"predicted_{k}"] is not None]
        ax.scatter(xs, ys, s=5, alpha=0.6)
        if xs:
            lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.7)
        ax.set_xlabel(f"measured {k} (per request)")
        ax.set_ylabel(f"kvsim {k}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res.case.case_id}: kvsim ({res.summary['cost_model']}) vs measured", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    if res.case.timeseries_csv is not None and (path.parent / "timeline.csv").is_file():
        plot_queue(res, path.parent / "queue.png")


def plot_queue(res: CaseResult, path: Path) -> None:
    """Running and waiting requests over time: the real engine's stat logger against kvsim's timeline."""
    from kvsim.metrics.plots import _plt

    plt = _plt()
    meas = list(csv.DictReader(open(res.case.timeseries_csv)))
    sim = list(csv.DictReader(open(path.parent / "timeline.csv")))
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [float(r["t"]) for r in meas]
    axes[0].plot(t, [float(r["running"]) for r in meas], label="measured (sum over ranks)")
    axes[1].plot(t, [float(r["waiting"]) for r in meas], label="measured")
    # kvsim's timeline rows come at irregular times (a fast-forward stretch writes one row): carry each
    # replica's last row forward to every whole second
    reps: dict = {}
    for r in sim:
        reps.setdefault(r["replica"], []).append((float(r["time_s"]), int(r["batch_size"]), int(r["num_waiting"])))
    end = max((v[-1][0] for v in reps.values()), default=0.0)
    ts = list(range(1, int(end) + 2))
    run_s, wait_s = [], []
    for x in ts:
        a = b = 0
        for rows in reps.values():
            last = None
            for row in rows:
                if row[0] > x:
                    break
                last = row
            if last is not None:
                a, b = a + last[1], b + last[2]
        run_s.append(a)
        wait_s.append(b)
    axes[0].plot(ts, run_s, ls="--", label="kvsim")
    axes[1].plot(ts, wait_s, ls="--", label="kvsim")
    axes[0].set_ylabel("running")
    axes[1].set_ylabel("waiting")
    axes[1].set_xlabel("time (s)")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{res.case.case_id}: engine queue, measured vs kvsim", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: list[CaseResult]) -> str:
    """One compact table: mean and p50 of each metric per case, with targets."""
    head = "| case | cost model | " + " | ".join(f"{m.split('_')[0].upper()} {s}" for m in METRICS for s in ("mean", "p50")) + " | req/s |"
    lines = [head, "|" + "---|" * (3 + 2 * len(METRICS))]
    for r in results:
        cells = []
        for m in METRICS:
            for s in ("mean", "p50"):
                e = next(x for x in r.errors if x["metric"] == m and x["stat"] == s)
                t = target_pct(r, m, s)
                mark = "" if abs(e["error_pct"]) <= t else " ✗"
                cells.append(f"{e['error_pct']:+.1f}%{mark}")
        thr = next(x for x in r.errors if x["metric"] == "request_throughput")
        lines.append(f"| {r.case.case_id} | {r.label} | " + " | ".join(cells) + f" | {thr['error_pct']:+.1f}% |")
    if len(results) > 1:
        cells = []
        for m in METRICS:
            for s in ("mean", "p50"):
                v = [abs(next(x for x in r.errors if x["metric"] == m and x["stat"] == s)["error_pct"]) for r in results]
                cells.append(f"{float(np.median(v)):.1f}%")
        v = [abs(next(x for x in r.errors if x["metric"] == "request_throughput")["error_pct"]) for r in results]
        lines.append("| median abs error | | " + " | ".join(cells) + f" | {float(np.median(v)):.1f}% |")
    return "\n".join(lines) + "\n"


def validate(case_dirs, out_dir=None, use_profile: bool = True, profile=None, roofline_params: str = "withheld",
             arrivals: str = "measured", plot: bool = True, hardware: str | None = None,
             progress: bool = False, prompt_identity: str = "infer", client_overhead_ms=None) -> list[CaseResult]:
    """Replay each measured case and compare. ``hardware`` overrides the GPU of every case; ``progress``
    shows a bar per case on stderr (off when stderr is not a terminal)."""
    out = Path(out_dir) if out_dir is not None else None
    results = []
    cases = [load_case(d, hardware) for d in case_dirs]
    for i, case in enumerate(cases, 1):
        sub = out / case.case_id if out is not None else None
        bar = None
        if progress:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(case.measured), unit="req", desc=f"validate {i}/{len(cases)} {case.case_id}",
                       file=sys.stderr, mininterval=0.5, disable=None)
        try:
            results.append(validate_case(case, sub, use_profile, profile, roofline_params, arrivals, plot, bar,
                                         prompt_identity, client_overhead_ms))
        finally:
            if bar is not None:
                bar.close()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_errors_csv([e for r in results for e in r.errors], out / "errors.csv")
        md = ["# kvsim validate", "", "Error = (kvsim - measured) / measured. ✗ = outside the target for mean and p50: "
              "3 %, or the anchor's published error where larger; for a case timed at an HTTP client without an "
              "anchor, TTFT 15 % and TPOT, e2el 5 %.", "", format_table(results), ""]
        md += [format_case_md(r) for r in results]
        (out / "errors.md").write_text("\n".join(md))
    return results


# ------------------------------------------------------------------------------------------------
# command line
def register(sub) -> None:
    v = sub.add_parser("validate", help="replay measured serving runs (shared/validation format) and report kvsim's error")
    v.add_argument("cases", nargs="+", metavar="CASE_DIR", help="folders with run.yaml + measured.csv")
    v.add_argument("--out", default="out/validate", help="output directory (errors.csv, errors.md, one folder per case)")
    v.add_argument("--profile", default=None, help="profile JSON to use (default: the committed one for the case's model x GPU x TP)")
    v.add_argument("--no-profile", action="store_true", help="the calibrated roofline alone")
    v.add_argument("--roofline-params", choices=["withheld", "calibrated"], default="withheld",
                   help="without a profile: params fitted with this case's (hardware, model) withheld, or on all profiles")
    v.add_argument("--arrivals", choices=["measured", "workload"], default="measured",
                   help="realised arrival times from measured.csv (default) or the workload's intended ones")
    v.add_argument("--hardware", default=None, help="model every case on this GPU instead of the one its run.yaml "
                   "names (needed for a case measured on a CPU, e.g. kvprof replay --tiny)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--prompt-identity", choices=["infer", "none"], default="infer",
                   help="a workload without prefix hashes whose prompt lengths repeat in a cycle is read as the same "
                        "prompts sent in turn (infer, default), or every prompt is taken as distinct (none)")
    v.add_argument("--client-overhead-ms", type=float, default=None,
                   help="added to every predicted TTFT and e2el (default: the case's own: "
                        f"{CLIENT_OVERHEAD_MS} ms for times taken at an HTTP client, 0 for times taken in the engine)")
    v.add_argument("--no-plot", action="store_true", help="skip latency.png per case")
    v.set_defaults(func=_cmd_validate)


def _cmd_validate(args) -> int:
    results = validate(args.cases, args.out, not args.no_profile, args.profile, args.roofline_params, args.arrivals,
                       plot=not args.no_plot, hardware=args.hardware, progress=not args.quiet,
                       prompt_identity=args.prompt_identity, client_overhead_ms=args.client_overhead_ms)
    print(format_table(results))
    for r in results:
        print(format_case_md(r))
    print(f"outputs: {args.out}/errors.csv errors.md, per case: requests_joined.csv steps.csv latency.png")
    return 0
