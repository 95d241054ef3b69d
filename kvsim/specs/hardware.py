"""GPU datasheet figures. Data in ``specs/data/hardware.yaml``, each figure with its source beside it.

YAML layout (one mapping per GPU, plus an optional top-level ``aliases`` mapping)::

    h100:
      memory_gb: 80            # capacity as the vendor states it (decimal GB)
      memory_bytes: 85028896768  # optional: bytes CUDA reports as total; overrides memory_gb
      mem_bw_gb_s: 3350        # peak DRAM bandwidth, 1e9 B/s
      fp16_tflops: 989.4       # dense fp16/bf16 tensor peak, FP32 accumulate
      fp8_tflops: 1978.9       # dense fp8 tensor peak; 0 = no fp8 tensor cores
      fp32_tflops: 67          # CUDA-core (non-tensor) FP32 peak: bounds dequantisation ALU work
      interconnect_gb_s: 450   # GPU-to-GPU, one direction, per GPU
      collective_gb_s: 17.18   # optional, with collective_latency_us: one ring step of a collective
      collective_latency_us: 20  #   between two GPUs of the machine, as measured or modelled there
      allreduce_gb_s: 375      # optional, with allreduce_latency_us: vLLM's own all-reduce kernels over
      allreduce_latency_us: 6  #   NVLink (one-shot / two-shot), as published for this GPU in a CUDA graph
      sources: {memory_gb: "...", ...}   # one entry per figure
    aliases:
      h100-sxm: h100

``collective_gb_s`` / ``collective_latency_us`` (both or neither) replace ``interconnect_gb_s`` times the
fitted ``eff_comm`` in the cost of collectives (``kvsim.cost.roofline``). That efficiency is fitted on
NCCL timings over NVLink; a PCIe machine, where NCCL may not use peer-to-peer and stages data through
host memory, is not that link at a lower speed, so where a figure for the machine exists it is used as is.

``allreduce_gb_s`` / ``allreduce_latency_us`` (both or neither) describe the all-reduce vLLM itself runs
between GPUs joined by NVLink: its custom one-shot kernel (each GPU reads its p-1 peers' buffers and
sums, ``a + (p-1) S / B``) or, for larger messages, a two-shot one (reduce-scatter then all-gather,
``2a + 2 (p-1)/p S / B``), whichever is faster, inside the step's CUDA graph. Decode messages are tens
to hundreds of KB, where NCCL's ring (the tables ``eff_comm`` is fitted on, timed outside CUDA graphs)
is latency-bound and several times slower.

``fp8_flops == 0`` means the GPU has no FP8 tensor cores; callers fall back to the fp16 peak
(``kvsim.cost.roofline`` does). ``supports_fp8`` says so explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvsim.errors import ConfigError, UnknownNameError
from kvsim.resources import read_mapping

GIB = 1024**3

#: the figures every entry must carry, each with a source
FIGURE_KEYS = ("memory_gb", "mem_bw_gb_s", "fp16_tflops", "fp8_tflops", "fp32_tflops", "interconnect_gb_s")
#: figures an entry may carry, each then with a source
OPTIONAL_FIGURE_KEYS = ("memory_bytes", "collective_gb_s", "collective_latency_us", "allreduce_gb_s",
                        "allreduce_latency_us")
_RESERVED = ("aliases",)


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_bytes: int
    #: peak HBM/GDDR bandwidth
    mem_bw_bytes_per_s: float
    #: dense (no sparsity) tensor-core peaks
    fp16_flops: float
    fp8_flops: float
    #: peak FP32 rate of the CUDA cores (non-tensor): bounds dequantisation and other element-wise ALU work
    fp32_flops: float
    #: per-GPU bandwidth between GPUs of one node (NVLink, or PCIe where there is none), one direction
    interconnect_bw_bytes_per_s: float
    sources: dict = field(default_factory=dict, compare=False)
    #: one step of a ring collective between two GPUs of this machine (bandwidth, latency), where a
    #: figure for the machine exists; None: the cost model uses interconnect x its fitted efficiency
    collective_bw_bytes_per_s: float | None = None
    collective_latency_s: float | None = None
    #: vLLM's one-/two-shot all-reduce over NVLink in a CUDA graph (per-GPU read bandwidth from peers,
    #: and the latency of one shot), where published for this GPU; None: the NCCL ring model
    allreduce_bw_bytes_per_s: float | None = None
    allreduce_latency_s: float | None = None

    @property
    def supports_fp8(self) -> bool:
        """False where the datasheet has no FP8 tensor rate (stored as 0): use ``fp16_flops`` instead."""
        return self.fp8_flops > 0


def _raw_table() -> dict:
    return read_mapping("specs", "data", "hardware.yaml")


def hardware_table() -> dict:
    """GPU entries only (the ``aliases`` mapping removed)."""
    return {k: v for k, v in _raw_table().items() if k not in _RESERVED}


def hardware_aliases() -> dict:
    """Alias -> canonical name; keys normalised like user input (YAML may parse ``4090`` as an int)."""
    return {hardware_key(k): hardware_key(v) for k, v in (_raw_table().get("aliases") or {}).items()}


def known_hardware() -> list[str]:
    return sorted(hardware_table())


def hardware_key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def load_hardware(name: str) -> HardwareSpec:
    """A GPU by its short name (``h100``) or an alias (``h100-sxm``); case and ``_``/``-`` are ignored."""
    table, aliases = hardware_table(), hardware_aliases()
    key = hardware_key(name)
    key = aliases.get(key, key)
    if key not in table:
        raise UnknownNameError("hardware", name, table, "`kvsim hardware` lists them with their figures and sources")
    e = table[key]
    where = f"specs/data/hardware.yaml: {key}"
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: entry must be a mapping")

    def num(k: str) -> float:
        if k not in e:
            raise ConfigError(f"{where}: missing key {k!r}")
        try:
            v = float(e[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {k} = {e[k]!r} is not a number") from None
        if v < 0:
            raise ConfigError(f"{where}: {k} = {e[k]!r} is negative")
        return v

    if "memory_bytes" in e:
        memory = int(num("memory_bytes"))
    elif "memory_gb" in e:
        memory = int(num("memory_gb") * 1e9)
    else:
        memory = int(num("memory_gib") * GIB)
    has = [k for k in ("collective_gb_s", "collective_latency_us") if k in e]
    if len(has) == 1:
        raise ConfigError(f"{where}: {has[0]} = {e[has[0]]!r} needs its pair "
                          "(collective_gb_s and collective_latency_us go together)")
    coll_bw = coll_lat = None
    if has:
        coll_bw, coll_lat = num("collective_gb_s") * 1e9, num("collective_latency_us") * 1e-6
        if coll_bw == 0:
            raise ConfigError(f"{where}: collective_gb_s = {e['collective_gb_s']!r} must be positive")
    pair = [k for k in ("allreduce_gb_s", "allreduce_latency_us") if k in e]
    if len(pair) == 1:
        raise ConfigError(f"{where}: {pair[0]} = {e[pair[0]]!r} needs its pair "
                          "(allreduce_gb_s and allreduce_latency_us go together)")
    ar_bw = ar_lat = None
    if pair:
        ar_bw, ar_lat = num("allreduce_gb_s") * 1e9, num("allreduce_latency_us") * 1e-6
        if ar_bw == 0:
            raise ConfigError(f"{where}: allreduce_gb_s = {e['allreduce_gb_s']!r} must be positive")
    return HardwareSpec(
        name=key,
        memory_bytes=memory,
        mem_bw_bytes_per_s=num("mem_bw_gb_s") * 1e9,
        fp16_flops=num("fp16_tflops") * 1e12,
        fp8_flops=num("fp8_tflops") * 1e12,
        fp32_flops=num("fp32_tflops") * 1e12,
        interconnect_bw_bytes_per_s=num("interconnect_gb_s") * 1e9,
        sources=dict(e.get("sources") or {}),
        collective_bw_bytes_per_s=coll_bw,
        collective_latency_s=coll_lat,
        allreduce_bw_bytes_per_s=ar_bw,
        allreduce_latency_s=ar_lat,
    )
