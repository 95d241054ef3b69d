"""Options for moving the KV cache beyond one GPU's memory, read once at the edge (CLI flags or YAML keys):

- **Disaggregated prefill/decode** (``--num-prefill-instances N --num-decode-instances M``): N prefill instances
  and M decode instances, each with its own tensor-parallel degree; the KV moves from the prefill instance to
  the decode instance over ``--kv-transfer-link`` (``kvsim.engine.disagg``). vLLM runs this as separate
  engines joined by a KV connector (``--kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role":
  "kv_producer" | "kv_consumer"}'`` behind a proxy); it has no single option for the cluster shape, so these
  names are kvsim's.
- **CPU KV tier** (``--kv-offloading-size GIB``, vLLM's option and unit: GiB of host memory for the whole
  instance, its native ``OffloadingConnector``): prefix blocks are stored in host memory as they are computed
  and loaded back over ``--kv-offload-link`` on a prefix hit (``kvsim.engine.offload``). ``--kv-offload-gib``
  is accepted as another spelling.

Everything here is off by default: a run without these options is the plain co-located engine, unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kvsim.coerce import annotation_type
from kvsim.coerce import coerce as coerce_value
from kvsim.errors import ConfigError

TRANSFER_MODES = ("whole", "layerwise")
SIDE_ROUTERS = ("round-robin", "least-outstanding-tokens")


@dataclass(frozen=True)
class TransferConfig:
    # -- disaggregated prefill/decode ------------------------------------------------------------------
    #: prefill and decode instances (both 0: co-located serving, the default)
    num_prefill_instances: int = 0
    num_decode_instances: int = 0
    #: tensor-parallel degree of each side (None: --tensor-parallel-size)
    prefill_tensor_parallel_size: int | None = None
    decode_tensor_parallel_size: int | None = None
    #: link between a prefill and a decode instance (specs/data/links.yaml; one per GPU)
    kv_transfer_link: str = "rdma-400g"
    #: override of the link's per-transfer latency, microseconds
    kv_transfer_latency_us: float | None = None
    #: "whole": the decode instance pulls the whole cache once the prefill has finished (vLLM's NixlConnector);
    #: "layerwise": each layer's KV is pushed as the last prefill step computes it (Splitwise, LMCache's and
    #: Mooncake's layer-wise connectors), overlapping the transfer with that step
    kv_transfer_mode: str = "whole"
    #: how a request picks its prefill instance and its decode instance (both at arrival, as vLLM's P/D proxy
    #: and Splitwise's cluster scheduler do)
    prefill_router: str = "least-outstanding-tokens"
    decode_router: str = "least-outstanding-tokens"
    # -- CPU KV tier (vLLM's native OffloadingConnector) --------------------------------------------------
    #: GiB of host memory for offloaded KV blocks, per instance (vLLM --kv-offloading-size); None: no tier
    kv_offloading_size: float | None = None
    #: GPU <-> host link (None: the GPU's own, specs/data/links.yaml host_links)
    kv_offload_link: str | None = None
    #: override of that link's per-transfer latency, microseconds
    kv_offload_latency_us: float | None = None

    @property
    def disaggregated(self) -> bool:
        return self.num_prefill_instances > 0

    @property
    def offload(self) -> bool:
        return self.kv_offloading_size is not None

    def validate(self, source: str = "options") -> "TransferConfig":
        def bad(key, why):
            raise ConfigError(f"{source}: {key}={getattr(self, key)!r}: {why}")

        for key in ("num_prefill_instances", "num_decode_instances"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(key, "must be an integer >= 0")
        if (self.num_prefill_instances > 0) != (self.num_decode_instances > 0):
            bad("num_prefill_instances" if self.num_prefill_instances == 0 else "num_decode_instances",
                f"disaggregated serving needs both sides: num_prefill_instances={self.num_prefill_instances}, "
                f"num_decode_instances={self.num_decode_instances} (both 0: co-located serving)")
        for key in ("prefill_tensor_parallel_size", "decode_tensor_parallel_size"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                bad(key, "must be a positive integer or unset")
        if self.kv_transfer_mode not in TRANSFER_MODES:
            bad("kv_transfer_mode", f"must be one of {', '.join(TRANSFER_MODES)}")
        for key in ("prefill_router", "decode_router"):
            if getattr(self, key) not in SIDE_ROUTERS:
                bad(key, f"must be one of {', '.join(SIDE_ROUTERS)}")
        for key in ("kv_transfer_latency_us", "kv_offload_latency_us"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0)):
                bad(key, "must be a finite number of microseconds >= 0")
        v = self.kv_offloading_size
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0)):
            bad("kv_offloading_size", "must be a finite number of GiB > 0 (vLLM's unit), or unset for no CPU tier")
        from kvsim.specs.links import load_link

        try:
            load_link(self.kv_transfer_link)
            if self.kv_offload_link is not None:
                load_link(self.kv_offload_link)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return self

    def nondefault(self) -> dict:
        """The options that differ from the defaults (what a summary reports)."""
        base = TransferConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(base, f.name)}


FIELDS = {f.name: f for f in dataclasses.fields(TransferConfig)}
#: options that only mean something for a disaggregated cluster
PD_ONLY = ("prefill_tensor_parallel_size", "decode_tensor_parallel_size", "kv_transfer_link", "kv_transfer_latency_us",
           "kv_transfer_mode", "prefill_router", "decode_router")
#: other spellings (the issue's name for vLLM's option)
ALIASES = {"kv_offload_gib": "kv_offloading_size"}


def coerce(key: str, value, source: str):
    """A YAML or flag value as the field's type (kvsim.coerce), or a ConfigError naming the source, key and value."""
    try:
        return coerce_value(value, annotation_type(FIELDS[key].type))
    except ValueError as e:
        raise ConfigError(f"{source}: key {key!r}: value {value!r} is not {e}") from None


def transfer_from_mapping(data: dict, source: str = "options") -> TransferConfig | None:
    """Options by name (dashes or underscores, aliases allowed) -> a validated TransferConfig, or None when
    every option has its default (the plain co-located engine)."""
    known = {}
    for raw, value in (data or {}).items():
        key = str(raw).replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in FIELDS:
            raise ConfigError(f"{source}: unknown option {raw!r} (value {value!r})")
        if value is not None:
            known[key] = coerce(key, value, source)
    cfg = TransferConfig(**known).validate(source)
    return cfg if cfg.nondefault() else None


#: YAML keys a --config file may carry for these options (kvsim.config.load_run_file passes them through)
KEYS = tuple(FIELDS) + tuple(ALIASES)


__all__ = ["TransferConfig", "transfer_from_mapping", "KEYS", "TRANSFER_MODES", "SIDE_ROUTERS"]
