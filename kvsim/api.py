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
import math
import sys
import time
import tracemalloc
import warnings
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
from kvsim.errors import ConfigError, KvsimError
from kvsim.methods import parse_method
from kvsim.methods.base import LengthRatio, Method
from kvsim.metrics.collector import SLO, Recorder
from kvsim.specs.hardware import HardwareSpec, load_hardware
from kvsim.specs.model import ModelSpec, load_model


#: what ``--result-format`` accepts: kvsim's summary.json only, or vLLM's benchmark result beside it
RESULT_FORMATS = ("kvsim", "vllm")


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
    #: the serving engine whose step model ``roofline_params`` is (None: vLLM, kvsim's calibration)
    engine: str | None = None
    #: output-length source: "auto", "published", "trace" or a lengths profile (engine/output_length.py)
    lengths: object = "auto"
    #: disaggregated prefill/decode and the CPU KV tier (kvsim.transfer.TransferConfig); None: neither
    transfer: object = None


def resolve_method(method, config: EngineConfig) -> Method:
    m = parse_method(method if method is not None else "none")
    if config.kv_cache_dtype.startswith("fp8"):
        if m.name == "none":
            return parse_method("fp8")
        if m.name != "fp8":
            raise ConfigError(f"kv_cache_dtype={config.kv_cache_dtype!r} cannot be combined with method {m.spec_string()!r}")
    return m


class ProfileMismatchWarning(UserWarning):
    """A profile of another model, GPU or TP used on purpose (``allow_profile_mismatch=True``)."""


def check_parallel_shape(model: ModelSpec, cfg: EngineConfig) -> None:
    """vLLM's rule: tensor parallelism splits whole attention heads, and KV heads are either split evenly or
    each replicated on a whole number of ranks."""
    tp, heads, kv = cfg.tensor_parallel_size, model.num_attention_heads, model.num_kv_heads
    if heads % tp:
        raise ConfigError(f"tensor_parallel_size={tp}: the {heads} attention heads of {model.name} are not divisible "
                          f"by it (vLLM refuses the same); use a divisor of {heads}")
    if kv % tp and tp % kv:
        raise ConfigError(f"tensor_parallel_size={tp}: the {kv} KV heads of {model.name} can be neither split evenly "
                          f"nor replicated evenly across {tp} ranks (vLLM refuses the same)")


def profile_mismatch(prof, model: ModelSpec, hw: HardwareSpec, tp: int) -> str | None:
    """What differs between a profile and the run it is used for (model, hardware, TP), or None."""
    from kvsim.specs.hardware import _key

    diffs = []
    if str(prof.model).strip().lower() != model.name.strip().lower():
        diffs.append(f"model {prof.model!r} (run: {model.name!r})")
    if _key(prof.hardware) != _key(hw.name):
        try:
            same = load_hardware(prof.hardware).name == hw.name
        except KvsimError:
            same = False
        if not same:
            diffs.append(f"hardware {prof.hardware!r} (run: {hw.name!r})")
    if prof.tensor_parallel_size != tp:
        diffs.append(f"tensor_parallel_size {prof.tensor_parallel_size} (run: {tp})")
    return ", ".join(diffs) or None


def make_spec(model="llama-3.1-8b", hardware="h100", method=None, config: EngineConfig | None = None,
              profile=None, slo: SLO | None = None, auto_profile: bool = True, lengths="auto",
              engine: str | None = None, allow_profile_mismatch: bool = False, transfer=None) -> RunSpec:
    """``allow_profile_mismatch``: use a profile measured for another model, GPU or TP anyway (a warning
    instead of the error), e.g. a close sibling model when none of its own exists. ``engine``: a fitted
    engine's step model instead of vLLM's (kvsim.cost.engines). ``transfer``: disaggregated prefill/decode
    and the CPU KV tier (a kvsim.transfer.TransferConfig or a mapping of its options; None: neither)."""
    mspec = model if isinstance(model, ModelSpec) else load_model(model)
    hw = hardware if isinstance(hardware, HardwareSpec) else load_hardware(hardware)
    cfg = config or EngineConfig()
    if cfg.max_model_len is None:
        cfg = dataclasses.replace(cfg, max_model_len=mspec.max_position_embeddings)
    cfg = cfg.validate().resolved(hw.memory_bytes)
    check_parallel_shape(mspec, cfg)
    meth = resolve_method(method, cfg)
    prof = None
    if profile is not None:
        from kvsim.cost.profile import load_profile
        prof = profile if not isinstance(profile, (str, Path)) else load_profile(profile)
        # a profile without kernel tables (kvprof lengths) only supplies output lengths, from any model
        diff = profile_mismatch(prof, mspec, hw, cfg.tensor_parallel_size) if prof.tables else None
        if diff:
            msg = (f"profile {prof.path} was measured for another setup: {diff}; its kernel times would be "
                   "applied to the wrong shapes")
            if not allow_profile_mismatch:
                raise ConfigError(msg + " (pass --allow-profile-mismatch to use it anyway)")
            warnings.warn(msg, ProfileMismatchWarning, stacklevel=2)
    elif auto_profile:
        from kvsim.cost.profiled import find_profile
        prof = find_profile(mspec.name, hw.name, cfg.tensor_parallel_size)
    from kvsim.cost.engines import engine_params

    params = engine_params(engine)
    if params is not None and prof is not None and profile is None:
        prof = None  # a committed kernel profile is vLLM's kernels; another engine's fitted step model wins
    spec = RunSpec(mspec, hw, meth, cfg, prof, slo or SLO(), params, engine if params is not None else None,
                   lengths=lengths, transfer=_transfer(transfer, mspec, cfg))
    length_ratio_for(spec)  # a bad --lengths choice fails here, before any work
    return spec


