"""The measured-case format of ``kvsim validate``: reading a case folder (the format of ``shared/validation``
and of ``kvprof replay``'s output) into a :class:`Case`, and its workload into the requests to replay.

    run.yaml        engine options in vLLM's names, plus descriptive keys (model HF id, gpu.sku, workload)
    measured.csv    one row per request: request_id, arrival_time_s (realised), prompt_tokens,
                    output_tokens, ttft_ms, tpot_ms, e2el_ms[, queue_ms]
    anchor.txt      optional: another simulator's published predicted-vs-measured table for the run
    steps.csv       optional: one row per measured engine step (columns in docs/fidelity.md)
    engine_timeseries.csv   optional: per-second running / waiting counts of the real engine
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvsim.config import EngineConfig, config_from_mapping
from kvsim.errors import ConfigError
from kvsim.specs.model import HF_MODELS  # Hugging Face ids -> shipped names

#: the per-request latencies a case measures and kvsim predicts
METRICS = ("ttft_ms", "tpot_ms", "e2el_ms")


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
