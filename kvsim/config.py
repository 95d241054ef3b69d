"""Engine options, spelled as vLLM spells them, read once at the edge (CLI flags or a YAML file).

Defaults follow the vLLM V1 engine as of v0.19 (``vllm/engine/arg_utils.py``,
``EngineArgs._set_default_args``) for the OpenAI-compatible server: ``max_num_batched_tokens`` 8192 and
``max_num_seqs`` 1024 on GPUs with at least 70 GiB, else 2048 and 256; chunked prefill and prefix
caching on; block size 16; ``gpu_memory_utilization`` 0.9. ``None`` here means "the hardware-dependent
vLLM default", resolved by :meth:`EngineConfig.resolved`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kvsim.coerce import annotation_type, coerce
from kvsim.errors import ConfigError

GIB = 1024**3
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
SCHEDULERS = ("chunked", "prefill-first")
ROUTERS = ("round-robin", "least-outstanding-tokens", "vllm-dp")


def option(default, help: str, group: str = "vllm", choices=None, hidden_aliases=(), short: str | None = None):
    """An engine option: its default and what the command line says of it. ``group``: "vllm" (vLLM's own
    argument, same name and meaning) or "kvsim" (kvsim's cluster and scheduling knobs). The CLI's flags are
    made from these (kvsim.cli.common.add_engine_args): ``--name-with-dashes``, a ``--no-`` form for a
    boolean (``short`` names the feature it turns off), ``choices`` where given."""
    meta = {"help": help, "group": group, "choices": choices, "hidden_aliases": tuple(hidden_aliases),
            "short": short or help.split(" (")[0]}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EngineConfig:
    # -- vLLM engine arguments (same names, same meaning) ------------------------------------
    tensor_parallel_size: int = option(1, "GPUs per replica (weights and KV split, all-reduce per layer)")
    data_parallel_size: int = option(1, "engine ranks per replica group, each with its own scheduler and KV cache")
    enable_expert_parallel: bool = option(False, "split MoE experts across the data-parallel ranks",
                                          short="expert parallelism")
    max_num_seqs: int | None = option(None, "most sequences in one step (default: vLLM V1's, by GPU memory: 1024 on "
                                            ">= 70 GiB, else 256)")
    max_num_batched_tokens: int | None = option(None, "token budget per step (default: vLLM V1's, by GPU memory: "
                                                      "8192 on >= 70 GiB, else 2048)")
    max_model_len: int | None = option(None, "context limit (default: the model's max_position_embeddings)")
    block_size: int = option(16, "tokens per KV block")
    gpu_memory_utilization: float = option(0.9, "fraction of GPU memory vLLM may use")
    kv_cache_dtype: str = option("auto", "auto | fp8 (fp8 implies --method fp8)")
    enable_chunked_prefill: bool = option(True, "chunked prefill")
    enable_prefix_caching: bool = option(True, "automatic prefix caching from prefix_hashes",
                                         hidden_aliases=("--prefix-caching",), short="automatic prefix caching")
    num_gpu_blocks_override: int | None = option(None, "pin the KV block count per replica (default: sized from memory)")
    #: vLLM's ``--async-scheduling`` (on by default since vLLM 0.14.0): the scheduler plans step n+1
    #: while step n runs, so a request that arrives during step n is first scheduled in step n+2.
    #: kvsim's default stays off (its replays and tests predate it); ``kvsim validate`` turns it on for
    #: cases run on vLLM >= 0.14 that do not record it
    async_scheduling: bool = option(False, "schedule step n+1 while step n runs (vLLM's default since 0.14; "
                                           "kvsim's default: off)", short="asynchronous scheduling")
    seed: int = option(0, "seed for sampled output lengths")
    # -- kvsim's own knobs --------------------------------------------------------------------
    #: "chunked" mirrors vLLM V1 (running requests first, then waiting ones in the remaining budget);
    #: "prefill-first" mirrors vLLM V0 without chunked prefill (a step is all prefill or all decode)
    scheduler: str = option("chunked", "chunked: vLLM V1; prefill-first: vLLM V0 without chunked prefill",
                            group="kvsim", choices=SCHEDULERS)
    #: independent engine replicas (each with tensor_parallel_size GPUs) behind a router
    num_replicas: int = option(1, "independent replicas", group="kvsim")
    #: how a request picks a replica (or a lockstep group): "least-outstanding-tokens", "round-robin", or
    #: "vllm-dp" (vLLM's DP balancer, 4 x waiting + running; kvsim.engine.cluster.VllmDPBalancer). Inside
    #: a lockstep group the rank is always picked as vLLM's DP front end does ("vllm-dp")
    router: str = option("least-outstanding-tokens", "how a request picks a replica: least-outstanding-tokens, "
                         "round-robin, or vllm-dp (vLLM 0.19's DP balancer, lowest 4 x waiting + running)",
                         group="kvsim", choices=ROUTERS)
    #: memory held back for activations, CUDA graphs and the allocator; vLLM measures this with a
    #: profiling forward pass, kvsim estimates it (see kvsim.engine.memory)
    activation_reserve_bytes: int | None = option(None, "memory held back for activations, CUDA graphs and the "
                                                        "allocator per GPU (default: kvsim's estimate)", group="kvsim")

    @property
    def expert_parallel_size(self) -> int:
        """How many ways each expert group is split beyond tensor parallelism: with expert parallelism
        vLLM spreads the experts over all data_parallel_size x tensor_parallel_size ranks, i.e. over the
        data-parallel ranks on top of the tensor-parallel split; without it, 1."""
        return self.data_parallel_size if self.enable_expert_parallel else 1

    @property
    def rejects_over_budget_prompts(self) -> bool:
        """Whether a prompt longer than ``max_num_batched_tokens`` is refused at arrival: it can never be
        scheduled when prompts are not split (vLLM V0's prefill-first scheduler, or chunked prefill off)."""
        return self.scheduler == "prefill-first" or not self.enable_chunked_prefill

    def resolved(self, hardware_memory_bytes: int) -> "EngineConfig":
        """Fill hardware-dependent vLLM defaults."""
        big = hardware_memory_bytes >= 70 * GIB
        mnbt = self.max_num_batched_tokens
        if mnbt is None:
            if self.enable_chunked_prefill and self.scheduler == "chunked":
                mnbt = 8192 if big else 2048
            else:
                # without chunking a whole prompt must fit one step (vLLM: max(max_model_len, 2048))
                mnbt = max(self.max_model_len or 2048, 2048)
        mns = self.max_num_seqs if self.max_num_seqs is not None else (1024 if big else 256)
        return dataclasses.replace(self, max_num_batched_tokens=mnbt, max_num_seqs=mns)

    def validate(self, source: str = "engine config") -> "EngineConfig":
        def bad(key, why):
            raise ConfigError(f"{source}: {key}={getattr(self, key)!r}: {why}")

        for key in ("tensor_parallel_size", "data_parallel_size", "block_size", "num_replicas"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, "must be a positive integer")
        for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_gpu_blocks_override"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(key, "must be a positive integer or unset")
        if not (0.0 < float(self.gpu_memory_utilization) <= 1.0):
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", f"must be one of {SCHEDULERS}")
        if self.router not in ROUTERS:
            bad("router", f"must be one of {ROUTERS}")
        if self.enable_expert_parallel and self.data_parallel_size * self.tensor_parallel_size < 2:
            bad("enable_expert_parallel", "needs data_parallel_size x tensor_parallel_size >= 2")
        # prefill-first never chunks either, so it gets the same check as --no-enable-chunked-prefill
        unchunked = not self.enable_chunked_prefill or self.scheduler == "prefill-first"
        if (self.max_num_batched_tokens is not None and self.max_model_len is not None
                and unchunked and self.max_num_batched_tokens < self.max_model_len):
            how = "scheduler='prefill-first'" if self.enable_chunked_prefill else "enable_chunked_prefill=False"
            bad("max_num_batched_tokens",
                f"is smaller than max_model_len={self.max_model_len}; with {how} a prompt is never split, so a "
                "long one could never be scheduled (vLLM raises the same error): raise max_num_batched_tokens "
                "or lower max_model_len")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            bad("seed", "must be an integer >= 0 (numpy's seed range)")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}

#: keys of a measured case's run.yaml that describe the run rather than configure the engine
#: (documented in shared/validation/README.md); accepted and ignored by the engine model
DESCRIPTIVE_KEYS = {
    "model", "dtype", "enforce_eager", "engine", "engine_version", "gpu", "num_gpus", "workload",
    "source", "num_gpu_blocks", "scheduling_policy", "prefix_caching_hash_algo",
    "hardware", "method", "notes", "measured_at", "client_overhead_ms",
}


def coerce_option(key: str, value, source: str):
    """An engine option's value in its declared type (kvsim.coerce); a ConfigError naming the source,
    key and value when it is not one."""
    try:
        return coerce(value, annotation_type(FIELDS[key].type))
    except ValueError as e:
        raise ConfigError(f"{source}: key {key!r}: value {value!r} is not {e}") from None


def config_from_mapping(data: dict, source: str = "config", base: EngineConfig | None = None) -> tuple[EngineConfig, dict]:
    """Build an EngineConfig from vLLM-named keys (dashes or underscores). Returns (config, descriptive keys).

    Unknown keys fail with the file, key and value named, so a typo never silently does nothing.
    """
    base = base or EngineConfig()
    known, extra = {}, {}
    for raw_key, value in (data or {}).items():
        key = str(raw_key).replace("-", "_")
        if key == "num_gpu_blocks" and value is not None:
            extra[key] = value
            continue
        if key in FIELDS:
            known[key] = coerce_option(key, value, source)
        elif key in DESCRIPTIVE_KEYS:
            extra[key] = value
        else:
            raise ConfigError(
                f"{source}: unknown engine option {raw_key!r} (value {value!r}); known options: "
                + ", ".join(sorted(FIELDS)))
    cfg = dataclasses.replace(base, **known)
    cfg.validate(source)
    return cfg, extra


def read_yaml(path: str | Path, what: str = "config file"):
    """A YAML file's content; a missing file or bad YAML is a ConfigError naming the file."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(p)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


#: keys a ``--config`` file may hold beside the engine options: what to run. Command-line flags override
#: them as they override the engine options; ``dtype`` is vLLM's ``--dtype`` (kvsim.specs.model.apply_dtype)
RUN_KEYS = ("model", "hardware", "method", "dtype")


def load_run_file(path: str | Path) -> tuple[EngineConfig, dict]:
    """A user's ``--config`` YAML: (engine options, run keys). Every key is honoured or refused: engine
    options by vLLM's names, ``model``, ``hardware``, ``method`` and ``dtype``; anything else (a typo, or
    a key that only describes a measured run, like ``gpu``) is an error naming the file and the key."""
    p = Path(path)
    data = read_yaml(p, "config file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of engine options")
    from kvsim.transfer import ALIASES as TRANSFER_ALIASES, KEYS as TRANSFER_KEYS, coerce as transfer_coerce

    engine, run = {}, {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in TRANSFER_KEYS:
            # P/D and CPU-tier options (kvsim.transfer): passed to the command like flags, checked there
            key = TRANSFER_ALIASES.get(key, key)
            run[key] = transfer_coerce(key, value, str(p))
            continue
        if key in RUN_KEYS:
            ok = isinstance(value, str) and value.strip() if key != "method" else (
                isinstance(value, (str, dict)) or (isinstance(value, list) and value))
            if not ok:
                raise ConfigError(f"{p}: key {raw_key!r}: value {value!r} is not a "
                                  + ("method spec (NAME:knob=value,..., a mapping with 'name', or a list)"
                                     if key == "method" else f"{key} name"))
            if key == "model" and value.strip().endswith(".json") and not Path(value.strip()).is_absolute():
                value = str(p.parent / value.strip())  # a config.json next to the YAML file
            run[key] = value
        elif key in FIELDS:
            engine[raw_key] = value
        else:
            raise ConfigError(
                f"{p}: unknown key {raw_key!r} (value {value!r}); a config file takes {', '.join(RUN_KEYS)}, "
                f"the engine options {', '.join(sorted(FIELDS))} and the P/D and CPU-tier options "
                f"{', '.join(TRANSFER_KEYS)}")
    cfg, _ = config_from_mapping(engine, source=str(p))
    return cfg, run


def load_config_file(path: str | Path, base: EngineConfig | None = None) -> tuple[EngineConfig, dict]:
    p = Path(path)
    data = read_yaml(p, "config file")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of engine options")
    return config_from_mapping(data or {}, source=str(p), base=base)