def _transfer(transfer, model: ModelSpec, cfg: EngineConfig):
    """The P/D and CPU-tier options, validated against the run (kvsim.transfer); None when all are off."""
    if transfer is None:
        return None
    from kvsim.transfer import TransferConfig, transfer_from_mapping

    tr = transfer if isinstance(transfer, TransferConfig) else transfer_from_mapping(transfer)
    if tr is None or not tr.nondefault():
        return None
    tr.validate()
    for tp in (tr.prefill_tensor_parallel_size, tr.decode_tensor_parallel_size):
        if tp is not None:
            check_parallel_shape(model, dataclasses.replace(cfg, tensor_parallel_size=tp))
    from kvsim.transfer import PD_ONLY

    stray = {k: v for k, v in tr.nondefault().items() if k in PD_ONLY}
    if stray and not tr.disaggregated:
        raise ConfigError(f"disaggregation options {stray} need --num-prefill-instances and --num-decode-instances")
    if tr.offload:
        if not cfg.enable_prefix_caching:
            raise ConfigError(f"kv_offloading_size={tr.kv_offloading_size}: the CPU tier is found by prefix hashes, "
                              "so it needs enable_prefix_caching (vLLM's OffloadingConnector rides on the prefix cache)")
        if model.is_moe and cfg.enable_expert_parallel and cfg.data_parallel_size > 1:
            raise ConfigError("the CPU KV tier with expert parallelism across data-parallel ranks is not modelled")
    return tr


