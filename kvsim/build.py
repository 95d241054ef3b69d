"""One place builds a run: the spec (model, GPU, method, engine options, cost source, parsed once), the
cost model, the replicas (scheduler + KV cache manager + block manager each) and how they are grouped,
and the simulation that drives them. Everything that watches a run (metrics, step logs, progress bars)
is an observer (:mod:`kvsim.engine.events`) handed to :func:`build_run`; nothing patches the engine.

    spec = make_spec("llama-3.1-8b", "h100", "kivi")
    run = build_run(spec, [Recorder(...)], LengthSampler(length_ratio_for(spec), spec.config.seed))
    end_s = run.run(requests)

Kinds of cluster: :data:`CLUSTERS` maps a name to a function ``(spec, cost, observers, lengths,
fast_forward, check_invariants) -> Run``. ``colocated`` (every replica prefills and decodes; data-parallel
ranks of an expert-parallel MoE model step in lockstep groups) is the one vLLM runs by default;
``disaggregated`` (prefill and decode instances linked by a KV transfer, kvsim.engine.disagg) builds its
replicas with :func:`make_replica` too and hands every one the same observers, so whatever watches a
colocated run watches it the same way; either may carry a CPU KV tier (kvsim.engine.offload). Another kind
registers its builder under its name; :func:`cluster_kind` says which kind a spec asks for.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
from kvsim.metrics.slo import SLO
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
    #: the serving engine whose step model ``roofline_params`` is (None: vLLM, kvsim's calibration)
    engine: str | None = None
    #: output-length source: "auto", "published", "trace" or a lengths profile (engine/output_length.py)
    lengths: object = "auto"
    #: disaggregated prefill/decode and the CPU KV tier (kvsim.transfer.TransferConfig); None: neither
    transfer: object = None


# -- the spec ---------------------------------------------------------------------------------------------
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
    from kvsim.specs.hardware import hardware_key

    diffs = []
    if str(prof.model).strip().lower() != model.name.strip().lower():
        diffs.append(f"model {prof.model!r} (run: {model.name!r})")
    if hardware_key(prof.hardware) != hardware_key(hw.name):
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
    from kvsim.transfer import PD_ONLY, TransferConfig, transfer_from_mapping

    tr = transfer if isinstance(transfer, TransferConfig) else transfer_from_mapping(transfer)
    if tr is None or not tr.nondefault():
        return None
    tr.validate()
    for tp in (tr.prefill_tensor_parallel_size, tr.decode_tensor_parallel_size):
        if tp is not None:
            check_parallel_shape(model, dataclasses.replace(cfg, tensor_parallel_size=tp))
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
    roof = RooflineCost(spec.model, spec.hardware, spec.method, cfg.tensor_parallel_size, spec.roofline_params,
                        expert_parallel_size=cfg.expert_parallel_size)
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


def length_sampler(spec: RunSpec, lengths: LengthRatio | None = None) -> LengthSampler:
    """Output lengths as a replay draws them: the run's ratio distribution, its seed, cut at max_model_len."""
    cfg = spec.config
    return LengthSampler(lengths or length_ratio_for(spec), cfg.seed, cfg.max_model_len)


# -- the parts of a replica -----------------------------------------------------------------------------
def num_blocks_for(spec: RunSpec) -> int:
    """KV blocks per replica; a ConfigError saying why when not even one fits."""
    num_blocks = num_kv_blocks(spec.model, spec.hardware, spec.config, spec.method)
    if num_blocks < 1:
        raise ConfigError(does_not_fit_message(spec))
    return num_blocks


def make_kv(model: ModelSpec, method: Method, cfg: EngineConfig, num_blocks: int) -> KVCacheManager:
    """A replica's KV cache: ``num_blocks`` blocks of ``cfg.block_size`` tokens under ``method``."""
    pool = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
    return KVCacheManager(pool, method, model, cfg.tensor_parallel_size)


