"""KIVI in kvprof (kvsim's ``kivi:impl=reference``, the paper's code): keys quantised per channel in
groups of ``group_size`` tokens, values per token in groups of ``group_size`` channels, the most recent
``residual_length`` tokens in full precision. Kernels: quantising a prefill chunk, the fused dequantising
decode attention, and the decode write with its flush of a full residual; replay: packed codes plus a
residual per running sequence; lengths: the quantise -> dequantise round trip, exactly where the reference
code quantises."""

from __future__ import annotations

import math

import torch

from profiler.kernels import ops
from profiler.kernels.bench import Bench
from profiler.lengthkit.cache import quant_keys_per_channel, quant_values_per_token
from profiler.methods.base import MethodSupport
from profiler.replay.kvstore import DEFAULT_MAX_ATTN_TOKENS, KVStore, flat_from_table, Pages, length_buckets


def kivi_attention_masked(q, kd, vd, kr, vr, nq, nr):
    """Decode attention over a batch of KIVI caches of different lengths: ``kd``/``vd`` ``[B, Hkv, Tq, D]``
    the dequantized part (first ``nq[b]`` valid), ``kr``/``vr`` ``[B, Hkv, R, D]`` the full-precision
    residual (first ``nr[b]`` valid). One softmax over both parts, output P_q V_q + P_r V_r: the math of
    ``ops.kivi_decode_attention`` with length masks."""
    b, hq, _, d = q.shape
    hkv, tq, r = kr.shape[1], kd.shape[2], kr.shape[2]
    g = hq // hkv
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, hkv, g, d)
    scores = torch.cat((torch.matmul(qg, kd.transpose(-1, -2)), torch.matmul(qg, kr.transpose(-1, -2))), dim=-1)
    ar = torch.arange(tq + r, device=q.device)
    valid = torch.where(ar[None, :] < tq, ar[None, :] < nq[:, None], (ar[None, :] - tq) < nr[:, None])
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(p[..., :tq], vd) + torch.matmul(p[..., tq:], vr)
    return out.view(b, hq, 1, d)