def make_cost(spec: RunSpec) -> CostModel:
    cfg = spec.config
    ep = cfg.data_parallel_size * cfg.tensor_parallel_size if cfg.enable_expert_parallel else 1
    roof = RooflineCost(spec.model, spec.hardware, spec.method, cfg.tensor_parallel_size, spec.roofline_params,
                        expert_parallel_size=max(1, ep // cfg.tensor_parallel_size))
    if spec.engine:
        roof.name = f"roofline, engine {spec.engine}"
    if spec.profile is None:
        return roof
    from kvsim.cost.profiled import ProfiledCost
    return ProfiledCost(spec.profile, roof)


def length_ratio_for(spec: RunSpec) -> LengthRatio:
    """The run's output-length ratio distribution (the rules: kvsim.engine.output_length)."""
    from kvsim.engine.output_length import choose_length_ratio

    return choose_length_ratio(spec.model.name, spec.method, spec.profile, spec.lengths)


def build_replicas(spec: RunSpec, recorder: Recorder, fast_forward: bool = True) -> list[Replica]:
    cfg = spec.config
    num_blocks = num_kv_blocks(spec.model, spec.hardware, cfg, spec.method)
    if num_blocks < 1:
        raise ConfigError(does_not_fit_message(spec))
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


def does_not_fit_message(spec: RunSpec) -> str:
    """Why no KV block fits, with the memory budget spelled out and the fix that addresses the largest
    cause: the weights (more GPUs) or the activation reserve of the step's token budget."""
    from kvsim.engine.memory import FIXED_RESERVE_BYTES, activation_reserve_bytes

    cfg, model, hw = spec.config, spec.model, spec.hardware
    ep = cfg.data_parallel_size * cfg.tensor_parallel_size if cfg.enable_expert_parallel else 1
    weights = model.weight_bytes(cfg.tensor_parallel_size, max(1, ep // cfg.tensor_parallel_size))
    budget = cfg.gpu_memory_utilization * hw.memory_bytes
    reserve = (cfg.activation_reserve_bytes if cfg.activation_reserve_bytes is not None
               else activation_reserve_bytes(model, cfg))
    cap = kv_capacity_bytes(model, hw, cfg)
    head = (f"model {model.name} does not fit on {hw.name} with tensor_parallel_size={cfg.tensor_parallel_size}: "
            f"no room for a KV block: gpu_memory_utilization={cfg.gpu_memory_utilization} x "
            f"{hw.memory_bytes / 1e9:.1f} GB = {budget / 1e9:.2f} GB, minus weights {weights / 1e9:.2f} GB, minus "
            f"the activation reserve {reserve / 1e9:.2f} GB for max_num_batched_tokens={cfg.max_num_batched_tokens} "
            f"and max_num_seqs={cfg.max_num_seqs}, leaves {cap / 1e9:.2f} GB")
    if weights + FIXED_RESERVE_BYTES < budget and cfg.activation_reserve_bytes is None:
        # the weights fit: the step's token budget is what eats the memory
        unchunked = not cfg.enable_chunked_prefill or cfg.scheduler == "prefill-first"
        why = (" (without chunked prefill it defaults to max_model_len; lower max_model_len, or enable "
               "chunked prefill)" if unchunked else "")
        return head + f"; lower max_num_batched_tokens{why}"
    if weights >= hw.memory_bytes:
        return head + "; raise tensor_parallel_size (the weights alone exceed the GPU's memory)"
    return head + "; raise tensor_parallel_size or gpu_memory_utilization"


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
    #: what the links carried when (kvsim.engine.kvlink.LinkLog): runs with P/D or a CPU tier only
    link_log: object = None

    def requests_df(self):
        import pandas as pd

        if self.rows is not None:
            return pd.DataFrame(self.rows)
        return pd.read_csv(self.out_dir / "requests.csv")


def open_trace(trace, fmt=None, skip_invalid=False, max_model_len=None, rate_scale: float = 1.0, limit: int | None = None):
    """A path (any supported format) or an iterable of Requests -> a stream of Request/InvalidRecord."""
    from kvsim.workload import readers

    check_stream_options(rate_scale, limit)
    if isinstance(trace, (str, Path)):
        stream = readers.read_trace(trace, fmt, skip_invalid=skip_invalid, max_model_len=max_model_len)
    else:
        stream = iter(trace)
    if rate_scale != 1.0:
        stream = _scaled(stream, rate_scale)
    if limit is not None:
        stream = _limited(stream, limit)
    return stream


def check_stream_options(rate_scale, limit) -> None:
    """``rate_scale`` a finite number > 0 (NaN would make every arrival NaN), ``limit`` a count >= 1."""
    if isinstance(rate_scale, bool) or not isinstance(rate_scale, (int, float)) or not (
            math.isfinite(rate_scale) and rate_scale > 0):
        raise ConfigError(f"rate_scale={rate_scale!r} must be a finite number > 0")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit={limit!r} must be a positive integer (the number of requests to replay)")


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


#: the files a replay writes into its output folder
REPLAY_OUTPUTS = ("requests.csv", "timeline.csv", "links.csv", "timeline.png", "vllm_result.json", "summary.json")


def replay(trace, model="llama-3.1-8b", hardware="h100", method=None, config: EngineConfig | None = None,
           profile=None, slo: SLO | dict | None = None, out_dir=None, fmt=None, skip_invalid=False,
           progress: bool | str = False, keep_rows: bool | None = None, fast_forward: bool = True,
           check_invariants: bool = False, rate_scale: float = 1.0, limit: int | None = None,
           spec: RunSpec | None = None, timeline_interval_s: float = 1.0, plot: bool = True,
           total_hint: int | None = None, auto_profile: bool = True, lengths="auto",
           result_format: str = "kvsim") -> ReplayResult:
    """Replay a trace; with ``out_dir``, write summary.json, requests.csv, timeline.csv/.png (and, with
    ``result_format="vllm"``, vllm_result.json: the flat keys of vLLM's benchmark_serving result)."""
    if isinstance(slo, dict):
        slo = SLO(**slo)
    if result_format not in RESULT_FORMATS:
        raise ConfigError(f"result_format={result_format!r}: must be one of {', '.join(RESULT_FORMATS)}")
    spec = spec or make_spec(model, hardware, method, config, profile, slo, auto_profile=auto_profile, lengths=lengths)
    check_stream_options(rate_scale, limit)
    cfg = spec.config
    out = Path(out_dir) if out_dir is not None else None
    if out is None:
        return _replay(trace, spec, None, fmt, skip_invalid, progress, keep_rows, fast_forward, check_invariants,
                       rate_scale, limit, timeline_interval_s, plot, total_hint, result_format)
    from kvsim.outputs import StagedDir, refuse_overwriting_inputs

    refuse_overwriting_inputs(out, REPLAY_OUTPUTS, [trace, getattr(spec.profile, "path", None)])
    # written into a staging folder and moved into place at the end: a failed or killed run leaves the
    # previous outputs untouched instead of new partial CSVs beside an old summary.json
    staged = StagedDir(out)
    with staged as tmp:
        res = _replay(trace, spec, tmp, fmt, skip_invalid, progress, keep_rows, fast_forward, check_invariants,
                      rate_scale, limit, timeline_interval_s, plot, total_hint, result_format)
        staged.publish(REPLAY_OUTPUTS, last="summary.json")
    res.out_dir = out
    return res


def _replay(trace, spec, out, fmt, skip_invalid, progress, keep_rows, fast_forward, check_invariants, rate_scale,
            limit, timeline_interval_s, plot, total_hint, result_format="kvsim") -> ReplayResult:
    cfg = spec.config
    if out is not None:
        req_f = open(out / "requests.csv", "w", newline="")
        tl_f = open(out / "timeline.csv", "w", newline="")
    else:
        req_f = tl_f = None
    keep = keep_rows if keep_rows is not None else out is None
    # KV moved beyond the GPU (P/D, CPU tier): extra request columns, a link log; a plain run gets neither
    tr = spec.transfer
    link_log = cluster = None
    extra = {}
    if tr is not None:
        from kvsim.engine.kvlink import LinkLog
        from kvsim.metrics.transfer import TRANSFER_COLUMNS, transfer_values

        link_log = LinkLog(timeline_interval_s)
        extra = dict(extra_columns=TRANSFER_COLUMNS, extra_values=transfer_values)
    rec = Recorder(req_f, tl_f, spec.slo, timeline_interval_s, keep_rows=keep, **extra)
    try:
        if tr is not None and tr.disaggregated:
            from kvsim.engine.disagg import build_disagg

            cluster = build_disagg(spec, rec, fast_forward, link_log)
            replicas = cluster.replicas
        else:
            replicas = build_replicas(spec, rec, fast_forward)
            if tr is not None and tr.offload:
                from kvsim.engine.offload import attach_tier, make_tier

                for r in replicas:
                    attach_tier(r, make_tier(tr, spec, spec.config.tensor_parallel_size, link_log, r.id))
        lengths = length_ratio_for(spec)
        bar = None
        if progress:
            from tqdm import tqdm
            total = total_hint if total_hint is not None else (_count_lines(trace) if isinstance(trace, (str, Path)) else None)
            desc = progress if isinstance(progress, str) else "replay"
            bar = tqdm(total=total, unit="req", desc=desc, file=sys.stderr, mininterval=0.5, disable=None)
        sampler = LengthSampler(lengths, cfg.seed, cfg.max_model_len)
        if cluster is not None:
            from kvsim.engine.disagg import DisaggSimulation

            sim = DisaggSimulation(cluster, rec, sampler, bar, check_invariants)
        else:
            sim = Simulation(replicas, make_router(cfg.router), rec, sampler, bar, check_invariants)
        wall0 = time.perf_counter()
        # no max_model_len for the reader: an over-long prompt is a request the engine rejects
        # (exceeds_max_model_len) and counts, as vLLM answers it with an error and serves the rest
        stream = open_trace(trace, fmt, skip_invalid, None, rate_scale, limit)
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
    if tr is not None:
        from kvsim.metrics.transfer import transfer_summary

        span = max((r._kv_last_s for r in replicas), default=0.0) - (rec.first_arrival_s or 0.0)
        summary.update(transfer_summary(spec, replicas, cluster, link_log, rec, span))
        summary["transfer_options"] = tr.nondefault()
    if rec.num_arrivals == 0:
        where = f" {trace}" if isinstance(trace, (str, Path)) else ""
        print(f"kvsim: warning: the trace{where} has no requests; the summary is all zeros", file=sys.stderr)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if result_format == "vllm":
            from kvsim.metrics.summary import vllm_result
            (out / "vllm_result.json").write_text(json.dumps(vllm_result(summary)) + "\n")
        if link_log is not None:
            link_log.write_csv(out / "links.csv")
        if plot:
            from kvsim.metrics.plots import plot_timeline
            plot_timeline(out / "timeline.csv", out / "timeline.png", title=f"{spec.model.name} / {spec.hardware.name} / {spec.method.spec_string()}",
                          links_csv=out / "links.csv" if link_log is not None else None)
    return ReplayResult(summary, rec.rows, out, link_log)


def _count_lines(path) -> int | None:
    """Lines of a trace file (the progress bar's total): a last line without a newline counts too, an
    Azure CSV's header does not. Compressed files are not counted (None: the bar shows a rate only)."""
    if str(path).endswith(".gz"):
        return None
    try:
        n, last = 0, b"\n"
        with open(path, "rb") as f:
            for buf in iter(lambda: f.read(1 << 20), b""):
                n += buf.count(b"\n")
                last = buf[-1:]
        if last != b"\n":
            n += 1
        return max(0, n - (1 if str(path).endswith(".csv") else 0))
    except OSError:
        return None