def make_replica(replica_id: int, model: ModelSpec, method: Method, cfg: EngineConfig, num_blocks: int,
                 cost: CostModel, observers=(), fast_forward: bool = True, cls: type[Replica] = Replica) -> Replica:
    """One engine replica (of class ``cls``: a P/D prefill instance is one too) as ``cfg`` configures it.
    ``cfg.max_num_batched_tokens`` None: max_model_len."""
    kv = make_kv(model, method, cfg, num_blocks)
    sched_cls = PrefillFirstScheduler if cfg.scheduler == "prefill-first" else Scheduler
    sched = sched_cls(kv, cfg.max_num_seqs, cfg.max_num_batched_tokens or cfg.max_model_len, cfg.enable_chunked_prefill)
    return cls(replica_id, sched, kv, cost, observers, cfg.max_model_len, fast_forward,
               reject_over_budget_prompts=cfg.rejects_over_budget_prompts, async_scheduling=cfg.async_scheduling)


def build_replicas(spec: RunSpec, observers=(), fast_forward: bool = True, cost: CostModel | None = None) -> list[Replica]:
    """The replicas of a colocated cluster: ``num_replicas x data_parallel_size`` of them; the data-parallel
    ranks of an expert-parallel MoE model carry their lockstep group's id (kvsim.engine.sim)."""
    cfg = spec.config
    num_blocks = num_blocks_for(spec)
    if observers is None:
        observers = ()
    elif not isinstance(observers, (list, tuple)):
        observers = (observers,)
    # MoE with expert parallelism across DP ranks: each replica's ranks step together (sim.py lockstep
    # groups), one step at a time; dense models with DP stay independent replicas behind the router
    lockstep = lockstep_dp(spec)
    # cost models are pure (their caches are keyed by batch shape), so the replicas share one
    cost = cost or make_cost(spec)
    replicas = []
    for i in range(cfg.num_replicas * cfg.data_parallel_size):
        r = make_replica(i, spec.model, spec.method, cfg, num_blocks, cost, observers, fast_forward and not lockstep)
        if lockstep:
            r.lockstep_group = i // cfg.data_parallel_size
        replicas.append(r)
    return replicas


def does_not_fit_message(spec: RunSpec) -> str:
    """Why no KV block fits, with the memory budget spelled out and the fix that addresses the largest
    cause: the weights (more GPUs) or the activation reserve of the step's token budget."""
    from kvsim.engine.memory import FIXED_RESERVE_BYTES, reserved_bytes

    cfg, model, hw = spec.config, spec.model, spec.hardware
    weights = model.weight_bytes(cfg.tensor_parallel_size, cfg.expert_parallel_size)
    budget = cfg.gpu_memory_utilization * hw.memory_bytes
    reserve = reserved_bytes(model, cfg)
    cap = kv_capacity_bytes(model, hw, cfg)
    head = (f"model {model.name} does not fit on {hw.name} with tensor_parallel_size={cfg.tensor_parallel_size}: "
            f"no room for a KV block: gpu_memory_utilization={cfg.gpu_memory_utilization} x "
            f"{hw.memory_bytes / 1e9:.1f} GB = {budget / 1e9:.2f} GB, minus weights {weights / 1e9:.2f} GB, minus "
            f"the activation reserve {reserve / 1e9:.2f} GB for max_num_batched_tokens={cfg.max_num_batched_tokens} "
            f"and max_num_seqs={cfg.max_num_seqs}, leaves {cap / 1e9:.2f} GB")
    if weights + FIXED_RESERVE_BYTES < budget and cfg.activation_reserve_bytes is None:
        # the weights fit: the step's token budget is what eats the memory
        why = (" (without chunked prefill it defaults to max_model_len; lower max_model_len, or enable "
               "chunked prefill)" if cfg.rejects_over_budget_prompts else "")
        return head + f"; lower max_num_batched_tokens{why}"
    if weights >= hw.memory_bytes:
        return head + "; raise tensor_parallel_size (the weights alone exceed the GPU's memory)"
    return head + "; raise tensor_parallel_size or gpu_memory_utilization"


