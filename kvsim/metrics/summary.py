"""summary.json: vLLM benchmark metric names (``request_throughput``, ``output_throughput``,
``ttft_ms``/``tpot_ms``/``itl_ms``/``e2el_ms`` with mean, median, p90, p99) plus what kvsim adds
(rejections with reasons, KV bytes saved, output-length change, which cost model was used)."""

from __future__ import annotations

import json
import math


def build_summary(spec, rec, replicas, lengths, sim, wall_s: float) -> dict:
    cfg = spec.config
    model, method = spec.model, spec.method
    first = rec.first_arrival_s if rec.first_arrival_s is not None else 0.0
    duration = max(0.0, rec.last_finish_s - first) if rec.completed else 0.0
    rate = (lambda x: x / duration if duration > 0 else 0.0)
    full_bpt = model.kv_bytes_per_token(tensor_parallel_size=cfg.tensor_parallel_size)
    bpt = method.bytes_per_token(model, cfg.tensor_parallel_size)
    rejected = sum(rec.rejected.values())
    held_s = sum(r.kv_held_byte_s for r in replicas)
    full_s = sum(r.kv_full_byte_s for r in replicas)
    span = max((r.kv_last_s for r in replicas), default=0.0) - first
    # peaks per replica (one GPU group's memory), the largest over replicas, as peak_kv_blocks_used
    peak_held = max((r.peak_kv_held_bytes for r in replicas), default=0.0)
    peak_full = max((r.peak_kv_full_bytes for r in replicas), default=0.0)
    kv = replicas[0].kv
    cost = replicas[0].cost
    summary = {
        "kvsim_version": __import__("kvsim").__version__,
        "model": model.name,
        "hardware": spec.hardware.name,
        "dtype": model.dtype,
        "method": method.spec_string(),
        "cost_model": cost.name,
        "engine": {k: v for k, v in cfg.__dict__.items()},
        "seed": cfg.seed,
        "num_requests": rec.num_arrivals,
        # as `kvsim trace stats` (request_rate_per_s): 1 / mean inter-arrival gap, after --rate-scale
        "arrival_rate": ((rec.num_arrivals - 1) / (rec.last_arrival_s - first)
                         if rec.num_arrivals > 1 and rec.last_arrival_s > first else None),
        "completed": rec.completed,
        "rejected": rejected,
        "rejected_reasons": dict(sorted(rec.rejected.items())),
        "duration_s": duration,
        "request_throughput": rate(rec.completed),
        "output_throughput": rate(rec.output_tokens),
        "total_token_throughput": rate(rec.output_tokens + rec.prompt_tokens),
        "total_input_tokens": rec.prompt_tokens,
        "total_output_tokens": rec.output_tokens,
        "ttft_ms": rec.ttft.summary(1e3),
        "tpot_ms": rec.tpot.summary(1e3),
        "itl_ms": rec.itl.summary(1e3),
        "e2el_ms": rec.e2el.summary(1e3),
        "slo": rec.slo.as_dict(),
        "goodput": rate(rec.good),
        "goodput_fraction": rec.good / rec.completed if rec.completed else 0.0,
        "num_replicas": len(replicas),
        "gpus": len(replicas) * cfg.tensor_parallel_size,
        "kv_blocks_per_replica": kv.num_blocks,
        "kv_tokens_per_replica": kv.num_blocks * cfg.block_size,
        "kv_bytes_per_token": bpt,
        "kv_bytes_per_token_full": full_bpt,
        # one definition everywhere: KV bytes the running requests hold (kept tokens x bytes per token +
        # per-sequence extras) against what the full cache would hold for the same requests at the same
        # moments, time-averaged over the run and at the peaks (kvsim.engine.replica._account_kv)
        "kv_bytes_saved_fraction": (1.0 - held_s / full_s) if full_s > 0 else None,
        "kv_bytes_saved_fraction_peak": (1.0 - peak_held / peak_full) if peak_full > 0 else None,
        "mean_kv_held_bytes": held_s / span if span > 0 else 0.0,
        "mean_kv_full_bytes": full_s / span if span > 0 else 0.0,
        "peak_kv_held_bytes": peak_held,
        "peak_kv_full_bytes": peak_full,
        "peak_kv_blocks_used": rec.peak_kv_blocks,
        "peak_batch_size": rec.peak_batch_size,
        "mean_batch_size": rec.batch_size_sum / rec.num_steps if rec.num_steps else 0.0,
        "num_preemptions": sum(r.scheduler.num_preemptions for r in replicas),
        "prefix_cache_hit_rate": (rec.prefix_hit_tokens / rec.prefix_query_tokens) if rec.prefix_query_tokens else None,
        "output_length_source": lengths.source,
        "output_length_source_kind": lengths.kind,
        "num_output_length_capped": getattr(sim.lengths, "num_capped", 0),
        "mean_output_length_change": (rec.output_tokens / rec.trace_output_tokens - 1.0) if rec.trace_output_tokens else 0.0,
        "sim": {
            "engine_steps": rec.num_steps,
            "events": sim.num_events,
            "fast_forward_stretches": sum(r.num_ff_stretches for r in replicas),
            "wall_s": wall_s,
            "percentiles_exact": all(q.exact for q in (rec.ttft, rec.tpot, rec.e2el, rec.itl)),
        },
    }
    return _clean(summary)


