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
    pool = replicas[0].kv.pool
    cost = replicas[0].cost
    summary = {
        "kvsim_version": __import__("kvsim").__version__,
        "model": model.name,
        "hardware": spec.hardware.name,
        "method": method.spec_string(),
        "cost_model": cost.name,
        "engine": {k: v for k, v in cfg.__dict__.items()},
        "seed": cfg.seed,
        "num_requests": rec.num_arrivals,
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
        "kv_blocks_per_replica": pool.num_blocks,
        "kv_tokens_per_replica": pool.num_blocks * cfg.block_size,
        "kv_bytes_per_token": bpt,
        "kv_bytes_per_token_full": full_bpt,
        "kv_bytes_saved_fraction": 1.0 - bpt / full_bpt,
        "peak_kv_blocks_used": rec.peak_kv_blocks,
        "peak_batch_size": rec.peak_batch_size,
        "mean_batch_size": rec.batch_size_sum / rec.num_steps if rec.num_steps else 0.0,
        "num_preemptions": sum(r.scheduler.num_preemptions for r in replicas),
        "prefix_cache_hit_rate": (rec.prefix_hit_tokens / rec.prefix_query_tokens) if rec.prefix_query_tokens else None,
        "output_length_source": lengths.source,
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


def _clean(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


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
        f"{s['kv_bytes_per_token']:.0f} B/token ({100 * s['kv_bytes_saved_fraction']:.1f}% saved), peak used {s['peak_kv_blocks_used']}",
        f"  batch: peak {s['peak_batch_size']}, mean {s['mean_batch_size']:.1f}; preemptions {s['num_preemptions']}"
        + (f"; prefix hit rate {100 * s['prefix_cache_hit_rate']:.1f}%" if s.get('prefix_cache_hit_rate') is not None else ""),
        f"  output length: {100 * s['mean_output_length_change']:+.1f}% vs trace ({s['output_length_source']})",
        f"  simulated {s['sim']['engine_steps']} steps in {s['sim']['wall_s']:.2f} s wall",
    ]
    return "\n".join(lines)
