"""The physical KV caches of ``kvprof replay``: GPU tensors addressed by page tables.

How many blocks a sequence holds is decided by kvsim's own ``KVCacheManager`` (the engine drives it);
a store only mirrors those counts with real pages and computes attention over them:

- ``PagedStore`` (``none``, ``fp8``, ``streamingllm``, ``snapkv``): vLLM's flash layout, per layer a
  K and a V pool ``[num_blocks, block_size, Hkv, D]`` (fp8 e4m3 for ``fp8``, per-tensor scales 1.0 as
  vLLM's default), one page = one kvsim block. StreamingLLM keeps its sinks and a ring over the
  window; SnapKV compacts the prompt to its budget after the last prefill chunk; both write the
  survivors into the sequence's first pages and the engine frees the rest (kvsim's ``after_compute``
  shrink).
- ``H2OStore``: the same pools plus, per layer, an fp32 accumulated score and the position held in
  every (slot, KV head); eager attention (the probabilities are H2O's input), eviction per KV head.
- ``KIVIStore``: packed 2/4-bit codes with per-channel key and per-token value scales, plus a
  full-precision residual of ``residual_length`` tokens per running sequence.

H2O and KIVI are non-paged in kvsim (their reference implementations grow per-request tensors): the
block manager reserves a sequence's lifetime footprint at admission, and the store holds exactly that
reservation as pages from the moment the sequence is admitted until it finishes or is preempted; the
attention reads them through the same gather as the paged methods (a contiguous per-request tensor
would be read by an equivalent gather once sequences of different lengths are batched).

Attention, per method, reuses ``profiler.kernels.ops``: paged writes (``write_paged``,
``fp8_write_paged``), paged decode attention (``paged_decode_attention[_fp8]``, over length buckets
to bound padding), causal chunk attention (``sdpa_prefill``), eager attention and H2O's
accumulate / evict / compress, StreamingLLM's keep indices, SnapKV's selection, KIVI's
quantize / dequantize. The ``varlen`` backend (CUDA) instead runs every scheduled token of the
bf16/fp8 paged methods through one ``torch.nn.attention.varlen.varlen_attn`` call (FlashAttention
varlen, as vLLM's FlashAttention backend): over the paged pools through the block table when the
kernel accepts the block size (no copy), else over the exactly-gathered valid tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from profiler.kernels import ops

BACKENDS = ("ops", "varlen")
#: default cap on the cached tokens one attention call gathers (see ``length_buckets``)
DEFAULT_MAX_ATTN_TOKENS = 1 << 16
#: bytes of transient copies per gathered (token, KV head, channel) pair of K and V, worst method (KIVI's
#: unpack + dequantize chain); times ``max_attn_tokens`` it is the headroom the pool sizing leaves
TRANSIENT_BYTES_PER_ELEM = 20


class SeqKV:
    """Physical cache state of one sequence (the engine keeps one per live sequence)."""

    __slots__ = ("tokens", "pages", "kv_len", "qwin", "n_q", "n_res", "res_slot")

    def __init__(self, tokens: list[int]):
        #: prompt ids followed by every sampled id (what a recompute re-prefills)
        self.tokens = tokens
        self.pages: list[int] = []
        #: valid cache slots (kept tokens); KIVI: n_q + n_res
        self.kv_len = 0
        self.qwin: list | None = None
        self.n_q = 0
        self.n_res = 0
        self.res_slot: int | None = None


@dataclass
class Item:
    """One scheduled sequence in a step: ``n`` new tokens at positions ``start..start+n-1``."""

    st: SeqKV
    start: int
    n: int
    row: int  # first row of its tokens in the flattened batch
    prefill: bool
    last: bool  # this chunk completes the prompt (prefill only)
    # filled by begin_step
    new_len: int = 0
    compact: bool = False
    extra: dict = field(default_factory=dict)


def length_buckets(lens: list[int], ratio: float = 0.6, max_buckets: int = 8,
                   max_tokens: int | None = None) -> list[list[int]]:
    """Indices of ``lens`` split into groups padded to their longest member: sorted longest first, a new
    group starts when a length falls below ``ratio`` x the group's longest (at most ``max_buckets`` such
    groups); a group whose padded size (members x longest) exceeds ``max_tokens`` is cut further, so
    the transient copies of one attention call stay bounded."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    out: list[list[int]] = []
    top = None
    for i in order:
        if top is None or (lens[i] < ratio * top and len(out) < max_buckets):
            out.append([])
            top = lens[i]
        out[-1].append(i)
    if max_tokens:
        cut = []
        for b in out:
            per = max(1, max_tokens // max(1, lens[b[0]]))
            cut.extend(b[j:j + per] for j in range(0, len(b), per))
        out = cut
    return out


def token_groups(lens: list[int], max_tokens: int | None) -> list[list[int]]:
    """Consecutive indices grouped so that each group's total length stays within ``max_tokens``."""
    out, tot = [[]], 0
    for i, n in enumerate(lens):
        if out[-1] and max_tokens and tot + n > max_tokens:
            out.append([])
            tot = 0
        out[-1].append(i)
        tot += n
    return out if out[0] else []


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


class _Pages:
    """Free-list page allocator shared by the stores."""

    def __init__(self, num_pages: int, page_tokens: int, device):
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.device = device
        self.free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def ensure(self, st: SeqKV, n: int) -> None:
        if n - len(st.pages) > len(self.free):
            raise RuntimeError(f"physical KV pages exhausted ({len(self.free)} free, {n - len(st.pages)} needed): "
                               "the block accounting and the physical pool disagree")
        while len(st.pages) < n:
            st.pages.append(self.free.pop())

    def trim(self, st: SeqKV, n: int) -> None:
        while len(st.pages) > n:
            self.free.append(st.pages.pop())

    def table(self, items, npages: list[int]) -> torch.Tensor:
        """Block table ``[len(items), max(npages)]`` (padding: page 0, masked by the lengths)."""
        width = max(1, max(npages) if npages else 1)
        arr = np.zeros((len(items), width), dtype=np.int64)
        for i, (it, k) in enumerate(zip(items, npages)):
            arr[i, :k] = it.st.pages[:k]
        return torch.from_numpy(arr).to(self.device, non_blocking=True)

    def flat_slots(self, st: SeqKV, start: int, stop: int) -> torch.Tensor:
        """Flat token indices (``page * page_tokens + offset``) of cache slots ``start..stop-1``."""
        P = self.page_tokens
        s = torch.arange(start, stop)
        pages = torch.tensor(st.pages, dtype=torch.long)
        return (pages[s // P] * P + s % P).to(self.device, non_blocking=True)


def _flat_from_table(table: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """``[B, nb]`` block table -> ``[B, nb * page_tokens]`` flat token indices."""
    return (table[:, :, None] * page_tokens + torch.arange(page_tokens, device=table.device)).flatten(1)


class KVStore:
    """Interface: paging (mirrors kvsim's block counts) and attention for one step."""

    name = "base"
    paged = True

    def __init__(self, cfg, method, num_blocks: int, block_size: int, device, dtype, max_num_seqs: int,
                 backend: str = "ops", max_attn_tokens: int | None = DEFAULT_MAX_ATTN_TOKENS):
        self.cfg = cfg
        self.method = method
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs
        self.backend = backend
        #: most cached tokens one attention call reads (bounds the transient gather / dequantize copies)
        self.max_attn_tokens = max_attn_tokens
        self.L, self.hkv, self.D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.hq = cfg.num_heads

    # -- paging ----------------------------------------------------------------------------------
    def pages_for_blocks(self, blocks: int) -> int:
        return blocks

    def ensure(self, st: SeqKV, blocks: int) -> None:
        self.pages.ensure(st, self.pages_for_blocks(blocks))

    def trim(self, st: SeqKV, blocks: int) -> None:
        self.pages.trim(st, self.pages_for_blocks(blocks))

    def release(self, st: SeqKV) -> None:
        self.pages.trim(st, 0)
        st.kv_len = 0
        st.qwin = None

    # -- per step ---------------------------------------------------------------------------------
    def begin_step(self, items: list[Item]) -> None:
        raise NotImplementedError

    def attend(self, li: int, q, k, v):
        raise NotImplementedError

    def end_step(self, items: list[Item]) -> None:
        for it in items:
            it.st.kv_len = it.new_len

    @staticmethod
    def bytes_per_token(cfg, method, dtype_bytes: int) -> float:
        """Physical bytes of one kept token, all layers (what sizes the pool from free memory)."""
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes

    @staticmethod
    def fixed_bytes(cfg, method, dtype_bytes: int, max_num_seqs: int) -> int:
        """Memory the store holds besides its pages."""
        return 0


# ================================================================================================
# none / fp8 / streamingllm / snapkv
# ================================================================================================


class PagedStore(KVStore):
    name = "paged"

    def __init__(self, cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend="ops",
                 max_attn_tokens=DEFAULT_MAX_ATTN_TOKENS):
        super().__init__(cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend, max_attn_tokens)
        self.fp8 = method.name == "fp8"
        sdt = ops.FP8 if self.fp8 else dtype
        shape = (num_blocks, block_size, self.hkv, self.D)
        self.k = [torch.zeros(shape, dtype=sdt, device=self.device) for _ in range(self.L)]
        self.v = [torch.zeros(shape, dtype=sdt, device=self.device) for _ in range(self.L)]
        self.pages = _Pages(num_blocks, block_size, self.device)
        #: varlen backend reads the pools through the block table (set when the self-check passed)
        self.varlen_paged = False
        self.k_scale = torch.tensor(1.0, device=self.device)
        self.v_scale = torch.tensor(1.0, device=self.device)
        m = method
        self.limit = None
        if m.name == "streamingllm":
            self.sink, self.window, self.limit = m.sink, m.window, m.sink + m.window
        elif m.name == "snapkv":
            self.limit = m.budget
        elif m.name not in ("none", "fp8"):
            raise ValueError(f"PagedStore cannot run method {m.name}")

    @staticmethod
    def bytes_per_token(cfg, method, dtype_bytes):
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (1 if method.name == "fp8" else dtype_bytes)

    # -- reading the cache -------------------------------------------------------------------------
    def _read_flat(self, li: int, idx: torch.Tensor):
        """K, V ``[N, Hkv, D]`` (compute dtype) of flat slots ``idx``."""
        kf, vf = self.k[li].flatten(0, 1), self.v[li].flatten(0, 1)
        if self.fp8:
            k = ops.fp8_dequantize(kf.view(torch.uint8)[idx].view(ops.FP8), self.k_scale, self.dtype)
            v = ops.fp8_dequantize(vf.view(torch.uint8)[idx].view(ops.FP8), self.v_scale, self.dtype)
            return k, v
        return kf[idx], vf[idx]

    def _write(self, li, k_new, v_new, idx):
        if self.fp8:
            ops.fp8_write_paged(self.k[li], self.v[li], k_new, v_new, idx, self.k_scale, self.v_scale)
        else:
            ops.write_paged(self.k[li], self.v[li], k_new, v_new, idx)

    # -- step --------------------------------------------------------------------------------------
    def begin_step(self, items):
        dev = self.device
        w_rows, w_idx = [], []
        self.compacting, self.regular_prefill, self.decodes = [], [], []
        for it in items:
            st = it.st
            if it.prefill:
                total = st.kv_len + it.n
                if it.last and self.limit is not None and total > self.limit:
                    it.compact = True
                    it.new_len = self.limit
                    it.extra["ctx_idx"] = self.pages.flat_slots(st, 0, st.kv_len)
                    it.extra["dst_idx"] = self.pages.flat_slots(st, 0, self.limit)
                    self.compacting.append(it)
                    continue
                slots = list(range(st.kv_len, total))
                it.new_len = total
                self.regular_prefill.append(it)
            else:
                if self.limit is not None and self.method.name == "streamingllm" and st.kv_len >= self.limit:
                    slots = [self.sink + (it.start - self.sink) % self.window]
                    it.new_len = self.limit
                else:
                    slots = [st.kv_len]
                    it.new_len = st.kv_len + 1
                self.decodes.append(it)
            P = self.block_size
            w_rows.extend(range(it.row, it.row + it.n))
            w_idx.extend(st.pages[s // P] * P + s % P for s in slots)
        self.w_rows = torch.tensor(w_rows, dtype=torch.long).to(dev, non_blocking=True)
        self.w_idx = torch.tensor(w_idx, dtype=torch.long).to(dev, non_blocking=True)
        regular = self.regular_prefill + self.decodes
        if self.method.name == "snapkv":
            for it in self.regular_prefill:
                if it.st.qwin is None:
                    it.st.qwin = [None] * self.L
        if self.backend == "varlen" and regular:
            self._plan_varlen(regular)
        else:
            self._plan_ops()

    def _plan_ops(self):
        P = self.block_size
        for it in self.regular_prefill:
            it.extra["table"] = self.pages.table([it], [-(-it.new_len // P)])
        lens = [it.new_len for it in self.decodes]
        self.buckets = []
        for b in length_buckets(lens, max_tokens=self.max_attn_tokens):
            its = [self.decodes[i] for i in b]
            table = self.pages.table(its, [-(-it.new_len // P) for it in its])
            rows = torch.tensor([it.row for it in its], dtype=torch.long).to(self.device, non_blocking=True)
            seq_lens = torch.tensor([it.new_len for it in its], dtype=torch.long).to(self.device, non_blocking=True)
            self.buckets.append((rows, table, seq_lens))

    def _plan_varlen(self, regular):
        """One varlen call per group of sequences. Paged mode (``varlen_paged``, bf16 only): the kernel
        reads the pools through the block table, nothing is copied; gather mode: the group's valid
        tokens are gathered (and dequantized for fp8) into packed K/V, groups capped at
        ``max_attn_tokens`` cached tokens."""
        P = self.block_size
        dev = self.device
        self.varlen_groups = []
        paged = self.varlen_paged and not self.fp8
        for grp in ([list(range(len(regular)))] if paged
                    else token_groups([it.new_len for it in regular], self.max_attn_tokens)):
            its = [regular[i] for i in grp]
            table = self.pages.table(its, [-(-it.new_len // P) for it in its])
            klens = [it.new_len for it in its]
            qlens = [it.n for it in its]
            rows = torch.cat([torch.arange(it.row, it.row + it.n) for it in its]).to(dev, non_blocking=True)
            cu_q = torch.tensor([0] + list(_cumsum(qlens)), dtype=torch.int32).to(dev, non_blocking=True)
            cu_k = torch.tensor([0] + list(_cumsum(klens)), dtype=torch.int32).to(dev, non_blocking=True)
            if paged:
                kv = (table.to(torch.int32), torch.tensor(klens, dtype=torch.int32).to(dev, non_blocking=True))
            else:
                lens = torch.tensor(klens, dtype=torch.long).to(dev, non_blocking=True)
                flat = _flat_from_table(table, P)
                kv = flat[torch.arange(flat.shape[1], device=dev)[None, :] < lens[:, None]]
            self.varlen_groups.append((kv, rows, cu_q, cu_k, max(qlens), max(klens)))

    def attend(self, li, q, k, v):
        out = torch.empty_like(q)
        if self.w_idx.numel():
            self._write(li, k[self.w_rows], v[self.w_rows], self.w_idx)
        for it in self.compacting:
            self._attend_compacting(li, it, q, k, v, out)
        if self.method.name == "snapkv":
            W = self.method.window
            for it in self.regular_prefill:
                qc = q[it.row:it.row + it.n]
                prev = it.st.qwin[li]
                it.st.qwin[li] = (qc if prev is None else torch.cat((prev, qc)))[-W:]
        if self.backend == "varlen" and (self.regular_prefill or self.decodes):
            from torch.nn.attention.varlen import varlen_attn

            for kv, rows, cu_q, cu_k, max_q, max_k in self.varlen_groups:
                if isinstance(kv, tuple):  # paged: the kernel walks the block table
                    out[rows] = varlen_attn(q[rows], self.k[li], self.v[li], cu_q, cu_k, max_q, max_k,
                                            window_size=(-1, 0), enable_gqa=True, seqused_k=kv[1], block_table=kv[0])
                else:
                    kp, vp = self._read_flat(li, kv)
                    out[rows] = varlen_attn(q[rows], kp, vp, cu_q, cu_k, max_q, max_k, window_size=(-1, 0),
                                            enable_gqa=True)
            return out
        for it in self.regular_prefill:
            kk, vv = self._gather(li, it.extra["table"], it.new_len)
            qq = q[it.row:it.row + it.n].transpose(0, 1)[None]
            out[it.row:it.row + it.n] = ops.sdpa_prefill(qq, kk, vv)[0].transpose(0, 1)
        for rows, table, seq_lens in self.buckets:
            qq = q[rows][:, :, None, :]
            if self.fp8:
                o = ops.paged_decode_attention_fp8(qq, self.k[li], self.v[li], table, self.k_scale, self.v_scale, seq_lens)
            else:
                o = ops.paged_decode_attention(qq, self.k[li], self.v[li], table, seq_lens)
            out[rows] = o[:, :, 0, :]
        return out

    def _gather(self, li, table, length):
        """``[1, Hkv, length, D]`` K and V of one sequence (compute dtype)."""
        if self.fp8:
            b, nb = table.shape

            def load(cache, scale):
                raw = cache.view(torch.uint8)[table].view(ops.FP8)
                return ops.fp8_dequantize(raw, scale, self.dtype).view(b, nb * self.block_size, self.hkv, self.D).transpose(1, 2)

            return load(self.k[li], self.k_scale)[:, :, :length], load(self.v[li], self.v_scale)[:, :, :length]
        return ops.gather_paged(self.k[li], table)[:, :, :length], ops.gather_paged(self.v[li], table)[:, :, :length]

    def _attend_compacting(self, li, it, q, k, v, out):
        """Last prefill chunk of a StreamingLLM / SnapKV sequence whose prompt exceeds what it keeps:
        attend over the cached prefix plus the chunk, then keep only the survivors (first pages)."""
        st = it.st
        kc, vc = self._read_flat(li, it.extra["ctx_idx"])
        kn, vn = k[it.row:it.row + it.n], v[it.row:it.row + it.n]
        kk = torch.cat((kc, kn)).transpose(0, 1)[None]  # [1, Hkv, L, D]
        vv = torch.cat((vc, vn)).transpose(0, 1)[None]
        qq = q[it.row:it.row + it.n].transpose(0, 1)[None]
        out[it.row:it.row + it.n] = ops.sdpa_prefill(qq, kk, vv)[0].transpose(0, 1)
        m = self.method
        if m.name == "streamingllm":
            ks, vs = ops.streaming_compress(kk, vv, m.sink, m.window)
        else:
            W = m.window
            prev = st.qwin[li] if st.qwin is not None else None
            qc = q[it.row:it.row + it.n]
            qwin = (qc if prev is None else torch.cat((prev, qc)))[-W:]
            ks, vs = ops.snapkv_compress(qwin.transpose(0, 1)[None], kk, vv, m.budget, W, m.kernel_size)
            if st.qwin is not None:
                st.qwin[li] = None
        self._write(li, ks[0].transpose(0, 1).contiguous(), vs[0].transpose(0, 1).contiguous(), it.extra["dst_idx"])

    def end_step(self, items):
        super().end_step(items)
        for it in items:
            if it.prefill and it.last:
                it.st.qwin = None


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t


# ================================================================================================
# H2O
# ================================================================================================


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
        self.pages = _Pages(num_blocks, block_size, self.device)
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
            self.full_flat = _flat_from_table(table, P)[:, :self.budget]  # [Bf, budget]
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
            flat = _flat_from_table(table, P)
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


# ================================================================================================
# KIVI
# ================================================================================================


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
        self.P = _lcm(block_size, self.G)
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
        self.pages = _Pages(npages, self.P, dev)
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
                    idx = _flat_from_table(table, self.P)[:, :tq]
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


STORES = {"none": PagedStore, "fp8": PagedStore, "streamingllm": PagedStore, "snapkv": PagedStore,
          "h2o": H2OStore, "kivi": KIVIStore}


#: the kvsim implementation (``impl`` knob) each store runs: the papers' algorithms, as kvprof kernels do
STORE_IMPLEMENTATIONS = {"fp8": "native", "streamingllm": "sliding", "snapkv": "reference", "h2o": "reference",
                         "kivi": "reference"}


def store_method(method, spec_text: str):
    """The method as this engine runs it: a spec that names no ``impl`` gets the store's; one that
    names another is refused (the store would not run what kvsim is asked to cost)."""
    import dataclasses

    want = STORE_IMPLEMENTATIONS.get(method.name)
    have = getattr(method, "impl", None)
    if want is None or have == want:
        return method
    if "impl=" in spec_text:
        raise ValueError(f"kvprof replay runs {method.name} as impl={want} (the paper's algorithm in torch); "
                         f"--method asks for impl={have}")
    return dataclasses.replace(method, impl=want)


def store_class(method):
    try:
        return STORES[method.name]
    except KeyError:
        raise ValueError(f"kvprof replay has no GPU implementation of method {method.name!r}; "
                         f"supported: {', '.join(STORES)}") from None
