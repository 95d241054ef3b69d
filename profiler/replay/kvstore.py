"""The physical KV caches of ``kvprof replay``: GPU tensors addressed by page tables.

How many blocks a sequence holds is decided by kvsim's own ``KVCacheManager`` (the engine drives it);
a store only mirrors those counts with real pages and computes attention over them. This module holds
what every store shares (pages, length buckets, the :class:`KVStore` interface) and :class:`PagedStore`,
vLLM's flash layout: per layer a K and a V pool ``[num_blocks, block_size, Hkv, D]``, one page = one
kvsim block. Each method's own store lives in its module of :mod:`profiler.methods` (fp8: the same pools
in e4m3; StreamingLLM and SnapKV: PagedStore compacting the prompt to what they keep; H2O and KIVI: their
own layouts), named by the method's ``store``.

Methods that are non-paged in kvsim (their reference implementations grow per-request tensors): the
block manager reserves a sequence's lifetime footprint at admission, and the store holds exactly that
reservation as pages from the moment the sequence is admitted until it finishes or is preempted; the
attention reads them through the same gather as the paged methods (a contiguous per-request tensor
would be read by an equivalent gather once sequences of different lengths are batched).

Attention reuses ``profiler.kernels.ops``. The ``varlen`` backend (CUDA) instead runs every scheduled
token of the bf16/fp8 paged stores through one ``torch.nn.attention.varlen.varlen_attn`` call
(FlashAttention varlen, as vLLM's FlashAttention backend): over the paged pools through the block table
when the kernel accepts the block size (no copy), else over the exactly-gathered valid tokens.
"""

from __future__ import annotations

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


class Pages:
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


def flat_from_table(table: torch.Tensor, page_tokens: int) -> torch.Tensor:
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
# the plain paged cache (none; fp8, streamingllm and snapkv subclass it in profiler.methods)
# ================================================================================================


class PagedStore(KVStore):
    """vLLM's paged pools, the plain cache; a method that keeps fewer tokens (a subclass in its module of
    profiler.methods) sets ``keep_limit`` and ``compress`` (compaction after the prompt), ``decode_slot``
    (where a decode token goes), and, to watch the prompt's queries, ``begin_prefills`` and
    ``note_prefill_queries``."""

    name = "paged"
    #: the pools hold fp8 e4m3 (per-tensor scales 1.0, vLLM's default ``kv_cache_dtype=fp8``)
    fp8 = False

    def __init__(self, cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend="ops",
                 max_attn_tokens=DEFAULT_MAX_ATTN_TOKENS):
        super().__init__(cfg, method, num_blocks, block_size, device, dtype, max_num_seqs, backend, max_attn_tokens)
        sdt = ops.FP8 if self.fp8 else dtype
        shape = (num_blocks, block_size, self.hkv, self.D)
        self.k = [torch.zeros(shape, dtype=sdt, device=self.device) for _ in range(self.L)]
        self.v = [torch.zeros(shape, dtype=sdt, device=self.device) for _ in range(self.L)]
        self.pages = Pages(num_blocks, block_size, self.device)
        #: varlen backend reads the pools through the block table (set when the self-check passed)
        self.varlen_paged = False
        self.k_scale = torch.tensor(1.0, device=self.device)
        self.v_scale = torch.tensor(1.0, device=self.device)
        #: most tokens a sequence keeps once its prompt is compacted (None: all of them)
        self.limit = self.keep_limit(method)

    @classmethod
    def bytes_per_token(cls, cfg, method, dtype_bytes):
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (1 if cls.fp8 else dtype_bytes)

    # -- what a method changes ----------------------------------------------------------------------------
    def keep_limit(self, method) -> int | None:
        return None

    def decode_slot(self, st: SeqKV, it: Item) -> tuple[int, int]:
        """(cache slot of the decode token, kept tokens after it)."""
        return st.kv_len, st.kv_len + 1

    def begin_prefills(self, items: list[Item]) -> None:
        """The step's prefill chunks that are not compacted this step."""

    def note_prefill_queries(self, li: int, items: list[Item], q) -> None:
        """Layer ``li``'s queries of those chunks."""

    def compress(self, li: int, it: Item, q, kk, vv):
        """The survivors ``(K, V)`` ``[1, Hkv, limit, D]`` of a prompt of ``kk.shape[2]`` tokens."""
        raise NotImplementedError

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
                slot, it.new_len = self.decode_slot(st, it)
                slots = [slot]
                self.decodes.append(it)
            P = self.block_size
            w_rows.extend(range(it.row, it.row + it.n))
            w_idx.extend(st.pages[s // P] * P + s % P for s in slots)
        self.w_rows = torch.tensor(w_rows, dtype=torch.long).to(dev, non_blocking=True)
        self.w_idx = torch.tensor(w_idx, dtype=torch.long).to(dev, non_blocking=True)
        regular = self.regular_prefill + self.decodes
        self.begin_prefills(self.regular_prefill)
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
                flat = flat_from_table(table, P)
                kv = flat[torch.arange(flat.shape[1], device=dev)[None, :] < lens[:, None]]
            self.varlen_groups.append((kv, rows, cu_q, cu_k, max(qlens), max(klens)))

    def attend(self, li, q, k, v):
        out = torch.empty_like(q)
        if self.w_idx.numel():
            self._write(li, k[self.w_rows], v[self.w_rows], self.w_idx)
        for it in self.compacting:
            self._attend_compacting(li, it, q, k, v, out)
        self.note_prefill_queries(li, self.regular_prefill, q)
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
        """Last prefill chunk of a sequence whose prompt exceeds what the method keeps: attend over the
        cached prefix plus the chunk, then keep only the survivors (first pages)."""
        kc, vc = self._read_flat(li, it.extra["ctx_idx"])
        kn, vn = k[it.row:it.row + it.n], v[it.row:it.row + it.n]
        kk = torch.cat((kc, kn)).transpose(0, 1)[None]  # [1, Hkv, L, D]
        vv = torch.cat((vc, vn)).transpose(0, 1)[None]
        qq = q[it.row:it.row + it.n].transpose(0, 1)[None]
        out[it.row:it.row + it.n] = ops.sdpa_prefill(qq, kk, vv)[0].transpose(0, 1)
        ks, vs = self.compress(li, it, q, kk, vv)
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
