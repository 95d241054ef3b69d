"""GPU datasheet figures. Data in ``specs/data/hardware.yaml``, each figure with its source beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import yaml

from kvsim.errors import UnknownNameError

GIB = 1024**3


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_bytes: int
    #: peak HBM/GDDR bandwidth
    mem_bw_bytes_per_s: float
    #: dense (no sparsity) tensor-core peaks
    fp16_flops: float
    fp8_flops: float
    #: per-GPU bandwidth between GPUs of one node (NVLink, or PCIe where there is none), one direction
    interconnect_bw_bytes_per_s: float
    sources: dict = field(default_factory=dict, compare=False)


def _table() -> dict:
    text = resources.files("kvsim.specs").joinpath("data/hardware.yaml").read_text()
    return yaml.safe_load(text)


def known_hardware() -> list[str]:
    return sorted(_table())


def load_hardware(name: str) -> HardwareSpec:
    table = _table()
    key = name.lower()
    if key not in table:
        raise UnknownNameError("hardware", name, table)
    e = table[key]
    return HardwareSpec(
        name=key,
        memory_bytes=int(float(e["memory_gb"]) * 1e9) if "memory_gb" in e else int(float(e["memory_gib"]) * GIB),
        mem_bw_bytes_per_s=float(e["mem_bw_gb_s"]) * 1e9,
        fp16_flops=float(e["fp16_tflops"]) * 1e12,
        fp8_flops=float(e["fp8_tflops"]) * 1e12,
        interconnect_bw_bytes_per_s=float(e["interconnect_gb_s"]) * 1e9,
        sources=e.get("sources", {}),
    )
