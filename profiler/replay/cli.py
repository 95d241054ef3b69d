"""``kvprof replay TRACE --model M --method X --out DIR``: serve a trace on a real engine, write a measured case.

What it validates: the engine is scheduled by kvsim's own scheduler and KV-cache manager (the same
Python objects), so a case checks kvsim's *cost model* (step times of real batches on a real GPU) and
the memory model, not the scheduling policy; the scheduler is checked against vLLM's own runs
(``shared/validation``). It needs a CUDA GPU for the full-size models: the weights alone of an 8B model
are 16 GB in bf16 (32 GB in the CPU's float32); on a CPU use ``--tiny`` (a 2-layer model for tests).

DIR gets the measured-case format of ``shared/validation`` (so ``kvsim validate DIR`` replays it):
``run.yaml`` (vLLM option names + descriptive keys), ``workload.jsonl`` (the requests served, kvsim
trace format), ``measured.csv``, ``steps.csv``; plus ``requests.csv`` in kvsim's own schema,
``summary.json`` and, for a config that is not a shipped kvsim model (``--tiny``), ``model_config.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path

ENGINE_FLAGS = [
    ("max_num_seqs", int, "most sequences in one step (default: vLLM V1's, by GPU memory: 1024 on >= 70 GiB, else 256)"),
    ("max_num_batched_tokens", int, "token budget per step (default: vLLM V1's: 8192 on >= 70 GiB, else 2048)"),
    ("max_model_len", int, "context limit (default: the model's max_position_embeddings)"),
    ("block_size", int, "tokens per KV block (default 16)"),
    ("gpu_memory_utilization", float, "fraction of GPU memory the engine may use (default 0.9)"),
    ("num_gpu_blocks_override", int, "pin the KV block count (default: measured from free memory, as vLLM)"),
    ("seed", int, "seed of the random weights and prompt token ids (default 0)"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvprof replay",
        description="Serve a trace's requests on a real engine (random-weight Llama, paged KV cache, kvsim's "
                    "scheduler) and record every request and step as a measured validation case for `kvsim "
                    "validate`. kvsim's scheduler drives it, so a case checks kvsim's cost and memory model (real "
                    "step times of the batches kvsim schedules), not the scheduler. Needs a CUDA GPU for full-size "
                    "models (an 8B model's weights are 16 GB in bf16, 32 GB in float32 on a CPU); --tiny runs on a CPU.")
    p.add_argument("trace", help="trace file (kvsim JSONL, Azure CSV or Mooncake JSONL)")
    p.add_argument("--out", required=True, help="output directory (the case folder)")
    p.add_argument("--model", default="llama-3.1-8b", help="kvsim short name or path to a config.json (dense Llama-architecture)")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama (2 layers, hidden 128) for CPU tests; overrides --model")
    p.add_argument("--method", default="none", help="compression method spec, e.g. h2o:budget=256,window=32 (kvsim syntax)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--format", dest="fmt", default=None, help="trace format (default: detected)")
    p.add_argument("--limit", type=int, default=None, help="serve only the first N requests")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate (divide arrival times)")
    g = p.add_argument_group("engine options (vLLM names)")
    for name, typ, text in ENGINE_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)
    g.add_argument("--enable-chunked-prefill", dest="enable_chunked_prefill", action="store_true", default=True,
                   help="chunked prefill (default on)")
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 (fp8 = --method fp8)")
    g.add_argument("--scheduler", choices=["chunked", "prefill-first"], default="chunked",
                   help="kvsim's scheduler: chunked = vLLM V1 (default), prefill-first = vLLM V0")
    x = p.add_argument_group("replay engine")
    x.add_argument("--attention-backend", choices=["auto", "ops", "varlen"], default="auto",
                   help="ops: the kvprof kernels (gather + SDPA / eager); varlen: one FlashAttention varlen call per "
                        "step for the bf16/fp8 paged methods (CUDA); auto: varlen on CUDA when it passes a self-check")
    x.add_argument("--max-attn-tokens", type=int, default=None,
                   help="most cached tokens one attention call gathers (default 65536)")
    x.add_argument("--cpu-kv-gib", type=float, default=0.25, help="KV memory on CPU when no --num-gpu-blocks-override")
    x.add_argument("--case-id", default=None, help="case_id written to run.yaml (default: the folder name)")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _engine_config(args, spec, device_memory: int):
    from kvsim.config import EngineConfig

    max_len = args.max_model_len or spec.max_position_embeddings
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
        block_size=args.block_size or 16,
        gpu_memory_utilization=args.gpu_memory_utilization if args.gpu_memory_utilization is not None else 0.9,
        kv_cache_dtype=args.kv_cache_dtype, enable_chunked_prefill=args.enable_chunked_prefill,
        enable_prefix_caching=False, num_gpu_blocks_override=args.num_gpu_blocks_override,
        seed=args.seed or 0, scheduler=args.scheduler).validate("command line")
    cfg = cfg.resolved(device_memory)
    if cfg.max_num_batched_tokens is None:  # no chunked prefill: vLLM uses max(max_model_len, 2048)
        cfg = dataclasses.replace(cfg, max_num_batched_tokens=max(cfg.max_model_len, 2048))
    return cfg


def available_cpu_bytes() -> int | None:
    """Memory a new allocation can get without swapping (Linux MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(spec, device, device_memory: int, args, explicit_device: bool = False) -> None:
    """Refuse, before anything is allocated, a run whose weights cannot fit where they would go, saying what
    it needs (the random-weight model is built in full before the first step)."""
    from kvsim.errors import KvsimError

    weights = spec.weight_bytes()
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    if device.type == "cuda":
        if weights > 0.95 * device_memory:
            raise KvsimError(f"{spec.name} in {spec.dtype} needs {gb(weights)} for its weights alone; this GPU has "
                             f"{gb(device_memory)}. Use a bigger GPU, a smaller --model, or --tiny")
        return
    kv = int(args.cpu_kv_gib * 2**30) if args.num_gpu_blocks_override is None else 0
    need = weights + kv
    avail = available_cpu_bytes()
    where = ("on the CPU (--device cpu)" if explicit_device else
             "on the CPU: no CUDA device was found, and kvprof replay measures a GPU")
    if avail is not None and need > 0.8 * avail:
        raise KvsimError(
            f"{spec.name} {where} needs {gb(weights)} for its {spec.dtype} weights + {gb(kv)} of KV cache, and this "
            f"machine has {gb(avail)} available. Run it on a CUDA GPU (--device cuda), or use --tiny (a 2-layer "
            "model for CPU tests) or a small --model config")
    if not explicit_device and not args.tiny:
        print(f"kvprof replay: no CUDA device: running {spec.name} {where}; the case measures this CPU "
              f"({gb(need)} of memory)", file=sys.stderr)


def load_requests(trace, fmt=None, rate_scale=1.0, limit=None):
    from kvsim.api import open_trace
    from kvsim.workload.request import InvalidRecord

    reqs = []
    for r in open_trace(trace, fmt, skip_invalid=False, rate_scale=rate_scale, limit=limit):
        if isinstance(r, InvalidRecord):
            continue
        reqs.append(r)
    return reqs


def profile_kv_bytes(model, cfg, method, max_context: int, store_cls, dtype_bytes: int, max_attn_tokens: int) -> dict:
    """vLLM's way: after the weights are in, run the largest step the engine can face (``max_num_batched_tokens``
    prompt tokens; for an eager-prefill method over the longest context of the trace) and keep what the
    peak leaves: ``KV bytes = utilization x total - peak allocated - memory outside torch - fixed arenas -
    headroom for the transient gathers``."""
    import torch

    from profiler.kernels import ops
    from profiler.replay.kvstore import TRANSIENT_BYTES_PER_ELEM

    mc = model.cfg
    dev = model.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(dev))
    torch.cuda.reset_peak_memory_stats(dev)
    q = max(1, min(cfg.max_num_batched_tokens, max_context))
    eager = method.prefill_attention == "eager"
    kv_len = max(q, max_context) if eager else q
    past = kv_len - q
    pk = torch.zeros(1, mc.num_kv_heads, past, mc.head_dim, dtype=model.dtype, device=dev) if past else None

    def attend(li, qq, k, v):
        kk, vv = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if pk is not None:
            kk, vv = torch.cat((pk, kk), dim=2), torch.cat((pk, vv), dim=2)
        qq = qq.transpose(0, 1)[None]
        if eager:
            o, _ = ops.eager_attention(qq, kk, vv, ops.causal_mask(qq.shape[2], kk.shape[2], dev))
        else:
            o = ops.sdpa_prefill(qq, kk, vv)
        return o[0].transpose(0, 1)

    tokens = torch.randint(mc.vocab_size, (q,), device=dev)
    rows = torch.arange(min(q, cfg.max_num_seqs), device=dev) % q
    model.forward(tokens, torch.arange(q, device=dev), attend, rows)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del pk
    torch.cuda.empty_cache()
    fixed = store_cls.fixed_bytes(mc, method, dtype_bytes, cfg.max_num_seqs)
    headroom = max_attn_tokens * mc.num_kv_heads * mc.head_dim * TRANSIENT_BYTES_PER_ELEM
    kv = int(cfg.gpu_memory_utilization * total - peak - non_torch - fixed - headroom)
    return {"total_bytes": int(total), "peak_bytes": int(peak), "non_torch_bytes": int(non_torch),
            "fixed_bytes": int(fixed), "headroom_bytes": int(headroom), "kv_bytes": kv,
            "profile_tokens": q, "profile_kv_len": kv_len}


