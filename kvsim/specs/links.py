"""Links the KV cache moves over (NVLink, PCIe, RDMA NICs). Data in ``specs/data/links.yaml``, every figure
with its source beside it, as ``hardware.yaml`` does for GPUs.

A link is the connection of ONE GPU: ``bandwidth_bytes_per_s`` one direction and a fixed ``latency_s`` per
transfer. Instances of several GPUs have one per GPU (``kvsim.engine.kvlink``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

from kvsim.errors import ConfigError, UnknownNameError
from kvsim.resources import read_mapping

_RESERVED = ("host_links",)
#: every entry's figures, each with a source
FIGURE_KEYS = ("bandwidth_gb_s", "latency_us")


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0
    kind: str = ""
    sources: dict = field(default_factory=dict, compare=False)

    def transfer_time_s(self, num_bytes: float, lanes: int = 1) -> float:
        """Latency plus bytes over ``lanes`` of this link side by side (one per GPU)."""
        if num_bytes <= 0:
            return 0.0
        if math.isinf(self.bandwidth_bytes_per_s):
            return self.latency_s
        return self.latency_s + num_bytes / (self.bandwidth_bytes_per_s * lanes)

    def with_latency(self, latency_s: float | None) -> "LinkSpec":
        return self if latency_s is None else replace(self, latency_s=float(latency_s))


#: a link with no cost at all: what the analytic test of disaggregation uses
INFINITE = LinkSpec("infinite", math.inf, 0.0, "ideal", {"bandwidth_gb_s": "ideal: infinitely fast, no latency"})


@lru_cache(maxsize=1)
def _raw() -> dict:
    return read_mapping("specs", "data", "links.yaml")


def known_links() -> list[str]:
    return sorted(k for k in _raw() if k not in _RESERVED) + [INFINITE.name]


def _key(name) -> str:
    return str(name).strip().lower().replace("_", "-")


def load_link(name) -> LinkSpec:
    """A link by name (``rdma-400g``, ``nvlink-4``, ``pcie-gen5-x16``, ``infinite``); a LinkSpec passes through."""
    if isinstance(name, LinkSpec):
        return name
    key = _key(name)
    if key == INFINITE.name:
        return INFINITE
    table = {k: v for k, v in _raw().items() if k not in _RESERVED}
    if key not in table:
        raise UnknownNameError("link", name, [*table, INFINITE.name], "see kvsim/specs/data/links.yaml for each one's source")
    e = table[key]
    where = f"specs/data/links.yaml: {key}"
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: entry must be a mapping")
    vals = {}
    for k in FIGURE_KEYS:
        if k not in e:
            raise ConfigError(f"{where}: missing key {k!r}")
        try:
            v = float(e[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {k} = {e[k]!r} is not a number") from None
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{where}: {k} = {e[k]!r} must be a finite number >= 0")
        if k not in (e.get("sources") or {}):
            raise ConfigError(f"{where}: {k} has no source")
        vals[k] = v
    if vals["bandwidth_gb_s"] <= 0:
        raise ConfigError(f"{where}: bandwidth_gb_s = {e['bandwidth_gb_s']!r} must be positive")
    return LinkSpec(key, vals["bandwidth_gb_s"] * 1e9, vals["latency_us"] * 1e-6, str(e.get("kind", "")),
                    dict(e.get("sources") or {}))


def host_link(hardware_name: str) -> LinkSpec:
    """The GPU's own link to host memory (the CPU KV tier's default), from ``host_links`` in links.yaml."""
    entry = (_raw().get("host_links") or {}).get(_key(hardware_name))
    if entry is None:
        raise ConfigError(f"no host link known for hardware {hardware_name!r} (specs/data/links.yaml: host_links); "
                          f"give --kv-offload-link, one of {', '.join(known_links())}")
    return load_link(entry["link"])


__all__ = ["LinkSpec", "INFINITE", "load_link", "host_link", "known_links"]
