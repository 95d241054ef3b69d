"""The Python API: build a run from typed specs, replay a trace, get the summary and per-request rows.

    from kvsim import api
    res = api.replay("traces/sample.jsonl", model="llama-3.1-8b", hardware="h100", method="h2o")
    res.summary["ttft_ms"]["p99"];  res.requests_df()   # pandas, if installed

Everything the CLI does goes through here; knobs are parsed once, here, into typed objects.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from kvsim.config import EngineConfig
from kvsim.cost.base import CostModel
from kvsim.cost.roofline import RooflineCost, RooflineParams
from kvsim.engine.block_manager import BlockManager
from kvsim.engine.cluster import make_router
from kvsim.engine.kv_cache_manager import KVCacheManager
from kvsim.engine.memory import kv_capacity_bytes, num_kv_blocks
from kvsim.engine.output_length import LengthSampler
from kvsim.engine.replica import Replica
from kvsim.engine.scheduler import PrefillFirstScheduler, Scheduler
from kvsim.engine.sim import Simulation
from kvsim.errors import ConfigError
from kvsim.methods import parse_method
from kvsim.methods.base import LengthRatio, Method
from kvsim.metrics.collector import SLO, Recorder
from kvsim.specs.hardware import HardwareSpec, load_hardware
from kvsim.specs.model import ModelSpec, load_model


@dataclass
class RunSpec:
    """Everything that defines a replay, already parsed."""

    model: ModelSpec
    hardware: HardwareSpec
    method: Method
    config: EngineConfig
    profile: object | None = None  # kvsim.cost.profile.Profile
    slo: SLO = field(default_factory=SLO)
    roofline_params: RooflineParams | None = None


def resolve_method(method, config: EngineConfig) -> Method:
    m = parse_method(method if method is not None else "none")
    if config.kv_cache_dtype.startswith("fp8"):
        if m.name == "none":
            return parse_method("fp8")
        if m.name != "fp8":
            raise ConfigError(f"kv_cache_dtype={config.kv_cache_dtype!r} cannot be combined with method {m.spec_string()!r}")
    return m


def make_spec(model="llama-3.1-8b", hardware="h100", method=None, config: EngineConfig | None = None,
              profile=None, slo: SLO | None = None, auto_profile: bool = True) -> RunSpec:
    mspec = model if isinstance(model, ModelSpec) else load_model(model)
    hw = hardware if isinstance(hardware, HardwareSpec) else load_hardware(hardware)
    cfg = config or EngineConfig()
    if cfg.max_model_len is None:
        cfg = dataclasses.replace(cfg, max_model_len=mspec.max_position_embeddings)
    cfg = cfg.validate().resolved(hw.memory_bytes)
    meth = resolve_method(method, cfg)
    prof = None
    if profile is not None:
        from kvsim.cost.profile import load_profile
        prof = profile if not isinstance(profile, (str, Path)) else load_profile(profile)
    elif auto_profile:
        from kvsim.cost.profiled import find_profile
        prof = find_profile(mspec.name, hw.name, cfg.tensor_parallel_size)
    return RunSpec(mspec, hw, meth, cfg, prof, slo or SLO())


def make_cost(spec: RunSpec) -> CostModel:
    cfg = spec.config
    ep = cfg.data_parallel_size * cfg.tensor_parallel_size if cfg.enable_expert_parallel else 1
    roof = RooflineCost(spec.model, spec.hardware, spec.method, cfg.tensor_parallel_size, spec.roofline_params,
                        expert_parallel_size=max(1, ep // cfg.tensor_parallel_size))
    if spec.profile is None:
        return roof
    from kvsim.cost.profiled import ProfiledCost
    return ProfiledCost(spec.profile, roof)


def length_ratio_for(spec: RunSpec) -> LengthRatio:
    if spec.profile is not None:
        measured = (getattr(spec.profile, "lengths", None) or {}).get(spec.method.spec_string())
        if measured:
            return LengthRatio(source=f"measured: profile {spec.profile.name}", samples=tuple(measured["ratios"]))
    from kvsim.cost.profiled import measured_lengths
    found = measured_lengths(spec.method.spec_string())
    return found if found is not None else spec.method.default_length_ratio()


def build_replicas(spec: RunSpec, recorder: Recorder, fast_forward: bool = True) -> list[Replica]:
    cfg = spec.config
    num_blocks = num_kv_blocks(spec.model, spec.hardware, cfg, spec.method)
    if num_blocks < 1:
        cap = kv_capacity_bytes(spec.model, spec.hardware, cfg)
        raise ConfigError(
            f"model {spec.model.name} does not fit on {spec.hardware.name} with tensor_parallel_size="
            f"{cfg.tensor_parallel_size}: KV capacity would be {cap / 1e9:.2f} GB; raise tensor_parallel_size or "
            "gpu_memory_utilization")
    replicas = []
    n = cfg.num_replicas * cfg.data_parallel_size
    # MoE with expert parallelism across DP ranks: each replica's ranks step together (sim.py lockstep
    # groups), one step at a time; dense models with DP stay independent replicas behind the router
    lockstep = lockstep_dp(spec)
    # cost models are pure (their caches are keyed by batch shape), so the replicas share one
    cost = make_cost(spec)
    for i in range(n):
        pool = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        kv = KVCacheManager(pool, spec.method, spec.model, cfg.tensor_parallel_size)
        cls = PrefillFirstScheduler if cfg.scheduler == "prefill-first" else Scheduler
        sched = cls(kv, cfg.max_num_seqs, cfg.max_num_batched_tokens or cfg.max_model_len, cfg.enable_chunked_prefill)
        r = Replica(i, sched, kv, cost, recorder, cfg.max_model_len, fast_forward and not lockstep,
                    reject_over_budget_prompts=(cfg.scheduler == "prefill-first" or not cfg.enable_chunked_prefill),
                    async_scheduling=cfg.async_scheduling)
        if lockstep:
            r.lockstep_group = i // cfg.data_parallel_size
        replicas.append(r)
    return replicas


def lockstep_dp(spec: RunSpec) -> bool:
    """Whether a replica's data-parallel ranks step together (vLLM: every MoE layer of an expert-parallel
    DP group is a collective, idle ranks run dummy batches)."""
    cfg = spec.config
    return bool(spec.model.is_moe and cfg.enable_expert_parallel and cfg.data_parallel_size > 1)


@dataclass
class ReplayResult:
    summary: dict
    rows: list | None = None
    out_dir: Path | None = None

    def requests_df(self):
        import pandas as pd

        if self.rows is not None:
            return pd.DataFrame(self.rows)
        return pd.read_csv(self.out_dir / "requests.csv")


def open_trace(trace, fmt=None, skip_invalid=False, max_model_len=None, rate_scale: float = 1.0, limit: int | None = None):
    """A path (any supported format) or an iterable of Requests -> a stream of Request/InvalidRecord."""
    from kvsim.workload import readers

    if isinstance(trace, (str, Path)):
        stream = readers.read_trace(trace, fmt, skip_invalid=skip_invalid, max_model_len=max_model_len)
    else:
        stream = iter(trace)
    if rate_scale != 1.0:
        if rate_scale <= 0:
            raise ConfigError(f"rate_scale={rate_scale} must be > 0")
        stream = _scaled(stream, rate_scale)
    if limit is not None:
        stream = _limited(stream, limit)
    return stream


def _scaled(stream, k):
    # copies: a caller's list of requests must replay the same way twice
    for r in stream:
        if r.arrival_time_s is not None:
            r = copy.copy(r)
            r.arrival_time_s = r.arrival_time_s / k
        yield r


def _limited(stream, n):
    for i, r in enumerate(stream):
        if i >= n:
            return
        yield r


def replay(trace, model="llama-3.1-8b", hardware="h100", method=None, config: EngineConfig | None = None,
           profile=None, slo: SLO | dict | None = None, out_dir=None, fmt=None, skip_invalid=False,
           progress: bool = False, keep_rows: bool | None = None, fast_forward: bool = True,
           check_invariants: bool = False, rate_scale: float = 1.0, limit: int | None = None,
           spec: RunSpec | None = None, timeline_interval_s: float = 1.0, plot: bool = True,
           total_hint: int | None = None, auto_profile: bool = True) -> ReplayResult:
    if isinstance(slo, dict):
        slo = SLO(**slo)
    spec = spec or make_spec(model, hardware, method, config, profile, slo, auto_profile=auto_profile)
    cfg = spec.config
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        req_f = open(out / "requests.csv", "w", newline="")
        tl_f = open(out / "timeline.csv", "w", newline="")
    else:
        req_f = tl_f = None
    keep = keep_rows if keep_rows is not None else out is None
    rec = Recorder(req_f, tl_f, spec.slo, timeline_interval_s, keep_rows=keep)
    try:
        replicas = build_replicas(spec, rec, fast_forward)
        lengths = length_ratio_for(spec)
        bar = None
        if progress:
            from tqdm import tqdm
            total = total_hint if total_hint is not None else (_count_lines(trace) if isinstance(trace, (str, Path)) else None)
            bar = tqdm(total=total, unit="req", desc="replay", file=sys.stderr, mininterval=0.5, disable=None)
        sim = Simulation(replicas, make_router(cfg.router), rec, LengthSampler(lengths, cfg.seed), bar, check_invariants)
        wall0 = time.perf_counter()
        stream = open_trace(trace, fmt, skip_invalid, cfg.max_model_len, rate_scale, limit)
        sim.run(stream)
        wall = time.perf_counter() - wall0
        if bar is not None:
            bar.close()
    finally:
        if req_f:
            req_f.close()
            tl_f.close()
    from kvsim.metrics.summary import build_summary
    summary = build_summary(spec, rec, replicas, lengths, sim, wall)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if plot:
            from kvsim.metrics.plots import plot_timeline
            plot_timeline(out / "timeline.csv", out / "timeline.png", title=f"{spec.model.name} / {spec.hardware.name} / {spec.method.spec_string()}")
    return ReplayResult(summary, rec.rows, out)


def _count_lines(path) -> int | None:
    try:
        with open(path, "rb") as f:
            n = sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))
        return max(0, n - (1 if str(path).endswith(".csv") else 0))
    except OSError:
        return None