def varlen_selfcheck(device, dtype, block_size: int) -> dict:
    """Whether ``torch.nn.attention.varlen.varlen_attn`` runs here and matches SDPA, over packed K/V
    (``gather``) and over a paged pool through a block table of ``block_size`` pages (``paged``).
    Each value is None when it works, else the reason."""
    import torch

    from profiler.kernels import ops

    res = {}
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
        return {"gather": why, "paged": why}
    g = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d = 8, 2, 64
    qlens, klens = [5, 1, 1], [9, 17, 4]
    q = torch.randn(sum(qlens), hq, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(sum(klens), hkv, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(sum(klens), hkv, d, device=device, dtype=dtype, generator=g)
    cq = torch.tensor([0, 5, 6, 7], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 9, 26, 30], dtype=torch.int32, device=device)

    def compare(out):
        for i in range(3):
            qq = q[cq[i]:cq[i + 1]].transpose(0, 1)[None].float()
            kk = k[ck[i]:ck[i + 1]].transpose(0, 1)[None].float()
            vv = v[ck[i]:ck[i + 1]].transpose(0, 1)[None].float()
            ref = ops.sdpa_prefill(qq, kk, vv)[0].transpose(0, 1)
            err = (out[cq[i]:cq[i + 1]].float() - ref).abs().max().item()
            if not err < 2e-2:
                return f"differs from SDPA by {err:.3g}"
        return None

    try:
        res["gather"] = compare(varlen_attn(q, k, v, cq, ck, max(qlens), max(klens), window_size=(-1, 0),
                                            enable_gqa=True))
    except Exception as e:  # noqa: BLE001 - any failure means: use the ops kernels
        res["gather"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        bs = block_size
        nper = [-(-n // bs) for n in klens]
        perm = torch.randperm(sum(nper) + 3, generator=torch.Generator().manual_seed(1)).tolist()
        kpool = torch.zeros(len(perm), bs, hkv, d, device=device, dtype=dtype)
        vpool = torch.zeros_like(kpool)
        table = torch.zeros(3, max(nper), dtype=torch.int32, device=device)
        at = 0
        for i, n in enumerate(klens):
            for j in range(nper[i]):
                page = perm[at]
                at += 1
                table[i, j] = page
                lo, hi = int(ck[i]) + j * bs, min(int(ck[i]) + n, int(ck[i]) + (j + 1) * bs)
                kpool[page, :hi - lo], vpool[page, :hi - lo] = k[lo:hi], v[lo:hi]
        used = torch.tensor(klens, dtype=torch.int32, device=device)
        res["paged"] = compare(varlen_attn(q, kpool, vpool, cq, ck, max(qlens), max(klens), window_size=(-1, 0),
                                           enable_gqa=True, seqused_k=used, block_table=table))
    except Exception as e:  # noqa: BLE001
        res["paged"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch
    except ImportError:
        print("kvprof replay needs torch (pip install torch)", file=sys.stderr)
        return 2
    from kvsim.api import resolve_method
    from kvsim.errors import KvsimError
    from profiler.replay.engine import ReplayEngine
    from profiler.methods import parse as parse_for, support
    from profiler.replay.kvstore import DEFAULT_MAX_ATTN_TOKENS, PagedStore
    from profiler.replay.model import Llama, load_config

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise KvsimError("--device cuda but no CUDA device is available")
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "float32": torch.float32}[args.dtype]
        dname = str(dtype).removeprefix("torch.")
        mcfg, spec = load_config(args.model, args.tiny)
        spec = dataclasses.replace(spec, dtype=dname)
        dev_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        check_memory(spec, device, dev_mem, args, explicit_device=args.device is not None)
        cfg = _engine_config(args, spec, dev_mem)
        method = parse_for(resolve_method(args.method, cfg), "replay", named_impl="impl=" in (args.method or ""))
        store_cls = support(method.name, "replay").store
        reqs = load_requests(args.trace, args.fmt, args.rate_scale, args.limit)
        if not reqs:
            raise KvsimError(f"{args.trace}: no requests to serve")
    except (KvsimError, ValueError, FileNotFoundError) as e:
        print(f"kvprof replay: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = args.attention_backend
    backend_note = None
    varlen_paged = False
    if backend in ("auto", "varlen"):
        if not issubclass(store_cls, PagedStore):
            why = {"gather": f"method {method.name} has its own attention kernels"}
        elif device.type != "cuda":
            why = {"gather": "not CUDA"}
        else:
            why = varlen_selfcheck(device, dtype, cfg.block_size)
        if why.get("gather") is None:
            backend = "varlen"
            varlen_paged = why.get("paged") is None and not store_cls.fp8
            backend_note = ("paged (block table)" if varlen_paged
                            else f"gathered K/V (paged mode: {why.get('paged') or 'fp8 is dequantized first'})")
        elif args.attention_backend == "varlen":
            print(f"kvprof replay: --attention-backend varlen unavailable: {why['gather']}", file=sys.stderr)
            return 2
        else:
            backend, backend_note = "ops", why["gather"]
    max_attn = args.max_attn_tokens or DEFAULT_MAX_ATTN_TOKENS

    torch.manual_seed(cfg.seed)
    model = Llama(mcfg, device, dtype, seed=cfg.seed)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    bpt = store_cls.bytes_per_token(mcfg, method, dtype_bytes)
    memory = {"bytes_per_token": bpt, "weight_bytes": model.weight_bytes}
    if cfg.num_gpu_blocks_override is not None:
        num_blocks = cfg.num_gpu_blocks_override
    elif device.type == "cuda":
        max_ctx = min(cfg.max_model_len, max(r.prompt_tokens + r.output_tokens for r in reqs))
        memory.update(profile_kv_bytes(model, cfg, method, max_ctx, store_cls, dtype_bytes, max_attn))
        num_blocks = int(memory["kv_bytes"] // (cfg.block_size * bpt))
    else:
        memory["kv_bytes"] = int(args.cpu_kv_gib * 2**30)
        num_blocks = int(memory["kv_bytes"] // (cfg.block_size * bpt))
    if num_blocks < 1:
        print(f"kvprof replay: no memory left for the KV cache ({memory})", file=sys.stderr)
        return 2
    store = store_cls(mcfg, method, num_blocks, cfg.block_size, device, dtype, cfg.max_num_seqs, backend, max_attn)
    if backend == "varlen":
        store.varlen_paged = varlen_paged

    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(reqs), unit="req", desc=f"replay {method.spec_string()}", dynamic_ncols=True)
    req_path = out / "requests.csv"
    with open(req_path, "w", newline="") as f:
        eng = ReplayEngine(model, spec, method, cfg, num_blocks, store, seed=cfg.seed, requests_out=f, progress=progress)
        eng.warmup()
        started = _dt.datetime.now(_dt.timezone.utc)
        wall = eng.run(reqs)
    if progress is not None:
        progress.close()
    meta = {
        "case_id": args.case_id or out.name,
        "model": (args.model if not args.tiny else None), "method": method.spec_string(), "cfg": cfg,
        "num_blocks": num_blocks, "device": device, "dtype": dname, "backend": backend, "backend_note": backend_note,
        "memory": memory, "started": started, "wall_s": wall, "rate_scale": args.rate_scale, "trace": args.trace,
        "limit": args.limit, "argv": argv if argv is not None else sys.argv[1:], "max_attn_tokens": max_attn,
    }
    summary = write_case(out, eng, mcfg, spec, meta, tiny=args.tiny)
    print(json.dumps({k: summary[k] for k in ("requests_completed", "requests_rejected", "engine_steps",
                                              "num_preemptions", "busy_s", "wall_s", "ttft_ms_mean", "tpot_ms_mean",
                                              "e2el_ms_mean", "num_gpu_blocks", "attention_backend")}, indent=1))
    print(f"case written to {out}/ (run.yaml measured.csv steps.csv workload.jsonl requests.csv summary.json)")
    return 0


# ------------------------------------------------------------------------------------------------
# outputs
def _f(x, nd=6):
    return "" if x is None else f"{x:.{nd}f}"


def write_case(out: Path, eng, mcfg, spec, meta: dict, tiny: bool = False) -> dict:
    """Write the measured case from a finished engine run; returns the summary dict."""
    import torch
    import yaml

    from kvsim.workload.readers import write_trace
    from kvsim.workload.request import Request
    from profiler.replay.engine import STEP_COLUMNS

    rows = {r["request_id"]: r for r in eng.rec.rows if r["status"] == "completed"}
    infos = sorted(eng.info.values(), key=lambda i: i.index)
    served = [i for i in infos if i.request.request_id in rows]
    arrivals = [i.arrival_s for i in infos if i.arrival_s is not None]
    t0 = min(arrivals) if arrivals else 0.0
    i0 = min((i.intended_s for i in served), default=0.0)
    # workload.jsonl: the requests served, intended (trace) arrival times, shifted so the first is 0
    write_trace([Request(i.request.request_id, i.intended_s - i0, i.request.prompt_tokens, i.request.output_tokens)
                 for i in served], out / "workload.jsonl")
    with open(out / "measured.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["request_id", "arrival_time_s", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2el_ms",
                    "queue_ms"])
        for i in served:
            r = rows[i.request.request_id]
            w.writerow([i.request.request_id, _f(i.arrival_s - t0), r["prompt_tokens"], r["output_tokens"],
                        _f(r["ttft_ms"], 4), _f(r["tpot_ms"], 4) if r["output_tokens"] > 1 else "", _f(r["e2el_ms"], 4),
                        _f((i.first_scheduled_s - i.arrival_s) * 1e3, 4)])
    with open(out / "steps.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(STEP_COLUMNS)
        for s in eng.steps:
            w.writerow([s.step, 0, _f(s.start_s - t0), _f(s.end_s - t0), _f((s.end_s - s.start_s) * 1e3, 4),
                        sum(c[0] for c in s.prefill_chunks), len(s.prefill_chunks), s.num_decode_seqs,
                        s.decode_kv_tokens, ";".join(f"{a}:{b}:{int(c)}" for a, b, c in s.prefill_chunks),
                        s.num_preempted, _f(s.forward_ms, 4), s.num_running, s.num_waiting, s.kv_blocks_used,
                        s.decode_max_kv_tokens])
    cfg = meta["cfg"]
    device = meta["device"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"sku": props.name, "memory_gb": round(props.total_memory / 1e9, 2)}
    else:
        gpu = {"sku": f"cpu ({platform.processor() or platform.machine()})", "memory_gb": None}
    model_value = meta["model"]
    if tiny or model_value is None:
        (out / "model_config.json").write_text(json.dumps(mcfg.raw, indent=2) + "\n")
        # relative to run.yaml (kvsim validate resolves it there), so the case folder can move
        model_value = "model_config.json"
    run = {
        "case_id": meta["case_id"],
        "engine": "kvprof-replay",
        "engine_version": _version(),
        "model": model_value,
        "method": meta["method"],
        "tensor_parallel_size": 1,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_model_len": cfg.max_model_len,
        "block_size": cfg.block_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "dtype": meta["dtype"],
        "kv_cache_dtype": "fp8" if meta["method"].partition(":")[0] == "fp8" else "auto",
        "enable_chunked_prefill": cfg.enable_chunked_prefill,
        "enable_prefix_caching": False,
        "enforce_eager": True,
        "seed": cfg.seed,
        "scheduler": cfg.scheduler,
        "num_gpu_blocks": meta["num_blocks"],
        "gpu": gpu,
        "num_gpus": 1 if device.type == "cuda" else 0,
        "workload": "workload.jsonl",
        "source": {
            "tool": "kvprof replay",
            "command": "kvprof replay " + " ".join(shlex.quote(a) for a in meta["argv"]),
            "date": meta["started"].isoformat(timespec="seconds"),
            "trace": str(meta["trace"]),
            "rate_scale": meta["rate_scale"],
            "limit": meta["limit"],
            "device": str(device),
            "torch": str(torch.__version__),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "attention_backend": meta["backend"],
            "attention_backend_note": meta["backend_note"],
            "max_attn_tokens": meta["max_attn_tokens"],
            "weights": "random normal(0, 0.02), norms 1 (step time does not depend on weight values)",
            "output_lengths": "pinned: every request generates exactly its trace output_tokens (greedy, no EOS)",
        },
        "notes": ("kvprof replay: eager PyTorch, no CUDA graphs, no prefix caching; request arrival_time_s is the "
                  "realised enqueue time (between steps), as vLLM's queued_ts"),
    }
    text = "# written by kvprof replay; keys are vLLM engine-argument names plus descriptive keys\n"
    (out / "run.yaml").write_text(text + yaml.safe_dump(run, sort_keys=False, default_flow_style=False))
    busy = sum(s.end_s - s.start_s for s in eng.steps)
    comp = [rows[i.request.request_id] for i in served]

    def mean(k):
        v = [r[k] for r in comp if r[k] is not None and not (k == "tpot_ms" and r["output_tokens"] < 2)]
        return sum(v) / len(v) if v else None

    summary = {
        "requests_total": len(infos), "requests_completed": len(comp),
        "requests_rejected": sum(1 for i in infos if i.rejected),
        "engine_steps": len(eng.steps), "num_preemptions": eng.sched.num_preemptions,
        "busy_s": busy, "wall_s": meta["wall_s"],
        "sum_forward_s": sum(s.forward_ms for s in eng.steps) / 1e3,
        "ttft_ms_mean": mean("ttft_ms"), "tpot_ms_mean": mean("tpot_ms"), "e2el_ms_mean": mean("e2el_ms"),
        "output_tokens": sum(r["output_tokens"] for r in comp), "prompt_tokens": sum(r["prompt_tokens"] for r in comp),
        "num_gpu_blocks": meta["num_blocks"], "peak_kv_blocks_used": max((s.kv_blocks_used for s in eng.steps), default=0),
        "attention_backend": meta["backend"], "memory": meta["memory"], "model_spec": dataclasses.asdict(spec),
    }
    last = max((r["finish_time_s"] for r in comp), default=None)
    summary["request_throughput"] = len(comp) / (last - t0) if comp and last > t0 else None
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"kvsim {version('kvsim')}"
    except Exception:  # noqa: BLE001
        return "kvsim (not installed)"


if __name__ == "__main__":
    sys.exit(main())
