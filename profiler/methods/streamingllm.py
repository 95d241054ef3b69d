"""StreamingLLM in kvprof: the first ``sink`` tokens plus the last ``window`` (kvsim's
``streamingllm:impl=sliding``, attention sinks over a ring in a paged engine). Kernels: decode attention
over the kept tokens, the prompt's compaction, and a decode write into the ring; replay: paged pools whose
prompt is compacted to sink + window and whose decode tokens then overwrite the ring; lengths: every token
outside the sinks and the window is evicted."""

from __future__ import annotations

import torch

from profiler.kernels import ops
from profiler.kernels.bench import Bench
from profiler.methods.base import MethodSupport
from profiler.replay.kvstore import PagedStore


class StreamingStore(PagedStore):
    name = "streamingllm"

    def keep_limit(self, method):
        self.sink, self.window = method.sink, method.window
        return method.sink + method.window

    def decode_slot(self, st, it):
        if st.kv_len >= self.limit:  # full: the ring over the window
            return self.sink + (it.start - self.sink) % self.window, self.limit
        return st.kv_len, st.kv_len + 1

    def compress(self, li, it, q, kk, vv):
        return ops.streaming_compress(kk, vv, self.sink, self.window)


class StreamingLLM(MethodSupport):
    name = "streamingllm"
    impl = "sliding"
    store = StreamingStore

    def prefill_extra(self, c, m, C, KV):
        s = c.s
        return Bench(lambda kk, vv: ops.streaming_compress(kk, vv, m.sink, m.window),
                     lambda r: c.contiguous_cache(1, KV),
                     bytes=4.0 * c.esize * s.hkv * s.d * min(KV, m.sink + m.window))

    def decode_attention(self, c, m, B, KV):
        s, e = c.s, c.esize
        return Bench(ops.decode_attention, lambda r: (c.queries(B), *c.contiguous_cache(B, KV)),
                     flops=4.0 * B * s.hq * s.d * KV, bytes=2.0 * e * B * KV * s.hkv * s.d)

    def decode_extra(self, c, m, B, KV):
        s, e = c.s, c.esize
        sink = min(m.sink, KV - 1)

        def args(r):
            kk, vv = c.contiguous_cache(B, KV)
            t = torch.randint(KV, 10 * KV, (B,), device=c.device)
            return kk, vv, c.rnd(B, s.hkv, 1, s.d), c.rnd(B, s.hkv, 1, s.d), ops.streaming_slot(t, sink, KV - sink)

        return Bench(ops.streaming_write, args, bytes=2 * 2.0 * e * B * s.hkv * s.d)

    def exact_context(self, m, prompt_len):
        return max(prompt_len, m.sink + m.window)

    def after_step(self, state, lc, m, probs, prefill, num_queries):
        t = lc.k.shape[2]
        idx = torch.arange(t, device=lc.k.device)
        keep = (idx[None, :] < (state.pad[:, None] + m.sink)) | (idx[None, :] >= t - m.window)
        lc.valid = lc.valid & keep[:, None, :]
