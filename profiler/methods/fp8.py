"""FP8 (E4M3) KV in kvprof, as vLLM's ``kv_cache_dtype=fp8`` on a GPU with fp8 support (kvsim's
``fp8:impl=native``): the paged pools hold e4m3 with per-tensor scales of 1.0 (vLLM's default). Kernels:
writing new tokens (prefill and decode) and decode attention reading e4m3 blocks; lengths: every new K/V is
rounded through e4m3."""

from __future__ import annotations

import torch

from profiler.kernels import ops
from profiler.kernels.bench import Bench
from profiler.lengthkit.cache import fp8_round_trip
from profiler.methods.base import MethodSupport
from profiler.replay.kvstore import PagedStore


class FP8Store(PagedStore):
    name = "fp8"
    fp8 = True


class FP8(MethodSupport):
    name = "fp8"
    impl = "native"
    store = FP8Store

    def prefill_extra(self, c, m, C, KV):
        s, e, bs = c.s, c.esize, c.grid.block_size
        nb = -(-KV // bs)

        def args(r):
            kc = torch.empty(nb, bs, s.hkv, s.d, device=c.device, dtype=ops.FP8)
            vc = torch.empty_like(kc)
            table = torch.randperm(nb, device=c.device)
            p = torch.arange(KV - C, KV, device=c.device)
            slots = table[p // bs] * bs + p % bs
            one = torch.ones((), device=c.device)
            return kc, vc, c.rnd(C, s.hkv, s.d), c.rnd(C, s.hkv, s.d), slots, one, one

        return Bench(ops.fp8_write_paged, args, bytes=2.0 * C * s.hkv * s.d * (e + 1))

    def decode_attention(self, c, m, B, KV):
        s, e = c.s, c.esize
        kv_elems = B * KV * s.hkv * s.d
        flops = 4.0 * B * s.hq * s.d * KV
        one = torch.ones((), device=c.device)
        if c.contiguous_decode:
            def f8(qq, kk, vv, ks, vs):
                return ops.decode_attention(qq, ops.fp8_dequantize(kk, ks, qq.dtype), ops.fp8_dequantize(vv, vs, qq.dtype))

            return Bench(f8, lambda r: (c.queries(B), *(x.to(ops.FP8) for x in c.contiguous_cache(B, KV)), one, one),
                         flops=flops, bytes=(2.0 + 4.0 * e) * kv_elems)

        def args(r):
            kc, vc, table, lens = c.paged_cache(B, KV, ops.FP8)
            return c.queries(B), kc, vc, table, one, one, lens

        return Bench(ops.paged_decode_attention_fp8, args, flops=flops, bytes=(6.0 + 4.0 * e) * kv_elems)

    def decode_extra(self, c, m, B, KV):
        s, e, bs = c.s, c.esize, c.grid.block_size

        def args(r):
            nslots = -(-B * KV // bs) * bs
            kc = torch.empty(nslots // bs, bs, s.hkv, s.d, device=c.device, dtype=ops.FP8)
            slots = torch.randperm(nslots, device=c.device)[:B]
            one = torch.ones((), device=c.device)
            return kc, torch.empty_like(kc), c.rnd(B, s.hkv, s.d), c.rnd(B, s.hkv, s.d), slots, one, one

        return Bench(ops.fp8_write_paged, args, bytes=2.0 * e * B * s.hkv * s.d * 1.5)

    def exact_context(self, m, prompt_len):
        return prompt_len

    def after_step(self, state, lc, m, probs, prefill, num_queries):
        t = lc.k.shape[2]
        lc.k[:, :, t - num_queries:] = fp8_round_trip(lc.k[:, :, t - num_queries:])
        lc.v[:, :, t - num_queries:] = fp8_round_trip(lc.v[:, :, t - num_queries:])
