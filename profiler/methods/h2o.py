"""H2O in kvprof: a fixed budget per sequence, the ``window`` most recent tokens plus the heaviest hitters
by accumulated attention (kvsim's ``h2o:impl=reference``, the paper's code: eager attention, per-step
eviction). Kernels: the decode attention with its probabilities, the prompt's score accumulation and
compaction, and the per-step evict-and-write; replay: pools with an fp32 score and a position per (slot,
KV head); lengths: the same eviction on the attention probabilities, per KV head."""

from __future__ import annotations

import torch

from profiler.kernels import ops
from profiler.kernels.bench import Bench
from profiler.methods.base import MethodSupport
from profiler.replay.kvstore import DEFAULT_MAX_ATTN_TOKENS, KVStore, flat_from_table, Pages, length_buckets


class H2OStore(KVStore):
    """H2O: the model-dtype pools plus per layer an fp32 accumulated score and the position held by
    every (slot, KV head). Prefill attention is eager (``ops.eager_attention``: the probabilities are
    accumulated into the scores); after the last chunk a prompt longer than ``budget`` is compacted to
    the heavy hitters plus the recent window (``ops.h2o_compress``); in decode a full cache evicts, per
    KV head, the lowest-score token outside the window (``ops.h2o_evict_slot``) and the new token takes
    its slot, then the decode query's probabilities are accumulated."""

    name = "h2o"
    paged = False

    def __init__(self, cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend="ops",
                 max_attn_tokens=DEFAULT_MAX_ATTN_TOKENS):
        super().__init__(cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend, max_attn_tokens)
        shape = (num_blocks, block_size, self.hkv, self.D)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.L)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.L)]
        ntok = num_blocks * block_size
        self.score = [torch.zeros(ntok, self.hkv, dtype=torch.float32, device=self.device) for _ in range(self.L)]
        self.pos = [torch.zeros(ntok, self.hkv, dtype=torch.int32, device=self.device) for _ in range(self.L)]
        self.pages = Pages(num_blocks, block_size, self.device)
        self.budget, self.window = method.budget, method.window

    @staticmethod
    def bytes_per_token(cfg, method, dtype_bytes):
        return cfg.num_layers * cfg.num_kv_heads * (2 * cfg.head_dim * dtype_bytes + 4 + 4)

    def begin_step(self, items):
        dev, P = self.device, self.block_size
        self.prefills = [it for it in items if it.prefill]
        self.decodes = [it for it in items if not it.prefill]
        for it in self.prefills:
            st = it.st
            total = st.kv_len + it.n
            it.extra["new_idx"] = self.pages.flat_slots(st, st.kv_len, total)
            it.extra["all_idx"] = self.pages.flat_slots(st, 0, total)
            it.extra["pos"] = torch.arange(it.start, it.start + it.n, dtype=torch.int32).to(dev, non_blocking=True)
            it.compact = it.last and total > self.budget
            it.new_len = self.budget if it.compact else total
            if it.compact:
                it.extra["dst_idx"] = self.pages.flat_slots(st, 0, self.budget)
        full = [it for it in self.decodes if it.st.kv_len >= self.budget]
        grow = [it for it in self.decodes if it.st.kv_len < self.budget]
        self.full, self.grow = full, grow
        if full:
            table = self.pages.table(full, [-(-self.budget // P)] * len(full))
            self.full_flat = flat_from_table(table, P)[:, :self.budget]  # [Bf, budget]
            self.full_rows = torch.tensor([it.row for it in full], dtype=torch.long).to(dev, non_blocking=True)
            self.full_pos = torch.tensor([it.start for it in full], dtype=torch.int32).to(dev, non_blocking=True)
            for it in full:
                it.new_len = self.budget
        if grow:
            slots = [it.st.pages[it.st.kv_len // P] * P + it.st.kv_len % P for it in grow]
            self.grow_idx = torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True)
            self.grow_rows = torch.tensor([it.row for it in grow], dtype=torch.long).to(dev, non_blocking=True)
            self.grow_pos = torch.tensor([it.start for it in grow], dtype=torch.int32).to(dev, non_blocking=True)
            for it in grow:
                it.new_len = it.st.kv_len + 1
        self.buckets = []
        for b in length_buckets([it.new_len for it in self.decodes], max_tokens=self.max_attn_tokens):
            its = [self.decodes[i] for i in b]
            table = self.pages.table(its, [-(-it.new_len // P) for it in its])
            lens = torch.tensor([it.new_len for it in its], dtype=torch.long).to(dev, non_blocking=True)
            rows = torch.tensor([it.row for it in its], dtype=torch.long).to(dev, non_blocking=True)
            flat = flat_from_table(table, P)
            mask = torch.arange(flat.shape[1], device=dev)[None, :] < lens[:, None]
            self.buckets.append((rows, table, flat, mask))

    def attend(self, li, q, k, v):
        out = torch.empty_like(q)
        K, V = self.k[li].flatten(0, 1), self.v[li].flatten(0, 1)
        S, POS = self.score[li], self.pos[li]
        hkv, g = self.hkv, self.hq // self.hkv
        heads = torch.arange(hkv, device=self.device)
        for it in self.prefills:
            r0, r1 = it.row, it.row + it.n
            ni, ai = it.extra["new_idx"], it.extra["all_idx"]
            K[ni], V[ni] = k[r0:r1], v[r0:r1]
            S[ni] = 0.0
            POS[ni] = it.extra["pos"][:, None].expand(-1, hkv)
            kk, vv = K[ai].transpose(0, 1)[None], V[ai].transpose(0, 1)[None]
            qq = q[r0:r1].transpose(0, 1)[None]
            o, probs = ops.eager_attention(qq, kk, vv, ops.causal_mask(it.n, kk.shape[2], q.device))
            out[r0:r1] = o[0].transpose(0, 1)
            score = S[ai].t()[None].contiguous()  # [1, Hkv, L]
            ops.h2o_accumulate(score, probs)
            if it.compact:
                kc, vc, sc, keep = ops.h2o_compress(kk, vv, score, self.budget, self.window)
                pos = POS[ai].t()[None].gather(2, keep)  # [1, Hkv, budget]
                d = it.extra["dst_idx"]
                K[d], V[d] = kc[0].transpose(0, 1), vc[0].transpose(0, 1)
                S[d], POS[d] = sc[0].t(), pos[0].t()
            else:
                S[ai] = score[0].t()
        if self.grow:
            gi = self.grow_idx
            K[gi], V[gi] = k[self.grow_rows], v[self.grow_rows]
            S[gi] = 0.0
            POS[gi] = self.grow_pos[:, None].expand(-1, hkv)
        if self.full:
            fl = self.full_flat  # [Bf, budget]
            score = S[fl].transpose(1, 2)  # [Bf, Hkv, budget]
            pos = POS[fl].transpose(1, 2)
            slot = ops.h2o_evict_slot(score, pos, self.full_pos[:, None, None], self.window)  # [Bf, Hkv]
            dst = fl.gather(1, slot)  # [Bf, Hkv] flat index per head
            K[dst, heads] = k[self.full_rows]
            V[dst, heads] = v[self.full_rows]
            S[dst, heads] = 0.0
            POS[dst, heads] = self.full_pos[:, None].expand(-1, hkv)
        for rows, table, flat, mask in self.buckets:
            b = rows.shape[0]
            kk = ops.gather_paged(self.k[li], table)
            vv = ops.gather_paged(self.v[li], table)
            o, probs = ops.eager_attention(q[rows][:, :, None, :], kk, vv, mask[:, None, None, None, :])
            out[rows] = o[:, :, 0, :]
            mass = probs.view(b, hkv, g, 1, -1).sum(dim=(2, 3))  # [b, Hkv, Lpad]; 0 on padding
            lp = flat.shape[1]
            S.index_put_((flat[:, :, None].expand(b, lp, hkv), heads.expand(b, lp, hkv)), mass.transpose(1, 2),
                         accumulate=True)
        return out


class H2O(MethodSupport):
    name = "h2o"
    impl = "reference"
    eager_prefill = True
    store = H2OStore

    def prefill_extra(self, c, m, C, KV):
        s, e = c.s, c.esize
        budget, window = m.budget, m.window

        def h2o(probs, score, kk, vv):
            ops.h2o_accumulate(score, probs)
            if kk.shape[2] > budget:
                return ops.h2o_compress(kk, vv, score, budget, window)

        def args(r):
            probs = torch.rand(1, s.hq, C, KV, device=c.device, dtype=torch.float32)
            return probs, torch.zeros(1, s.hkv, KV, device=c.device), c.rnd(1, s.hkv, KV, s.d), c.rnd(1, s.hkv, KV, s.d)

        return Bench(h2o, args, bytes=4.0 * s.hq * C * KV + 2 * e * s.hkv * s.d * min(KV, budget))

    def decode_attention(self, c, m, B, KV):
        s, e = c.s, c.esize
        return Bench(ops.eager_attention, lambda r: (c.queries(B), *c.contiguous_cache(B, KV)),
                     flops=4.0 * B * s.hq * s.d * KV, bytes=2.0 * e * B * KV * s.hkv * s.d + 12.0 * B * s.hq * KV)

    def decode_extra(self, c, m, B, KV):
        s, e = c.s, c.esize

        def args(r):
            kk, vv = c.contiguous_cache(B, KV)
            probs = torch.rand(B, s.hq, 1, KV, device=c.device, dtype=torch.float32)
            pos = torch.arange(KV, device=c.device).expand(B, s.hkv, KV).contiguous()
            return (kk, vv, torch.rand(B, s.hkv, KV, device=c.device), pos, probs,
                    c.rnd(B, s.hkv, 1, s.d), c.rnd(B, s.hkv, 1, s.d), KV, m.window)

        new_bytes = 2.0 * e * B * s.hkv * s.d
        return Bench(ops.h2o_decode_update, args,
                     bytes=4.0 * B * KV * (s.hq + 3 * s.hkv) + 8.0 * B * s.hkv * KV + new_bytes)

    def exact_context(self, m, prompt_len):
        return max(prompt_len, m.budget)

    def init_layer(self, lc, m):
        b, hkv, cap = lc.validbuf.shape
        lc.scorebuf = torch.zeros(b, hkv, cap, device=lc.kbuf.device)

    def after_step(self, state, lc, m, probs, prefill, num_queries):
        lc.score += probs.sum(dim=(2, 3))
        budget, window = m.budget, m.window
        t = lc.k.shape[2]
        recent = torch.zeros(t, dtype=torch.bool, device=lc.k.device)
        recent[max(0, t - window):] = True
        kept = lc.valid.sum(-1)  # [B, Hkv]
        over = kept > budget
        if not bool(over.any()):
            return
        cand = lc.score.masked_fill(~lc.valid | recent, float("inf"))
        if prefill:  # keep the top (budget - window) heavy hitters among the older tokens, per head
            heavy = budget - window
            old = lc.valid & ~recent
            top = (-cand).topk(min(heavy, t), dim=-1).indices
            keep = torch.zeros_like(lc.valid)
            keep.scatter_(-1, top, True)
            new_valid = (keep & old) | (lc.valid & recent)
            lc.valid = torch.where(over[..., None], new_valid, lc.valid)
        else:  # one token over the budget per step: drop the lightest older token
            victim = cand.argmin(dim=-1, keepdim=True)
            drop = torch.zeros_like(lc.valid).scatter_(-1, victim, True) & over[..., None]
            lc.valid = lc.valid & ~drop
