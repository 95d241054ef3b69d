"""SnapKV in kvprof: once the prompt is prefilled, keep the ``budget - window`` prompt tokens the last
``window`` queries attend to most (pooled over ``kernel_size``), plus the window (kvsim's
``snapkv:impl=reference``). Kernels: the compaction (the decode attention is the plain paged one); replay:
paged pools that watch the prompt's last queries and compact the prompt after its last chunk; lengths: the
same selection on the attention probabilities, per KV head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from profiler.kernels import ops
from profiler.kernels.bench import Bench
from profiler.methods.base import MethodSupport
from profiler.replay.kvstore import PagedStore


class SnapKVStore(PagedStore):
    name = "snapkv"

    def keep_limit(self, method):
        return method.budget

    def begin_prefills(self, items):
        for it in items:
            if it.st.qwin is None:
                it.st.qwin = [None] * self.L

    def note_prefill_queries(self, li, items, q):
        W = self.method.window
        for it in items:
            qc = q[it.row:it.row + it.n]
            prev = it.st.qwin[li]
            it.st.qwin[li] = (qc if prev is None else torch.cat((prev, qc)))[-W:]

    def compress(self, li, it, q, kk, vv):
        m, st = self.method, it.st
        W = m.window
        prev = st.qwin[li] if st.qwin is not None else None
        qc = q[it.row:it.row + it.n]
        qwin = (qc if prev is None else torch.cat((prev, qc)))[-W:]
        ks, vs = ops.snapkv_compress(qwin.transpose(0, 1)[None], kk, vv, m.budget, W, m.kernel_size)
        if st.qwin is not None:
            st.qwin[li] = None
        return ks, vs


class SnapKV(MethodSupport):
    name = "snapkv"
    impl = "reference"
    eager_prefill = True
    knob_rules = ("kernel_size odd (the pooling keeps the observation's length)",)
    store = SnapKVStore

    def check(self, m):
        if m.kernel_size % 2 == 0:
            return f"knob kernel_size={m.kernel_size}: must be odd (the pooling keeps the observation's length)"
        return super().check(m)

    def prefill_extra(self, c, m, C, KV):
        s, e = c.s, c.esize
        budget, window, ks = m.budget, m.window, m.kernel_size
        return Bench(lambda qw, kk, vv: ops.snapkv_compress(qw, kk, vv, budget, window, ks),
                     lambda r: (c.rnd(1, s.hq, window, s.d), c.rnd(1, s.hkv, KV, s.d), c.rnd(1, s.hkv, KV, s.d)),
                     flops=2.0 * s.hq * window * KV * s.d, bytes=e * s.hkv * s.d * KV + 12.0 * s.hq * window * KV)

    def exact_context(self, m, prompt_len):
        return None if prompt_len <= m.budget else prompt_len

    def after_step(self, state, lc, m, probs, prefill, num_queries):
        if not prefill:
            return
        budget, window, kernel = m.budget, m.window, m.kernel_size
        b, hkv, _, _, t = probs.shape
        real = t - state.pad  # prompt length of each row
        if t <= window or not bool((real > budget).any()):
            return
        obs = probs[:, :, :, -window:, : t - window].sum(dim=3).mean(dim=2)  # [B, Hkv, T-w]
        pooled = F.avg_pool1d(obs.reshape(b * hkv, 1, t - window), kernel_size=kernel, padding=kernel // 2,
                              stride=1, count_include_pad=True).view(b, hkv, t - window)
        pooled = pooled.masked_fill(~lc.valid[:, :, : t - window], float("-inf"))
        top = pooled.topk(min(budget - window, t - window), dim=-1).indices
        keep = torch.zeros_like(lc.valid)
        keep.scatter_(-1, top, True)
        keep[:, :, t - window:] = True
        compress = (real > budget)[:, None, None]
        lc.valid = torch.where(compress, lc.valid & keep, lc.valid)