class KIVIStore(KVStore):
    """KIVI: per layer packed K and V codes ``[tokens, Hkv, D*bits/8]``, value scale/zero per token and
    ``group_size`` channels, key scale/zero per channel and ``group_size`` tokens, and a residual of
    ``residual_length`` full-precision tokens per running sequence. New tokens go to the residual; a
    full residual is quantized (``ops.kivi_quantize_keys/values``) into the next ``residual_length``
    quantized slots. Attention reads the dequantized part plus the residual (one softmax).
    A page is ``lcm(block_size, group_size)`` tokens so key groups never straddle pages."""

    name = "kivi"
    paged = False

    def __init__(self, cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend="ops",
                 max_attn_tokens=DEFAULT_MAX_ATTN_TOKENS):
        super().__init__(cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend, max_attn_tokens)
        m = method
        self.bits, self.G, self.R = m.bits, m.group_size, m.residual_length
        if self.D % self.G:
            raise ValueError(f"kivi: group_size={self.G} must divide head_dim={self.D}")
        self.P = math.lcm(block_size, self.G)
        npages = -(-num_blocks * block_size // self.P) + max_num_seqs
        ntok = npages * self.P
        dp = self.D * self.bits // 8
        hkv, D, G, dev = self.hkv, self.D, self.G, self.device
        z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
        self.kq = [z(ntok, hkv, dp, dt=torch.uint8) for _ in range(self.L)]
        self.vq = [z(ntok, hkv, dp, dt=torch.uint8) for _ in range(self.L)]
        self.vs = [z(ntok, hkv, D // G, 1) for _ in range(self.L)]
        self.vm = [z(ntok, hkv, D // G, 1) for _ in range(self.L)]
        self.ks = [z(ntok // G, hkv, 1, D) for _ in range(self.L)]
        self.km = [z(ntok // G, hkv, 1, D) for _ in range(self.L)]
        self.kr = [z(max_num_seqs, self.R, hkv, D) for _ in range(self.L)]
        self.vr = [z(max_num_seqs, self.R, hkv, D) for _ in range(self.L)]
        self.pages = Pages(npages, self.P, dev)
        self.res_free = list(range(max_num_seqs - 1, -1, -1))

    @staticmethod
    def bytes_per_token(cfg, method, dtype_bytes):
        d, G, b = cfg.head_dim, method.group_size, method.bits
        per_head = 2 * d * b / 8 + 2 * dtype_bytes * d / G + 2 * dtype_bytes * (d // G)
        return cfg.num_layers * cfg.num_kv_heads * per_head

    @staticmethod
    def fixed_bytes(cfg, method, dtype_bytes, max_num_seqs):
        return 2 * cfg.num_layers * max_num_seqs * method.residual_length * cfg.num_kv_heads * cfg.head_dim * dtype_bytes

    def pages_for_blocks(self, blocks):
        return -(-blocks * self.block_size // self.P)

    def ensure(self, st, blocks):
        super().ensure(st, blocks)
        if st.res_slot is None:
            st.res_slot = self.res_free.pop()

    def release(self, st):
        super().release(st)
        if st.res_slot is not None:
            self.res_free.append(st.res_slot)
        st.res_slot, st.n_q, st.n_res = None, 0, 0

    # -- helpers ------------------------------------------------------------------------------------
    def _quant_write(self, li, kx, vx, idx):
        """Quantize ``kx``/``vx`` ``[m, Hkv, D]`` (m a multiple of group_size, groups never crossing
        sequences) into flat token slots ``idx`` ``[m]`` (group-aligned)."""
        bits, G = self.bits, self.G
        pk, sk, mk = ops.kivi_quantize_keys(kx.transpose(0, 1), bits, G)  # [Hkv, m, dp], [Hkv, m/G, 1, D]
        pv, sv, mv = ops.kivi_quantize_values(vx.transpose(0, 1), bits, G)  # [Hkv, m, dp], [Hkv, m, D/G, 1]
        self.kq[li][idx] = pk.transpose(0, 1)
        self.vq[li][idx] = pv.transpose(0, 1)
        self.vs[li][idx] = sv.transpose(0, 1)
        self.vm[li][idx] = mv.transpose(0, 1)
        gi = idx[::G] // G
        self.ks[li][gi] = sk.transpose(0, 1)
        self.km[li][gi] = mk.transpose(0, 1)

    def _dequant(self, li, idx):
        """Dequantized K, V ``[..., Hkv, T, D]`` of flat slots ``idx`` ``[..., T]`` (T a multiple of G)."""
        G, bits = self.G, self.bits
        gi = idx[..., ::G] // G
        pk = self.kq[li][idx].transpose(-2, -3)  # [..., Hkv, T, dp]
        pv = self.vq[li][idx].transpose(-2, -3)
        sk = self.ks[li][gi].movedim(-3, -4)  # [..., Hkv, T/G, 1, D]
        mk = self.km[li][gi].movedim(-3, -4)
        sv = self.vs[li][idx].movedim(-3, -4)  # [..., Hkv, T, D/G, 1]
        mv = self.vm[li][idx].movedim(-3, -4)
        kd = ops.kivi_dequantize_keys(pk, sk, mk, bits, G, dtype=self.dtype)
        vd = ops.kivi_dequantize_values(pv, sv, mv, bits, G, dtype=self.dtype)
        return kd, vd

    # -- step -----------------------------------------------------------------------------------------
    def begin_step(self, items):
        dev, R = self.device, self.R
        self.prefills = [it for it in items if it.prefill]
        self.decodes = [it for it in items if not it.prefill]
        for it in self.prefills:
            st = it.st
            m = st.n_res + it.n
            f = (m // R) * R
            it.extra["q_idx"] = self.pages.flat_slots(st, 0, st.n_q)
            it.extra["flush"] = f
            it.extra["flush_idx"] = self.pages.flat_slots(st, st.n_q, st.n_q + f)
            it.extra["n_q"], it.extra["n_res"] = st.n_q + f, m - f
            it.new_len = st.n_q + m
        for it in self.decodes:
            st = it.st
            flush = st.n_res + 1 == R
            it.extra["n_q"], it.extra["n_res"] = (st.n_q + R, 0) if flush else (st.n_q, st.n_res + 1)
            it.extra["flush"] = R if flush else 0
            it.new_len = st.n_q + st.n_res + 1
        dec = self.decodes
        if dec:
            self.d_rows = torch.tensor([it.row for it in dec], dtype=torch.long).to(dev, non_blocking=True)
            self.d_slot = torch.tensor([it.st.res_slot for it in dec], dtype=torch.long).to(dev, non_blocking=True)
            self.d_res = torch.tensor([it.st.n_res for it in dec], dtype=torch.long).to(dev, non_blocking=True)
            fl = [it for it in dec if it.extra["flush"]]
            self.f_slot = torch.tensor([it.st.res_slot for it in fl], dtype=torch.long).to(dev, non_blocking=True)
            self.f_idx = (torch.cat([self.pages.flat_slots(it.st, it.st.n_q, it.st.n_q + R) for it in fl])
                          if fl else None)
            self.buckets = []
            for b in length_buckets([it.extra["n_q"] + self.R for it in dec], max_tokens=self.max_attn_tokens):
                its = [dec[i] for i in b]
                tq = max(it.extra["n_q"] for it in its)
                idx = None
                if tq:  # padding past a sequence's n_q reads some valid slot and is masked
                    table = self.pages.table(its, [-(-it.extra["n_q"] // self.P) for it in its])
                    idx = flat_from_table(table, self.P)[:, :tq]
                rows = torch.tensor([it.row for it in its], dtype=torch.long).to(dev, non_blocking=True)
                slots = torch.tensor([it.st.res_slot for it in its], dtype=torch.long).to(dev, non_blocking=True)
                nq = torch.tensor([it.extra["n_q"] for it in its], dtype=torch.long).to(dev, non_blocking=True)
                nr = torch.tensor([it.extra["n_res"] for it in its], dtype=torch.long).to(dev, non_blocking=True)
                self.buckets.append((rows, idx, slots, nq, nr))

    def attend(self, li, q, k, v):
        out = torch.empty_like(q)
        KR, VR = self.kr[li], self.vr[li]
        for it in self.prefills:
            st, r0, r1 = it.st, it.row, it.row + it.n
            parts_k, parts_v = [], []
            if st.n_q:
                kd, vd = self._dequant(li, it.extra["q_idx"])  # [Hkv, n_q, D]
                parts_k.append(kd.transpose(0, 1))
                parts_v.append(vd.transpose(0, 1))
            res_k, res_v = KR[st.res_slot, :st.n_res], VR[st.res_slot, :st.n_res]
            comb_k = torch.cat((res_k, k[r0:r1]))  # residual + chunk [m, Hkv, D]
            comb_v = torch.cat((res_v, v[r0:r1]))
            kk = torch.cat(parts_k + [comb_k]).transpose(0, 1)[None]
            vv = torch.cat(parts_v + [comb_v]).transpose(0, 1)[None]
            qq = q[r0:r1].transpose(0, 1)[None]
            out[r0:r1] = ops.sdpa_prefill(qq, kk, vv)[0].transpose(0, 1)
            f = it.extra["flush"]
            if f:
                self._quant_write(li, comb_k[:f], comb_v[:f], it.extra["flush_idx"])
            rest = comb_k.shape[0] - f
            KR[st.res_slot, :rest] = comb_k[f:]
            VR[st.res_slot, :rest] = comb_v[f:]
        if self.decodes:
            KR[self.d_slot, self.d_res] = k[self.d_rows]
            VR[self.d_slot, self.d_res] = v[self.d_rows]
            if self.f_idx is not None:
                self._quant_write(li, KR[self.f_slot].flatten(0, 1), VR[self.f_slot].flatten(0, 1), self.f_idx)
            for rows, idx, slots, nq, nr in self.buckets:
                b = rows.shape[0]
                if idx is not None:
                    kd, vd = self._dequant(li, idx)  # [b, Hkv, Tq, D]
                else:
                    kd = vd = torch.zeros(b, self.hkv, 0, self.D, dtype=self.dtype, device=self.device)
                kr = KR[slots].transpose(1, 2)  # [b, Hkv, R, D]
                vr = VR[slots].transpose(1, 2)
                o = kivi_attention_masked(q[rows][:, :, None, :], kd, vd, kr, vr, nq, nr)
                out[rows] = o[:, :, 0, :]
        return out

    def end_step(self, items):
        for it in items:
            it.st.n_q, it.st.n_res = it.extra["n_q"], it.extra["n_res"]
            it.st.kv_len = it.new_len


class KIVI(MethodSupport):
    name = "kivi"
    impl = "reference"
    store = KIVIStore

    def prefill_extra(self, c, m, C, KV):
        s, e = c.s, c.esize
        g, bits = m.group_size, m.bits
        n = -(-C // g) * g

        def quant(kk, vv):
            return ops.kivi_quantize_keys(kk, bits, g), ops.kivi_quantize_values(vv, bits, g)

        return Bench(quant, lambda r: (c.rnd(1, s.hkv, n, s.d), c.rnd(1, s.hkv, n, s.d)),
                     bytes=2.0 * n * s.hkv * s.d * (e + bits / 8))

    def decode_attention(self, c, m, B, KV):
        s, e = c.s, c.esize
        bits, g, R = m.bits, m.group_size, m.residual_length
        n_q = max(0, (KV - R // 2) // g * g)
        n_r = KV - n_q

        def args(r):
            kk, vv = c.rnd(B, s.hkv, n_q, s.d), c.rnd(B, s.hkv, n_q, s.d)
            kq, vq = ops.kivi_quantize_keys(kk, bits, g), ops.kivi_quantize_values(vv, bits, g)
            del kk, vv
            return (c.queries(B), kq, vq, c.rnd(B, s.hkv, n_r, s.d), c.rnd(B, s.hkv, n_r, s.d))

        return Bench(lambda qq, kq, vq, kr, vr: ops.kivi_decode_attention(qq, kq, vq, kr, vr, bits, g), args,
                     flops=4.0 * B * s.hq * s.d * KV, bytes=(2 * bits / 8 + 4.0 * e) * B * KV * s.hkv * s.d)

    def decode_extra(self, c, m, B, KV):
        s, e = c.s, c.esize
        bits, g, R = m.bits, m.group_size, m.residual_length
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

        return Bench(step, args, divisor=R, bytes=2.0 * e * B * s.hkv * s.d * (2 + bits / 8 / e))

    def exact_context(self, m, prompt_len):
        return max(prompt_len, m.residual_length)

    def init_layer(self, lc, m):
        lc.row_count = torch.zeros(lc.validbuf.shape[0], dtype=torch.long, device=lc.kbuf.device)

    def after_step(self, state, lc, m, probs, prefill, num_queries):
        bits, group, resid = m.bits, m.group_size, m.residual_length
        t = lc.k.shape[2]
        # values: per token once it is older than the last `resid` tokens
        if prefill:
            if t - resid > 0:
                lc.v[:, :, : t - resid] = quant_values_per_token(lc.v[:, :, : t - resid], bits, group)
        else:
            j = t - 1 - resid
            if j >= 0:
                lc.v[:, :, j:j + 1] = quant_values_per_token(lc.v[:, :, j:j + 1], bits, group)
        # keys: per channel over blocks; the full-precision tail is flushed when it reaches `resid`
        n_real = t - state.pad
        block = resid if resid > 0 else group
        done = lc.row_count  # per row: real tokens whose keys are quantised
        target = (n_real // block) * block if prefill else torch.where(n_real - done >= block, done + block, done)
        for r in torch.nonzero(target > done).flatten().tolist():
            s = int(state.pad[r] + done[r])
            e = int(state.pad[r] + target[r])
            lc.k[r, :, s:e] = quant_keys_per_channel(lc.k[r, :, s:e], bits, group)
        lc.row_count = target