def lockstep_dp(spec: RunSpec) -> bool:
    """Whether a replica's data-parallel ranks step together (vLLM: every MoE layer of an expert-parallel
    DP group is a collective, idle ranks run dummy batches)."""
    cfg = spec.config
    return bool(spec.model.is_moe and cfg.enable_expert_parallel and cfg.data_parallel_size > 1)


# -- the run -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A built run: its spec, cost model, every replica (whatever pool it belongs to), the simulation that
    drives them and the observers that watch it."""

    spec: RunSpec
    cost: CostModel
    replicas: list
    sim: object  # anything with run(stream) -> end time, num_events and lengths (kvsim.engine.sim.Simulation)
    observers: list
    #: a P/D cluster (kvsim.engine.disagg.DisaggCluster); None for a colocated one
    cluster: object = None
    #: what the KV links carried when (kvsim.engine.kvlink.LinkLog): runs with P/D or a CPU tier only
    link_log: object = None

    def run(self, stream) -> float:
        """Replay ``stream`` (Requests and InvalidRecords in arrival order) to the end; the end time."""
        return self.sim.run(stream)


def _attach_tiers(spec: RunSpec, replicas, tp_of, link_log) -> None:
    """The CPU KV tier (vLLM's OffloadingConnector, kvsim.engine.offload) of every replica, when asked for."""
    if spec.transfer is not None and spec.transfer.offload:
        from kvsim.engine.offload import attach_tier, make_tier

        for r in replicas:
            sspec, tp = tp_of(r)
            attach_tier(r, make_tier(spec.transfer, sspec, tp, link_log, r.id))


def _colocated(spec: RunSpec, cost: CostModel | None, observers: list, lengths: LengthSampler, fast_forward: bool,
               check_invariants: bool, link_log=None) -> Run:
    replicas = build_replicas(spec, observers, fast_forward, cost)
    _attach_tiers(spec, replicas, lambda r: (spec, spec.config.tensor_parallel_size), link_log)
    sim = Simulation(replicas, make_router(spec.config.router), observers, lengths, check_invariants)
    return Run(spec, replicas[0].cost, replicas, sim, observers, link_log=link_log)


def side_spec(spec: RunSpec, tp: int) -> RunSpec:
    """The run spec of one side of a P/D cluster: the same model, GPU and method at its own tensor-parallel
    degree (a kernel profile measured at another degree is replaced by the one found for this degree, else
    the roofline)."""
    if tp == spec.config.tensor_parallel_size:
        return spec
    cfg = dataclasses.replace(spec.config, tensor_parallel_size=tp)
    check_parallel_shape(spec.model, cfg)
    prof = spec.profile
    if prof is not None and getattr(prof, "tables", None) and prof.tensor_parallel_size != tp:
        from kvsim.cost.profiled import find_profile

        prof = find_profile(spec.model.name, spec.hardware.name, tp)
    return dataclasses.replace(spec, config=cfg, profile=prof)


def _disaggregated(spec: RunSpec, cost: CostModel | None, observers: list, lengths: LengthSampler,
                   fast_forward: bool, check_invariants: bool, link_log=None) -> Run:
    """Prefill and decode instances for ``spec.transfer`` (kvsim.transfer.TransferConfig), linked by a KV
    transfer (kvsim.engine.disagg), each a replica made as every other one is, watched by the same observers."""
    from kvsim.engine.disagg import DisaggCluster, DisaggSimulation, PrefillReplica, transfer_bytes_fn
    from kvsim.specs.links import load_link

    tr, cfg = spec.transfer, spec.config
    if cfg.num_replicas != 1 or cfg.data_parallel_size != 1:
        raise ConfigError(f"disaggregated serving: num_replicas={cfg.num_replicas}, data_parallel_size="
                          f"{cfg.data_parallel_size}: the instance counts give the replicas "
                          "(--num-prefill-instances / --num-decode-instances); leave both at 1")
    if lockstep_dp(spec):
        raise ConfigError("disaggregated serving of a MoE model with expert parallelism across data-parallel ranks "
                          "is not modelled")
    tp_p = tr.prefill_tensor_parallel_size or cfg.tensor_parallel_size
    tp_d = tr.decode_tensor_parallel_size or cfg.tensor_parallel_size
    link = load_link(tr.kv_transfer_link)
    if tr.kv_transfer_latency_us is not None:
        link = link.with_latency(tr.kv_transfer_latency_us * 1e-6)
    prefill, decode, specs = [], [], {}
    rid = 0
    for side, n, tp in (("prefill", tr.num_prefill_instances, tp_p), ("decode", tr.num_decode_instances, tp_d)):
        sspec = side_spec(spec, tp)
        blocks = num_kv_blocks(sspec.model, sspec.hardware, sspec.config, sspec.method)
        if blocks < 1:
            raise ConfigError(f"{side} instances: " + does_not_fit_message(sspec))
        side_cost = make_cost(sspec)
        # the P/D instances schedule synchronously (asynchronous scheduling is not modelled for them)
        scfg = dataclasses.replace(sspec.config, async_scheduling=False)
        for _ in range(n):
            if side == "prefill":
                r = make_replica(rid, sspec.model, sspec.method, scfg, blocks, side_cost, observers, False,
                                 cls=PrefillReplica)
                r.tp = tp
                prefill.append(r)
            else:
                r = make_replica(rid, sspec.model, sspec.method, scfg, blocks, side_cost, observers, fast_forward)
                decode.append(r)
            specs[rid] = (sspec, tp)
            rid += 1
    _attach_tiers(spec, prefill + decode, lambda r: specs[r.id], link_log)
    cluster = DisaggCluster(prefill, decode, link, tr.kv_transfer_mode, spec.model.num_layers, tp_d,
                            transfer_bytes_fn(spec.method, spec.model, tp_d), link_log, tr.prefill_router,
                            tr.decode_router)
    sim = DisaggSimulation(cluster, observers, lengths, check_invariants)
    return Run(spec, prefill[0].cost, cluster.replicas, sim, observers, cluster=cluster, link_log=link_log)


#: kind of cluster -> its builder (see the module docstring)
CLUSTERS: dict[str, Callable[..., Run]] = {"colocated": _colocated, "disaggregated": _disaggregated}


def cluster_kind(spec: RunSpec) -> str:
    """The kind of cluster a spec asks for: ``disaggregated`` when its transfer options name prefill and decode
    instances (kvsim.transfer), else ``colocated`` (every replica prefills and decodes)."""
    tr = spec.transfer
    return "disaggregated" if tr is not None and tr.disaggregated else "colocated"


def build_run(spec: RunSpec, observers=(), lengths: LengthSampler | None = None, fast_forward: bool = True,
              check_invariants: bool = False, cost: CostModel | None = None, link_log=None) -> Run:
    """Build the run ``spec`` describes, watched by ``observers``; ``lengths`` draws output lengths
    (default: :func:`length_sampler`); ``link_log`` (kvsim.engine.kvlink.LinkLog) records what the KV links
    carry in a run with P/D or a CPU tier."""
    kind = cluster_kind(spec)
    if kind not in CLUSTERS:
        raise ConfigError(f"cluster kind {kind!r}: none registered; known: {', '.join(CLUSTERS)}")
    return CLUSTERS[kind](spec, cost, list(observers), lengths or length_sampler(spec), fast_forward,
                          check_invariants, link_log)


__all__ = [
    "CLUSTERS", "ProfileMismatchWarning", "Run", "RunSpec", "build_replicas", "build_run", "check_parallel_shape",
    "cluster_kind", "does_not_fit_message", "length_ratio_for", "length_sampler", "lockstep_dp", "make_cost",
    "make_kv", "make_replica", "make_spec", "num_blocks_for", "profile_mismatch", "resolve_method",
]