#: metrics vLLM's benchmark_serving writes as mean_/median_/std_/pNN_<metric>_ms, in its order
VLLM_METRICS = ("ttft", "tpot", "itl", "e2el")


def vllm_result(s: dict, date: str | None = None) -> dict:
    """The flat result JSON of vLLM's ``benchmarks/benchmark_serving.py --save-result`` (``vllm bench
    serve``) from a kvsim summary, so tools written for vLLM's results read kvsim's unchanged: the setup
    keys (``backend`` is ``"kvsim"``, ``request_rate`` the trace's mean arrival rate), then ``duration``,
    ``completed``, ``failed`` (rejected), token totals, ``request_throughput``, ``request_goodput`` (None
    without an SLO, as vLLM without --goodput), ``output_throughput``, ``total_token_throughput`` and
    ``mean_/median_/std_/p90_/p99_{ttft,tpot,itl,e2el}_ms`` (vLLM with ``--percentile-metrics
    ttft,tpot,itl,e2el --metric-percentiles 90,99``). The per-request lists vLLM drops without
    ``--save-detailed`` are not written."""
    import datetime as _dt

    out = {
        "date": date or _dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "kvsim",
        "model_id": s["model"],
        "tokenizer_id": s["model"],
        "num_prompts": s["num_requests"],
        "request_rate": s.get("arrival_rate") if s.get("arrival_rate") is not None else "inf",
        "burstiness": None,
        "max_concurrency": None,
        "duration": s["duration_s"],
        "completed": s["completed"],
        "failed": s["rejected"],
        "total_input_tokens": s["total_input_tokens"],
        "total_output_tokens": s["total_output_tokens"],
        "request_throughput": s["request_throughput"],
        "request_goodput": s["goodput"] if s.get("slo") else None,
        "output_throughput": s["output_throughput"],
        "total_token_throughput": s["total_token_throughput"],
    }
    for m in VLLM_METRICS:
        d = s[f"{m}_ms"] or {}
        out[f"mean_{m}_ms"] = d.get("mean")
        out[f"median_{m}_ms"] = d.get("median")
        out[f"std_{m}_ms"] = d.get("std")
        out[f"p90_{m}_ms"] = d.get("p90")
        out[f"p99_{m}_ms"] = d.get("p99")
    return out


def _clean(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _short(text: str, n: int = 90) -> str:
    text = text.split(";")[0]
    return text if len(text) <= n else text[: n - 3] + "..."


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(s: dict) -> str:
    def pct(name):
        d = s[name]
        if not d or d.get("mean") is None:
            return f"  {name:<8} -"
        return f"  {name:<8} mean {d['mean']:10.2f}  median {d['median']:10.2f}  p90 {d['p90']:10.2f}  p99 {d['p99']:10.2f}"

    lines = [
        f"kvsim replay: {s['model']} on {s['hardware']} x{s['gpus']}  method {s['method']}  cost model: {s['cost_model']}",
        f"  requests {s['num_requests']}: completed {s['completed']}, rejected {s['rejected']}"
        + (f" {json.dumps(s['rejected_reasons'])}" if s['rejected'] else ""),
        f"  duration {s['duration_s']:.2f} s   request_throughput {s['request_throughput']:.3f} req/s   "
        f"output_throughput {s['output_throughput']:.1f} tok/s   total_token_throughput {s['total_token_throughput']:.1f} tok/s",
        pct("ttft_ms"), pct("tpot_ms"), pct("itl_ms"), pct("e2el_ms"),
        f"  goodput {s['goodput']:.3f} req/s ({100 * s['goodput_fraction']:.1f}% of completed)  SLO {s['slo'] or 'none'}",
        f"  KV: {s['kv_blocks_per_replica']} blocks/replica ({s['kv_tokens_per_replica']} tokens), "
        f"{s['kv_bytes_per_token']:.0f} B/token, peak used {s['peak_kv_blocks_used']}; KV bytes saved vs the full cache: "
        + _pct(s['kv_bytes_saved_fraction']) + " time-averaged, " + _pct(s['kv_bytes_saved_fraction_peak']) + " at peak",
        f"  batch: peak {s['peak_batch_size']}, mean {s['mean_batch_size']:.1f}; preemptions {s['num_preemptions']}"
        + (f"; prefix hit rate {100 * s['prefix_cache_hit_rate']:.1f}%" if s.get('prefix_cache_hit_rate') is not None else ""),
        f"  output length: {100 * s['mean_output_length_change']:+.1f}% vs trace, {s['output_length_source_kind']} "
        f"({_short(s['output_length_source'])}); {s['num_output_length_capped']} cut at max_tokens / max_model_len",
        f"  simulated {s['sim']['engine_steps']} steps in {s['sim']['wall_s']:.2f} s wall",
    ]
    return "\n".join(lines)
