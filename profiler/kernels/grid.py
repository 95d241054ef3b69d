"""The grid of points ``kvprof kernels`` measures, how each point is built and timed, and the
resumable runner that appends every finished point to ``DIR/raw.jsonl`` at once.

Timing (gpt-fast style): warm-up calls, then on CUDA one pair of CUDA events around each repeat
(``torch.cuda.synchronize()`` before and after), on CPU ``time.perf_counter_ns`` around each call;
the median of the repeats is recorded. Inputs are rotated: each point builds as many independent
input sets as it takes to exceed twice the last-level cache, and repeat i uses set i mod n, so no
repeat finds its operands already in cache.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kvsim.specs.model import ModelSpec
from profiler.kernels import (RAW_FORMAT, RAW_FORMAT_VERSION, RawError, append_record, point_key, raw_path,
                              read_raw)
from profiler.kernels import ops

# ================================================================================================
# methods and their knobs (names and defaults as kvsim.methods)
# ================================================================================================

METHOD_KNOBS: dict[str, dict[str, int]] = {
    "none": {},
    "fp8": {},
    "kivi": {"bits": 2, "group_size": 32, "residual_length": 128},
    "h2o": {"budget": 256, "window": 32},
    "streamingllm": {"sink": 4, "window": 252},
    "snapkv": {"budget": 256, "window": 32, "kernel_size": 7},
}
ALL_METHODS = ",".join(METHOD_KNOBS)
#: the kvsim implementation (``impl`` knob) whose algorithm these torch kernels compute: kvsim uses a
#: profile's method tables only for a method spec with the same implementation (kvsim.cost.profiled)
KERNEL_IMPLEMENTATIONS: dict[str, str | None] = {
    "none": None, "fp8": "native", "kivi": "reference", "h2o": "reference", "streamingllm": "sliding",
    "snapkv": "reference",
}
#: the methods whose prefill needs the score matrix (kvsim's Method.prefill_attention == "eager")
EAGER_PREFILL = ("h2o", "snapkv")


def parse_methods(text: str) -> dict[str, dict[str, int]]:
    """``none,kivi:bits=4,group_size=64,h2o`` -> {name: knobs with defaults filled}."""
    specs: list[str] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if "=" in tok and ":" not in tok and specs:
            specs[-1] += "," + tok
        else:
            specs.append(tok)
    out: dict[str, dict[str, int]] = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        name = name.strip()
        if name not in METHOD_KNOBS:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHOD_KNOBS)}")
        knobs = dict(METHOD_KNOBS[name])
        for part in filter(None, (p.strip() for p in rest.split(","))):
            k, eq, v = part.partition("=")
            if not eq or k.strip() not in knobs:
                raise ValueError(f"method {name}: bad knob {part!r}; knobs: {', '.join(knobs) or '(none)'}")
            try:
                knobs[k.strip()] = int(v)
            except ValueError:
                raise ValueError(f"method {name}: knob {k.strip()}={v!r} is not an integer") from None
        _check_knobs(name, knobs)
        out[name] = knobs
    if not out:
        raise ValueError("no methods given")
    return out


def _check_knobs(name: str, k: dict) -> None:
    def need(cond, why):
        if not cond:
            raise ValueError(f"method {name}: {why} (knobs {k})")

    if name == "kivi":
        need(k["bits"] in (2, 4, 8), "bits must be 2, 4 or 8")
        need(k["group_size"] > 0 and k["residual_length"] % k["group_size"] == 0,
             "residual_length must be a multiple of group_size")
    if name in ("h2o", "snapkv"):
        need(0 < k["window"] < k["budget"], "need 0 < window < budget")
    if name == "snapkv":
        need(k["kernel_size"] >= 1, "kernel_size must be >= 1")
    if name == "streamingllm":
        need(k["sink"] >= 0 and k["window"] > 0, "need sink >= 0 and window > 0")


# ================================================================================================
# grids
# ================================================================================================


def _pow2(lo: int, hi: int) -> list[int]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= 2
    return out


def _pow2_and_mid(lo: int, hi: int) -> list[int]:
    """Powers of two with the 1.5x midpoints: 1, 2, 3, 4, 6, 8, 12, ..."""
    out = []
    for p in _pow2(lo, hi):
        out.append(p)
        if p > 1 and p * 3 // 2 <= hi:
            out.append(p * 3 // 2)
    return sorted(set(out))


def _log_spaced(lo: int, hi: int, per_octave: int, multiple: int) -> list[int]:
    n = round(math.log2(hi / lo) * per_octave)
    return sorted({int(round(lo * 2 ** (i / per_octave) / multiple)) * multiple for i in range(n + 1)})


@dataclass(frozen=True)
class Grid:
    name: str
    num_tokens: tuple[int, ...]
    batch_size: tuple[int, ...]
    kv_tokens: tuple[int, ...]
    chunk_tokens: tuple[int, ...]
    #: kv_tokens of the prefill tables: the decode values plus short contexts, so that the diagonal
    #: kv == chunk (a whole short prompt in one chunk) is measured down to the smallest chunk
    prefill_kv_tokens: tuple[int, ...]
    #: decode points with batch_size * kv_tokens above this are not measured (more KV than any GPU holds)
    max_batch_kv_tokens: int
    warmup: int
    min_reps: int
    max_reps: int
    #: aim for this much timed work per point (repeats = target / first time, clamped)
    target_s: float
    #: at most this many rotated input sets per point
    max_rotation: int = 8
    block_size: int = 16


GRIDS = {
    # CUDA: batch 1..256 (powers of two and 1.5x midpoints), kv 128..32768 (sqrt(2) steps, multiples
    # of 16), chunk 16..8192 (powers of two), linear token counts 1..16384 (powers of two and midpoints).
    "full": Grid(
        "full",
        num_tokens=tuple(_pow2_and_mid(1, 16384)),
        batch_size=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256),
        kv_tokens=tuple(_log_spaced(128, 32768, 2, 16)),
        chunk_tokens=tuple(_pow2(16, 8192)),
        prefill_kv_tokens=(16, 32, 64) + tuple(_log_spaced(128, 32768, 2, 16)),
        max_batch_kv_tokens=2**21,
        warmup=3, min_reps=5, max_reps=50, target_s=0.05,
    ),
    # CPU / CI: a handful of points per table; the whole path in well under a minute on 2 cores.
    "tiny": Grid(
        "tiny",
        num_tokens=(1, 8, 64),
        batch_size=(1, 2, 4),
        kv_tokens=(128, 256, 512),
        chunk_tokens=(16, 64, 256),
        prefill_kv_tokens=(64, 128, 256, 512),
        max_batch_kv_tokens=2**11,
        warmup=0, min_reps=3, max_reps=5, target_s=0.005, max_rotation=2,
    ),
}


def plan(grid: Grid, model: ModelSpec, methods: dict, tables: list[str] | None = None) -> list[tuple[str, dict]]:
    """Every (table, axes) point, in measuring order (linear, prefill, decode; small to large)."""
    names = ["linear.qkv", "linear.o", "linear.moe" if model.is_moe else "linear.mlp", "linear.other", "linear.lm_head"]
    prefill = ["attention.prefill.flash"]
    if any(m in methods for m in EAGER_PREFILL):
        prefill.append("attention.prefill.eager")
    prefill += [f"extra.prefill.{m}" for m in methods if m != "none"]
    decode = [f"attention.decode.{m}" for m in methods]
    decode += [f"extra.decode.{m}" for m in methods if m not in ("none", "snapkv")]
    out: list[tuple[str, dict]] = []
    for t in names:
        out += [(t, {"num_tokens": n}) for n in grid.num_tokens]
    for t in prefill:
        out += [(t, {"chunk_tokens": c, "kv_tokens": kv}) for c in grid.chunk_tokens for kv in grid.prefill_kv_tokens if kv >= c]
    for t in decode:
        out += [(t, {"batch_size": b, "kv_tokens": kv}) for b in grid.batch_size for kv in grid.kv_tokens
                if b * kv <= grid.max_batch_kv_tokens]
    if tables:
        out = [p for p in out if any(p[0] == t or p[0].startswith(t.rstrip(".") + ".") for t in tables)]
    return out


# ================================================================================================
# building one point
# ================================================================================================


@dataclass(frozen=True)
class Shapes:
    """Per-GPU shapes of one layer under tensor parallelism."""

    hidden: int
    hq: int
    hkv: int
    d: int
    inter: int
    vocab: int
    experts: int
    top_k: int
    moe_inter: int
    shared: int

    @classmethod
    def of(cls, m: ModelSpec, tp: int = 1) -> "Shapes":
        return cls(hidden=m.hidden_size, hq=max(1, m.num_attention_heads // tp), hkv=max(1, m.num_kv_heads // tp),
                   d=m.head_dim, inter=max(1, m.intermediate_size // tp), vocab=-(-m.vocab_size // tp),
                   experts=m.num_experts, top_k=m.num_experts_per_tok, moe_inter=max(1, m.moe_intermediate_size // tp),
                   shared=m.num_shared_experts)


@dataclass
class Bench:
    fn: Callable
    #: make_args(r) -> one input set (r = rotation index; weights are cached per r across points)
    make_args: Callable[[int], tuple]
    #: the timed call does this many units of the table's work (e.g. KIVI: R decode steps)
    divisor: int = 1
    #: analytic FLOPs and bytes moved per unit of work (per call / divisor), for the --dry-run estimate only
    flops: float = 0.0
    bytes: float = 0.0


class Ctx:
    def __init__(self, model: ModelSpec, methods: dict, device: str, dtype: torch.dtype, tp: int, grid: Grid,
                 contiguous_decode: bool = False):
        self.model, self.methods, self.device, self.dtype, self.tp, self.grid = model, methods, device, dtype, tp, grid
        self.s = Shapes.of(model, tp)
        self.contiguous_decode = contiguous_decode
        self.esize = torch.empty((), dtype=dtype).element_size()
        self._cache: dict = {}
        self._cache_table = None

    #: tensors larger than this many elements repeat a random block of this size (generation at copy speed)
    TILE = 2**24

    def rnd(self, *shape, scale: float = 1.0, dtype=None):
        dtype = dtype or self.dtype
        n = math.prod(shape)
        if n <= self.TILE or self.device == "meta":
            x = torch.randn(*shape, device=self.device, dtype=dtype)
        else:
            block = torch.randn(self.TILE, device=self.device, dtype=dtype)
            x = block.repeat(-(-n // self.TILE))[:n].view(*shape)
        return x.mul_(scale) if scale != 1.0 and self.device != "meta" else x

    def weight(self, name: str, r: int, *shape):
        """A weight tensor (input scale 1/sqrt(fan_in)), kept across the points of one table."""
        key = (name, r, shape)
        if key not in self._cache:
            self._cache[key] = self.rnd(*shape, scale=1.0 / math.sqrt(shape[-1]))
        return self._cache[key]

    def start_table(self, table: str) -> None:
        if table != self._cache_table:
            self._cache.clear()
            self._cache_table = table

    def knobs(self, method: str) -> dict:
        return self.methods[method]


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(x) for x in obj)
    return 0


def _linear(table: str, T: int, c: Ctx) -> Bench:
    s, e = c.s, c.esize
    if table == "linear.qkv":
        n_out = (s.hq + 2 * s.hkv) * s.d
        return Bench(ops.linear, lambda r: (c.rnd(T, s.hidden), c.weight("w", r, n_out, s.hidden)),
                     flops=2.0 * T * s.hidden * n_out, bytes=e * (T * s.hidden + n_out * s.hidden + T * n_out))
    if table == "linear.o":
        return Bench(ops.linear, lambda r: (c.rnd(T, s.hq * s.d), c.weight("w", r, s.hidden, s.hq * s.d)),
                     flops=2.0 * T * s.hidden * s.hq * s.d, bytes=e * (s.hq * s.d * (T + s.hidden) + T * s.hidden))
    if table == "linear.mlp":
        return Bench(ops.mlp, lambda r: (c.rnd(T, s.hidden), c.weight("gu", r, 2 * s.inter, s.hidden),
                                         c.weight("d", r, s.hidden, s.inter)),
                     flops=6.0 * T * s.hidden * s.inter, bytes=e * (3 * s.hidden * s.inter + 2 * T * s.hidden + 4 * T * s.inter))
    if table == "linear.moe":
        k, sh = s.top_k, s.shared

        def args(r):
            return (c.rnd(T, s.hidden), c.weight("router", r, s.experts, s.hidden),
                    c.weight("gu", r, s.experts, 2 * s.moe_inter, s.hidden), c.weight("d", r, s.experts, s.hidden, s.moe_inter),
                    k, c.weight("sgu", r, 2 * s.moe_inter * sh, s.hidden) if sh else None,
                    c.weight("sd", r, s.hidden, s.moe_inter * sh) if sh else None)

        active = min(s.experts, T * k)
        return Bench(ops.moe, args, flops=6.0 * T * s.hidden * s.moe_inter * (k + sh) + 2.0 * T * s.hidden * s.experts,
                     bytes=e * 3 * s.hidden * s.moe_inter * (active + sh))
    if table == "linear.other":
        def args(r):
            cos, sin = ops.rope_cos_sin(torch.arange(T, device=c.device), s.d, dtype=c.dtype)
            return (c.rnd(T, s.hidden), c.rnd(T, s.hidden), c.rnd(T, s.hidden), c.weight("n1", r, s.hidden),
                    c.weight("n2", r, s.hidden), c.rnd(T, s.hq, s.d), c.rnd(T, s.hkv, s.d), cos, sin)

        return Bench(ops.layer_other, args, flops=20.0 * T * (s.hidden + (s.hq + s.hkv) * s.d),
                     bytes=e * T * (10 * s.hidden + 3 * (s.hq + s.hkv) * s.d))
    if table == "linear.lm_head":
        return Bench(ops.linear, lambda r: (c.rnd(T, s.hidden), c.weight("w", r, s.vocab, s.hidden)),
                     flops=2.0 * T * s.hidden * s.vocab, bytes=e * (s.vocab * s.hidden + T * (s.hidden + s.vocab)))
    raise KeyError(table)


def _prefill(table: str, C: int, KV: int, c: Ctx) -> Bench:
    s, e = c.s, c.esize
    pairs = C * KV - C * (C - 1) / 2.0
    attn_flops = 4.0 * s.hq * s.d * pairs
    qkv_bytes = e * s.d * (2 * C * s.hq + 2 * KV * s.hkv)

    def qkv(r):
        return c.rnd(1, s.hq, C, s.d), c.rnd(1, s.hkv, KV, s.d), c.rnd(1, s.hkv, KV, s.d)

    if table == "attention.prefill.flash":
        return Bench(ops.sdpa_prefill, qkv, flops=attn_flops, bytes=qkv_bytes)
    if table == "attention.prefill.eager":
        mask = ops.causal_mask(C, KV, c.device)
        return Bench(ops.eager_attention, lambda r: (*qkv(r), mask), flops=attn_flops,
                     bytes=qkv_bytes + 16.0 * s.hq * C * KV)
    method = table.rsplit(".", 1)[1]
    k = c.knobs(method)
    if method == "fp8":
        bs = c.grid.block_size
        nb = -(-KV // bs)

        def args(r):
            kc = torch.empty(nb, bs, s.hkv, s.d, device=c.device, dtype=ops.FP8)
            vc = torch.empty_like(kc)
            table_ = torch.randperm(nb, device=c.device)
            p = torch.arange(KV - C, KV, device=c.device)
            slots = table_[p // bs] * bs + p % bs
            one = torch.ones((), device=c.device)
            return kc, vc, c.rnd(C, s.hkv, s.d), c.rnd(C, s.hkv, s.d), slots, one, one

        return Bench(ops.fp8_write_paged, args, bytes=2.0 * C * s.hkv * s.d * (e + 1))
    if method == "kivi":
        g, bits = k["group_size"], k["bits"]
        n = -(-C // g) * g

        def quant(kk, vv):
            return ops.kivi_quantize_keys(kk, bits, g), ops.kivi_quantize_values(vv, bits, g)

        return Bench(quant, lambda r: (c.rnd(1, s.hkv, n, s.d), c.rnd(1, s.hkv, n, s.d)),
                     bytes=2.0 * n * s.hkv * s.d * (e + bits / 8))
    if method == "h2o":
        budget, window = k["budget"], k["window"]

        def h2o(probs, score, kk, vv):
            ops.h2o_accumulate(score, probs)
            if kk.shape[2] > budget:
                return ops.h2o_compress(kk, vv, score, budget, window)

        def args(r):
            probs = torch.rand(1, s.hq, C, KV, device=c.device, dtype=torch.float32)
            return probs, torch.zeros(1, s.hkv, KV, device=c.device), c.rnd(1, s.hkv, KV, s.d), c.rnd(1, s.hkv, KV, s.d)

        return Bench(h2o, args, bytes=4.0 * s.hq * C * KV + 2 * e * s.hkv * s.d * min(KV, budget))
    if method == "streamingllm":
        sink, window = k["sink"], k["window"]
        return Bench(lambda kk, vv: ops.streaming_compress(kk, vv, sink, window),
                     lambda r: (c.rnd(1, s.hkv, KV, s.d), c.rnd(1, s.hkv, KV, s.d)),
                     bytes=4.0 * e * s.hkv * s.d * min(KV, sink + window))
    if method == "snapkv":
        budget, window, ks = k["budget"], k["window"], k["kernel_size"]
        return Bench(lambda qw, kk, vv: ops.snapkv_compress(qw, kk, vv, budget, window, ks),
                     lambda r: (c.rnd(1, s.hq, window, s.d), c.rnd(1, s.hkv, KV, s.d), c.rnd(1, s.hkv, KV, s.d)),
                     flops=2.0 * s.hq * window * KV * s.d, bytes=e * s.hkv * s.d * KV + 12.0 * s.hq * window * KV)
    raise KeyError(table)


def _decode(table: str, B: int, KV: int, c: Ctx) -> Bench:
    s, e = c.s, c.esize
    kind, method = table.split(".")[0], table.rsplit(".", 1)[1]
    bs = c.grid.block_size
    kv_elems = B * KV * s.hkv * s.d
    attn_flops = 4.0 * B * s.hq * s.d * KV

    def q(r):
        return c.rnd(B, s.hq, 1, s.d)

    def paged(r, dtype=None):
        nb = -(-KV // bs)
        kc, vc = c.rnd(B * nb, bs, s.hkv, s.d), c.rnd(B * nb, bs, s.hkv, s.d)
        if dtype == ops.FP8:
            kc, vc = kc.to(ops.FP8), vc.to(ops.FP8)
        table_ = torch.randperm(B * nb, device=c.device).view(B, nb)
        lens = None if KV % bs == 0 else torch.full((B,), KV, device=c.device)
        return kc, vc, table_, lens

    def contiguous(r):
        return c.rnd(B, s.hkv, KV, s.d), c.rnd(B, s.hkv, KV, s.d)

    if kind == "attention":
        if method in ("none", "snapkv"):
            if c.contiguous_decode:
                return Bench(ops.decode_attention, lambda r: (q(r), *contiguous(r)), flops=attn_flops, bytes=2.0 * e * kv_elems)
            return Bench(ops.paged_decode_attention, lambda r: (q(r), *paged(r)), flops=attn_flops, bytes=6.0 * e * kv_elems)
        if method == "fp8":
            one = torch.ones((), device=c.device)
            if c.contiguous_decode:
                def f8(qq, kk, vv, ks, vs):
                    return ops.decode_attention(qq, ops.fp8_dequantize(kk, ks, qq.dtype), ops.fp8_dequantize(vv, vs, qq.dtype))

                return Bench(f8, lambda r: (q(r), *(x.to(ops.FP8) for x in contiguous(r)), one, one),
                             flops=attn_flops, bytes=(2.0 + 4.0 * e) * kv_elems)

            def args(r):
                kc, vc, table_, lens = paged(r, ops.FP8)
                return q(r), kc, vc, table_, one, one, lens

            return Bench(ops.paged_decode_attention_fp8, args, flops=attn_flops, bytes=(6.0 + 4.0 * e) * kv_elems)
        if method == "kivi":
            k = c.knobs("kivi")
            bits, g, R = k["bits"], k["group_size"], k["residual_length"]
            n_q = max(0, (KV - R // 2) // g * g)
            n_r = KV - n_q

            def args(r):
                kk, vv = c.rnd(B, s.hkv, n_q, s.d), c.rnd(B, s.hkv, n_q, s.d)
                kq, vq = ops.kivi_quantize_keys(kk, bits, g), ops.kivi_quantize_values(vv, bits, g)
                del kk, vv
                return (q(r), kq, vq, c.rnd(B, s.hkv, n_r, s.d), c.rnd(B, s.hkv, n_r, s.d))

            return Bench(lambda qq, kq, vq, kr, vr: ops.kivi_decode_attention(qq, kq, vq, kr, vr, bits, g), args,
                         flops=attn_flops, bytes=(2 * bits / 8 + 4.0 * e) * kv_elems)
        if method == "h2o":
            return Bench(ops.eager_attention, lambda r: (q(r), *contiguous(r)), flops=attn_flops,
                         bytes=2.0 * e * kv_elems + 12.0 * B * s.hq * KV)
        if method == "streamingllm":
            return Bench(ops.decode_attention, lambda r: (q(r), *contiguous(r)), flops=attn_flops, bytes=2.0 * e * kv_elems)
        raise KeyError(table)
    # extra.decode.<method>
    new_bytes = 2.0 * e * B * s.hkv * s.d
    if method == "fp8":
        def args(r):
            nslots = -(-B * KV // bs) * bs
            kc = torch.empty(nslots // bs, bs, s.hkv, s.d, device=c.device, dtype=ops.FP8)
            slots = torch.randperm(nslots, device=c.device)[:B]
            one = torch.ones((), device=c.device)
            return kc, torch.empty_like(kc), c.rnd(B, s.hkv, s.d), c.rnd(B, s.hkv, s.d), slots, one, one

        return Bench(ops.fp8_write_paged, args, bytes=new_bytes * 1.5)
    if method == "kivi":
        k = c.knobs("kivi")
        bits, g, R = k["bits"], k["group_size"], k["residual_length"]
        T = max(R, -(-KV // R) * R)
        offset = T - R

        def step(k_res, v_res, k_new, v_new, store_k, store_v):
            for i in range(R):
                k_res[:, :, i:i + 1].copy_(k_new)
                v_res[:, :, i:i + 1].copy_(v_new)
            ops.kivi_flush(k_res, v_res, store_k, store_v, offset, bits, g)

        def args(r):
            dev, dt = c.device, c.dtype
            store_k = (torch.empty(B, s.hkv, T, s.d * bits // 8, device=dev, dtype=torch.uint8),
                       torch.empty(B, s.hkv, T // g, 1, s.d, device=dev, dtype=dt),
                       torch.empty(B, s.hkv, T // g, 1, s.d, device=dev, dtype=dt))
            store_v = (torch.empty(B, s.hkv, T, s.d * bits // 8, device=dev, dtype=torch.uint8),
                       torch.empty(B, s.hkv, T, s.d // g, 1, device=dev, dtype=dt),
                       torch.empty(B, s.hkv, T, s.d // g, 1, device=dev, dtype=dt))
            return (c.rnd(B, s.hkv, R, s.d), c.rnd(B, s.hkv, R, s.d), c.rnd(B, s.hkv, 1, s.d), c.rnd(B, s.hkv, 1, s.d),
                    store_k, store_v)

        return Bench(step, args, divisor=R, bytes=new_bytes * (2 + bits / 8 / e))
    if method == "h2o":
        window = c.knobs("h2o")["window"]

        def args(r):
            kk, vv = contiguous(r)
            probs = torch.rand(B, s.hq, 1, KV, device=c.device, dtype=torch.float32)
            pos = torch.arange(KV, device=c.device).expand(B, s.hkv, KV).contiguous()
            return (kk, vv, torch.rand(B, s.hkv, KV, device=c.device), pos, probs,
                    c.rnd(B, s.hkv, 1, s.d), c.rnd(B, s.hkv, 1, s.d), KV, window)

        return Bench(ops.h2o_decode_update, args, bytes=4.0 * B * KV * (s.hq + 3 * s.hkv) + 8.0 * B * s.hkv * KV + new_bytes)
    if method == "streamingllm":
        sink = min(c.knobs("streamingllm")["sink"], KV - 1)

        def args(r):
            kk, vv = contiguous(r)
            t = torch.randint(KV, 10 * KV, (B,), device=c.device)
            return kk, vv, c.rnd(B, s.hkv, 1, s.d), c.rnd(B, s.hkv, 1, s.d), ops.streaming_slot(t, sink, KV - sink)

        return Bench(ops.streaming_write, args, bytes=2 * new_bytes)
    raise KeyError(table)


def build_bench(table: str, axes: dict, ctx: Ctx) -> Bench:
    """The kernel and its inputs for one grid point."""
    if table.startswith("linear."):
        return _linear(table, axes["num_tokens"], ctx)
    if table.startswith(("attention.prefill.", "extra.prefill.")):
        return _prefill(table, axes["chunk_tokens"], axes["kv_tokens"], ctx)
    if table.startswith(("attention.decode.", "extra.decode.")):
        return _decode(table, axes["batch_size"], axes["kv_tokens"], ctx)
    raise KeyError(f"no kernel for table {table!r}")


# ================================================================================================
# timing
# ================================================================================================


def last_level_cache_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    for idx in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size").read_text().strip()
            return int(text[:-1]) * (1024 if text.endswith("K") else 2**20) if text[-1] in "KM" else int(text)
        except (OSError, ValueError):
            continue
    return 32 * 2**20


def time_calls(fn, arg_sets: list, device: str, grid: Grid) -> list[float]:
    """Seconds per call: warm-up, one call that sizes the repeats (and warms up too), then ``reps`` timed
    calls rotating over the input sets."""
    n = len(arg_sets)
    cuda = device.startswith("cuda")
    for i in range(grid.warmup):
        fn(*arg_sets[i % n])
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*arg_sets[0])
        end.record()
        torch.cuda.synchronize()
        first = start.elapsed_time(end) * 1e-3
    else:
        t0 = time.perf_counter_ns()
        fn(*arg_sets[0])
        first = (time.perf_counter_ns() - t0) * 1e-9
    reps = max(grid.min_reps, min(grid.max_reps, math.ceil(grid.target_s / max(first, 1e-7))))
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize()
        for i in range(reps):
            args = arg_sets[(i + 1) % n]
            starts[i].record()
            fn(*args)
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    out = []
    for i in range(reps):
        args = arg_sets[(i + 1) % n]
        t0 = time.perf_counter_ns()
        fn(*args)
        out.append((time.perf_counter_ns() - t0) * 1e-9)
    return out


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "not enough memory" in msg
                                              or "can't allocate memory" in msg or "failed to allocate" in msg)


def measure_point(table: str, axes: dict, ctx: Ctx) -> dict:
    """Time one point; an out-of-memory point is recorded as ``{"oom": true}`` instead of raising."""
    rec: dict = {"record": "point", "table": table, "axes": dict(axes)}
    oom_msg = None
    try:
        ctx.start_table(table)
        bench = build_bench(table, axes, ctx)
        sets = [bench.make_args(0)]
        per_set = max(1, _nbytes(sets[0]))
        n_rot = max(1, min(ctx.grid.max_rotation, math.ceil(2 * last_level_cache_bytes(ctx.device) / per_set)))
        sets += [bench.make_args(r) for r in range(1, n_rot)]
        times = [t / bench.divisor for t in time_calls(bench.fn, sets, ctx.device, ctx.grid)]
        rec.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times), repeats=len(times),
                   rotation=n_rot, divisor=bench.divisor, oom=False)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(exc):
            raise
        oom_msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    finally:
        sets = bench = None  # noqa: F841 (free the inputs before the next point)
    if oom_msg is not None:
        ctx.start_table("")  # drop cached weights too
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
        rec.update(oom=True, error=oom_msg)
    return rec


# ================================================================================================
# header and runner
# ================================================================================================


def _driver_version() -> str | None:
    try:
        m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", Path("/proc/driver/nvidia/version").read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_header(ctx: Ctx, command: str) -> dict:
    cuda = ctx.device.startswith("cuda")
    return {
        "record": "header", "format": RAW_FORMAT, "format_version": RAW_FORMAT_VERSION,
        "device": torch.cuda.get_device_name(ctx.device) if cuda else _cpu_name(),
        "device_type": "cuda" if cuda else ctx.device,
        "driver": _driver_version() if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "model": ctx.model.name, "model_spec": dataclasses.asdict(ctx.model),
        "tensor_parallel_size": ctx.tp, "methods": ctx.methods,
        "implementations": {m: KERNEL_IMPLEMENTATIONS[m] for m in ctx.methods}, "grid": ctx.grid.name,
        "block_size": ctx.grid.block_size, "decode_kv": "contiguous" if ctx.contiguous_decode else "paged",
        "timing": {"warmup": ctx.grid.warmup, "min_reps": ctx.grid.min_reps, "max_reps": ctx.grid.max_reps,
                   "target_s": ctx.grid.target_s, "max_rotation": ctx.grid.max_rotation, "clock": "cuda events" if cuda else "perf_counter_ns",
                   "statistic": "median"},
    }


_SAME = ("device", "device_type", "dtype", "model_spec", "tensor_parallel_size", "grid", "block_size", "decode_kv")


def _check_resumable(path: Path, old: dict, sessions: list, new: dict) -> None:
    for key in _SAME:
        if old.get(key) != new.get(key):
            raise RawError(f"{path}: cannot resume: it was measured with {key}={old.get(key)!r}, this run has "
                           f"{key}={new.get(key)!r}; use another --out directory")
    seen = dict(old.get("methods") or {})
    for s in sessions:
        seen.update(s.get("methods") or {})
    for name, knobs in new["methods"].items():
        if name in seen and seen[name] != knobs:
            raise RawError(f"{path}: cannot resume: method {name} was measured with {seen[name]}, this run asks "
                           f"{knobs}; use another --out directory")


def run_grid(out_dir, model: ModelSpec, methods: dict, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
             tp: int = 1, grid: Grid | None = None, command: str = "", retry_oom: bool = False,
             tables: list[str] | None = None, contiguous_decode: bool = False, progress: bool | None = None) -> Path:
    """Measure every point of the grid not yet in ``out_dir/raw.jsonl``; returns the raw file's path."""
    grid = grid or GRIDS["full" if device.startswith("cuda") else "tiny"]
    ctx = Ctx(model, methods, device, dtype, tp, grid, contiguous_decode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = raw_path(out)
    header = make_header(ctx, command)
    done: dict = {}
    if raw.exists() and raw.stat().st_size > 0:
        try:
            old, sessions, done = read_raw(raw, repair=True)
        except RawError:
            if raw.stat().st_size > 0:  # a real problem (not just a header cut off by a kill)
                raise
            old = None
        if old is not None:
            _check_resumable(raw, old, sessions, header)
    else:
        old = None
    points = plan(grid, model, methods, tables)
    skip = {k for k, rec in done.items() if not (retry_oom and rec.get("oom"))}
    todo = [(t, a) for t, a in points if point_key(t, a) not in skip]
    from tqdm import tqdm

    with open(raw, "a") as f, torch.inference_mode():
        if old is None:
            append_record(f, header)
        elif todo:
            append_record(f, {"record": "session", "date": header["date"], "command": command, "methods": methods,
                              "torch": header["torch"], "driver": header["driver"]})
        bar = tqdm(total=len(points), initial=len(points) - len(todo), unit="pt", desc="kvprof kernels",
                   disable=progress is False, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
        try:
            for table, axes in todo:
                bar.set_postfix_str(f"{table} {','.join(map(str, axes.values()))}", refresh=False)
                append_record(f, measure_point(table, axes, ctx))
                bar.update()
        finally:
            bar.close()
    return raw


# ================================================================================================
# --dry-run: point counts and a datasheet-roofline estimate of the run time (no measurement)
# ================================================================================================


def estimate(grid: Grid, model: ModelSpec, methods: dict, tp: int = 1, peak_flops: float = 989.4e12,
             peak_bw: float = 3350e9, overhead_s: float = 0.010, call_floor_s: float = 20e-6,
             gen_bw: float = 1e12, contiguous_decode: bool = False, tables=None) -> dict:
    """Per table: points and estimated wall seconds under stated assumptions (see docs/kvprof-kernels.md).

    Per point: ``overhead_s`` (Python, allocation, events) + input generation (bytes / ``gen_bw``, times
    the rotation count) + (warmup + 1 + reps) x kernel time, kernel time = max(FLOPs / peak, bytes / bw,
    ``call_floor_s``) and reps = clamp(target / kernel time). Inputs are sized on the meta device.
    """
    ctx = Ctx(model, methods, "meta", torch.bfloat16, tp, grid, contiguous_decode)
    per: dict[str, list] = {}
    l2 = 50 * 2**20
    for table, axes in plan(grid, model, methods, tables):
        b = build_bench(table, axes, ctx)
        set_bytes = max(1, _nbytes(b.make_args(0)))
        ctx._cache.clear()
        n_rot = max(1, min(grid.max_rotation, math.ceil(2 * l2 / set_bytes)))
        t = b.divisor * max(b.flops / peak_flops, b.bytes / peak_bw, call_floor_s)  # one timed call
        reps = max(grid.min_reps, min(grid.max_reps, math.ceil(grid.target_s / t)))
        wall = overhead_s + n_rot * set_bytes / gen_bw + (grid.warmup + 1 + reps) * t
        entry = per.setdefault(table, [0, 0.0, 0])
        entry[0] += 1
        entry[1] += wall
        entry[2] = max(entry[2], set_bytes)
    return {t: {"points": v[0], "est_s": v[1], "max_input_bytes": v[2]} for t, v in per.items()}


#: the pessimistic variant --dry-run prints too: 30 % of the datasheet peaks, 50 ms overhead per point
PESSIMISTIC = dict(peak_flops=0.3 * 989.4e12, peak_bw=0.3 * 3350e9, overhead_s=0.05, call_floor_s=50e-6, gen_bw=0.3e12)


def print_estimate(est: dict, file=None) -> float:
    file = file or sys.stdout
    total_p = sum(v["points"] for v in est.values())
    total_s = sum(v["est_s"] for v in est.values())
    print(f"{'table':<32} {'points':>7} {'est. s':>8} {'max input GB':>13}", file=file)
    for t, v in est.items():
        print(f"{t:<32} {v['points']:>7} {v['est_s']:>8.1f} {v['max_input_bytes'] / 1e9:>13.2f}", file=file)
    print(f"{'total':<32} {total_p:>7} {total_s:>8.1f}", file=file)
    return total_s
