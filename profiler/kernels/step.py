"""``kvprof step``: time whole decode steps of a model, eagerly and replayed from a CUDA graph.

The kernel grid times each operator on its own; a serving engine runs them back to back, and vLLM
captures decode steps in CUDA graphs, so the launch gaps an eager stack pays between kernels vanish.
This measures that difference directly: one decode step of the whole model (every layer's RMSNorm,
QKV, rotary, the new token's K/V written into the cache, SDPA over the cache, O, MLP, and the LM
head) for ``batch_size`` sequences at ``kv_tokens`` of context, timed with CUDA events after warm-up,
eagerly and as a graph replay. Weights are random (time does not depend on their values) and
distinct per layer, so the weight traffic is real. Contiguous caches (no paging): this is the launch
and fusion question, not the paging one.

Each point is one JSON line in ``DIR/step.jsonl`` after a header line, flushed at once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

BATCH_SIZES = (1, 4, 16, 32, 64, 128, 256)
KV_TOKENS = (512, 2048)


class DecodeModel:
    """A Llama-shaped decoder with random weights and preallocated contiguous caches for one
    ``(batch_size, kv_tokens)`` point; ``step()`` is one decode step, shape-static so it can be captured."""

    def __init__(self, model, batch_size: int, kv_tokens: int, device: str, dtype, weights: list):
        import torch

        from profiler.kernels import ops

        self.torch, self.ops = torch, ops
        self.m, self.B, self.L = model, batch_size, kv_tokens
        self.hq, self.hkv, self.d = model.num_attention_heads, model.num_kv_heads, model.head_dim
        self.w = weights
        shape = (batch_size, self.hkv, kv_tokens + 1, self.d)
        # one random block repeated: generating tens of GB of normals would cost more than the point
        self.k = [_filled(torch, shape, device, dtype) for _ in range(model.num_layers)]
        self.v = [_filled(torch, shape, device, dtype) for _ in range(model.num_layers)]
        self.x = torch.randn(batch_size, model.hidden_size, device=device, dtype=dtype)
        pos = torch.full((batch_size,), kv_tokens, device=device)
        self.cos, self.sin = ops.rope_cos_sin(pos, self.d, dtype=dtype)
        self.slot = torch.tensor([kv_tokens], device=device)
        self.out = None

    def step(self):
        torch, ops, F = self.torch, self.ops, self.torch.nn.functional
        B, hq, hkv, d = self.B, self.hq, self.hkv, self.d
        h = self.x
        for i, (n1, wqkv, wo, n2, wgu, wd) in enumerate(self.w["layers"]):
            a = ops.rms_norm(h, n1)
            qkv = ops.linear(a, wqkv)
            q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
            q = ops.rotary(q.view(B, hq, d), self.cos, self.sin)
            k = ops.rotary(k.view(B, hkv, d), self.cos, self.sin)
            self.k[i].index_copy_(2, self.slot, k.unsqueeze(2))
            self.v[i].index_copy_(2, self.slot, v.view(B, hkv, 1, d))
            att = F.scaled_dot_product_attention(q.unsqueeze(2), self.k[i], self.v[i], enable_gqa=hq != hkv)
            h = h + ops.linear(att.reshape(B, hq * d), wo)
            h = h + ops.mlp(ops.rms_norm(h, n2), wgu, wd)
        self.out = ops.linear(ops.rms_norm(h, self.w["norm"]), self.w["lm_head"])
        return self.out


def _filled(torch, shape, device, dtype, tile: int = 2**24):
    n = math.prod(shape)
    block = torch.randn(min(n, tile), device=device, dtype=dtype)
    return block.repeat(-(-n // block.numel()))[:n].view(*shape).contiguous()


def make_weights(model, device, dtype) -> dict:
    import torch

    H, hq, hkv, d, inter = (model.hidden_size, model.num_attention_heads, model.num_kv_heads, model.head_dim,
                            model.intermediate_size)

    def w(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).mul_(1.0 / math.sqrt(shape[-1]))

    layers = [(torch.ones(H, device=device, dtype=dtype), w((hq + 2 * hkv) * d, H), w(H, hq * d),
               torch.ones(H, device=device, dtype=dtype), w(2 * inter, H), w(H, inter))
              for _ in range(model.num_layers)]
    return {"layers": layers, "norm": torch.ones(H, device=device, dtype=dtype), "lm_head": w(model.vocab_size, H)}


def time_step(fn, reps: int, warmup: int = 3) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in ev]


def measure(model, batch_size: int, kv_tokens: int, weights, device: str, dtype, reps: int) -> dict:
    import torch

    rec = {"record": "point", "batch_size": batch_size, "kv_tokens": kv_tokens}
    dm = DecodeModel(model, batch_size, kv_tokens, device, dtype, weights)
    eager = time_step(dm.step, reps)
    # capture on a side stream after warm-up, as torch.cuda.graphs documents
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            dm.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dm.step()
    graph = time_step(g.replay, reps)
    rec.update(eager_median_s=statistics.median(eager), eager_min_s=min(eager),
               graph_median_s=statistics.median(graph), graph_min_s=min(graph), repeats=reps)
    del g, dm
    torch.cuda.empty_cache()
    return rec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="kvprof step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="shipped model name or a path to a HF config.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (step.jsonl)")
    p.add_argument("--batch-size", default=",".join(map(str, BATCH_SIZES)), help="comma-separated batch sizes")
    p.add_argument("--kv-tokens", default=",".join(map(str, KV_TOKENS)), help="comma-separated context lengths")
    p.add_argument("--max-kv-gib", type=float, default=96.0, help="skip points whose caches exceed this (GiB)")
    p.add_argument("--reps", type=int, default=20, help="timed steps per point and mode (median kept)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    from kvsim.errors import KvsimError
    from kvsim.specs.model import load_model

    try:  # bad input is reported before any device is needed
        model = load_model(args.model)
    except KvsimError as e:
        print(f"kvprof step: {e}", file=sys.stderr)
        return 2
    import torch

    from profiler.kernels.grid import _driver_version

    if not torch.cuda.is_available():
        print("kvprof step: needs a CUDA device (CUDA graphs)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    bs = [int(x) for x in args.batch_size.split(",")]
    kvs = [int(x) for x in args.kv_tokens.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "step.jsonl", "w") as f, torch.inference_mode():
        header = {"record": "header", "format": "kvprof-step", "format_version": 1,
                  "device": torch.cuda.get_device_name(args.device), "driver": _driver_version(),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                  "dtype": "bfloat16", "model": model.name, "tensor_parallel_size": 1, "kv_layout": "contiguous",
                  "attention": "torch SDPA", "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "command": "kvprof step " + shlex.join(argv)}
        f.write(json.dumps(header) + "\n")
        weights = make_weights(model, args.device, dtype)
        per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * 2
        for L in kvs:
            for B in bs:
                if B * (L + 1) * per_token > args.max_kv_gib * 2**30:
                    continue
                try:
                    rec = measure(model, B, L, weights, args.device, dtype, args.reps)
                except torch.OutOfMemoryError as e:
                    torch.cuda.empty_cache()
                    rec = {"record": "point", "batch_size": B, "kv_tokens": L, "oom": True, "error": str(e)[:200]}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(json.dumps(rec), flush=True)
    print(f"kvprof step: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
