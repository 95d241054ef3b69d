"""What a run that moves KV beyond the GPU reports: per-request columns (requests.csv) and the summary's
``kv_transfer`` (disaggregated prefill/decode) and ``kv_offload`` (CPU tier) blocks. A co-located run without a
CPU tier reports none of it, so its outputs are exactly those of the plain engine.

Per request (completed rows; empty where not applicable):

- ``kv_transfer_bytes``: bytes moved from the prefill to the decode instance;
- ``kv_transfer_time_s``: from the prompt being done on the prefill instance to its KV being usable on the decode
  instance (waiting for decode blocks, the link's queue, the wire and its latency; negative parts of a
  layer-wise push that overlapped the prefill step are not counted: it starts at the prompt's completion);
- ``kv_transfer_link_s``: the transfer itself, first byte to usable;
- ``kv_offload_bytes`` / ``kv_onload_bytes``: bytes this request's prompt blocks moved to / from the CPU tier;
- ``prefix_hit_tokens_cpu``: prompt tokens served from the CPU tier (``prefix_hit_tokens`` are the GPU's).
"""

from __future__ import annotations

import math

from kvsim.metrics.quantiles import Quantiles

TRANSFER_COLUMNS = ("kv_transfer_bytes", "kv_transfer_time_s", "kv_transfer_link_s", "kv_offload_bytes",
                    "kv_onload_bytes", "prefix_hit_tokens_cpu")


def transfer_values(seq) -> list:
    x = seq.xfer
    if x is None:
        head = [None, None, None]
    else:
        head = [x.bytes, max(0.0, x.ready_s - x.prefill_done_s), x.ready_s - x.start_s]
    return head + [seq.kv_offload_bytes, seq.kv_onload_bytes, seq.cpu_hit_tokens]


def _q(values, scale=1e3) -> dict:
    q = Quantiles()
    for v in values:
        q.add(v)
    return q.summary(scale)


def transfer_summary(spec, replicas, cluster, log, rec, span_s: float) -> dict:
    """The summary blocks (merged into summary.json by kvsim.api)."""
    out: dict = {}
    tr = spec.transfer
    if cluster is not None:
        xs = [x for x in cluster.transfers if not math.isnan(x.ready_s)]
        tp_p = cluster.prefill[0].tp
        tp_d = cluster.decode_tp
        full_bpt = spec.model.kv_bytes_per_token(tensor_parallel_size=tp_d) * tp_d
        out["gpus"] = len(cluster.prefill) * tp_p + len(cluster.decode) * tp_d
        out["num_replicas"] = len(cluster.prefill) + len(cluster.decode)
        sent = sum(x.bytes for x in xs)
        out["kv_transfer"] = {
            "num_prefill_instances": len(cluster.prefill),
            "prefill_tensor_parallel_size": tp_p,
            "num_decode_instances": len(cluster.decode),
            "decode_tensor_parallel_size": tp_d,
            "kv_transfer_link": cluster.link.name,
            "kv_transfer_mode": cluster.mode,
            "link_bandwidth_bytes_per_s_per_gpu": cluster.link.bandwidth_bytes_per_s,
            "link_latency_s": cluster.link.latency_s,
            "kv_blocks_per_prefill_instance": cluster.prefill[0].kv.num_blocks,
            "kv_blocks_per_decode_instance": cluster.decode[0].kv.num_blocks,
            "ttft_convention": "vLLM P/D: the first token is the decode instance's; TTFT includes the transfer",
            "transfers": len(xs),
            "bytes_sent": sent,
            "bytes_received": sum(x.received for x in xs),
            "bytes_per_request_mean": sent / len(xs) if xs else 0.0,
            # what the same prompts would have moved as the full (uncompressed) cache
            "bytes_full_cache": sum(x.decode_seq.prompt_tokens * full_bpt for x in xs),
            "transfer_time_ms": _q([max(0.0, x.ready_s - x.prefill_done_s) for x in xs]),
            "link_time_ms": _q([x.ready_s - x.start_s for x in xs]),
            "link_utilization": {g: log.utilization(g, span_s) for g in ("pd_send", "pd_recv")} if log else None,
        }
    if tr.offload:
        tiers = [a for r in replicas for a in r.agents if hasattr(a, "hit_tokens")]
        cpu = sum(t.hit_tokens for t in tiers)
        gpu = rec.prefix_hit_tokens
        t0 = tiers[0] if tiers else None
        out["kv_offload"] = {
            "kv_offloading_size": tr.kv_offloading_size,
            "kv_offload_link": t0.link.name if t0 else None,
            "cpu_blocks_per_instance": t0.num_blocks if t0 else 0,
            "block_bytes": t0.block_bytes if t0 else None,
            "prefix_sharing": bool(replicas[0].kv.prefix_sharing),
            "stored_blocks": sum(t.stored_blocks for t in tiers),
            "loaded_blocks": sum(t.loaded_blocks for t in tiers),
            "evicted_blocks": sum(t.evicted_blocks for t in tiers),
            "skipped_stores": sum(t.skipped_stores for t in tiers),
            "offloaded_bytes": sum(t.stored_bytes for t in tiers),
            "onloaded_bytes": sum(t.loaded_bytes for t in tiers),
            "prefix_hit_tokens_gpu": gpu,
            "prefix_hit_tokens_cpu": cpu,
            # the share of prefix hits served from the CPU tier (loads, not recomputes)
            "cpu_hit_share": cpu / (cpu + gpu) if cpu + gpu else None,
            "link_utilization": {g: log.utilization(g, span_s) for g in ("offload_d2h", "offload_h2d")} if log else None,
        }
    return out


__all__ = ["TRANSFER_COLUMNS", "transfer_values", "transfer_summary", "format_transfer"]


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.3f} GB"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_transfer(s: dict) -> str:
    """The lines ``kvsim replay`` prints under its summary for a P/D or CPU-tier run."""
    lines = []
    t = s.get("kv_transfer")
    if t:
        tt = t["transfer_time_ms"] or {}
        util = t.get("link_utilization") or {}
        lines.append(
            f"  P/D: {t['num_prefill_instances']} prefill x TP{t['prefill_tensor_parallel_size']} + "
            f"{t['num_decode_instances']} decode x TP{t['decode_tensor_parallel_size']} = {s['gpus']} GPUs, "
            f"link {t['kv_transfer_link']} ({t['kv_transfer_mode']}); {t['transfers']} transfers, {_gb(t['bytes_sent'])} "
            f"sent ({_gb(t['bytes_full_cache'])} as the full cache); transfer time p50 "
            f"{tt.get('median') or 0:.2f} ms, p99 {tt.get('p99') or 0:.2f} ms; send link busy {_pct(util.get('pd_send'))}")
    o = s.get("kv_offload")
    if o:
        util = o.get("link_utilization") or {}
        lines.append(
            f"  CPU tier: {o['kv_offloading_size']:g} GiB ({o['cpu_blocks_per_instance']} blocks/instance) over "
            f"{o['kv_offload_link']}; offloaded {_gb(o['offloaded_bytes'])}, loaded back {_gb(o['onloaded_bytes'])}; "
            f"prefix hits from the CPU tier {_pct(o['cpu_hit_share'])} ({o['prefix_hit_tokens_cpu']} of "
            f"{o['prefix_hit_tokens_cpu'] + o['prefix_hit_tokens_gpu']} tokens); evicted {o['evicted_blocks']} blocks"
            + ("" if o["prefix_sharing"] else " (this method shares no prefixes: the tier stays empty)"))
    return "\n".join(lines)
