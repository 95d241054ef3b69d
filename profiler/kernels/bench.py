"""One point of the kernel grid: the kernel to time and how to build its inputs (a :class:`Bench`), on
one GPU's shard of the model (:class:`Shapes`), with inputs made by a :class:`Ctx`. The linear layers and
the prefill attention kernels are here; each method's own tables (its decode attention and the work it
adds in prefill and decode) are built by its module in :mod:`profiler.methods`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kvsim.specs.model import ModelSpec
from profiler.kernels import ops


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
    def __init__(self, model: ModelSpec, methods: dict, device: str, dtype: torch.dtype, tp: int, grid,
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

    def method(self, name: str):
        """The kvsim Method being measured under ``name`` (its knobs are attributes: ``.bits``, ``.budget``)."""
        return self.methods[name]

    # -- inputs the methods' decode tables share --------------------------------------------------------
    def queries(self, B: int):
        """One decode query per sequence ``[B, Hq, 1, D]``."""
        return self.rnd(B, self.s.hq, 1, self.s.d)

    def paged_cache(self, B: int, KV: int, dtype=None):
        """K and V pools of ``B`` sequences of ``KV`` tokens in vLLM's flash layout, a shuffled block
        table and the lengths (None when every block is full)."""
        s, bs = self.s, self.grid.block_size
        nb = -(-KV // bs)
        kc, vc = self.rnd(B * nb, bs, s.hkv, s.d), self.rnd(B * nb, bs, s.hkv, s.d)
        if dtype == ops.FP8:
            kc, vc = kc.to(ops.FP8), vc.to(ops.FP8)
        table = torch.randperm(B * nb, device=self.device).view(B, nb)
        lens = None if KV % bs == 0 else torch.full((B,), KV, device=self.device)
        return kc, vc, table, lens

    def contiguous_cache(self, B: int, KV: int):
        """K and V ``[B, Hkv, KV, D]`` (per-request contiguous tensors, HF style)."""
        s = self.s
        return self.rnd(B, s.hkv, KV, s.d), self.rnd(B, s.hkv, KV, s.d)

    def paged_decode(self, B: int, KV: int) -> "Bench":
        """Decode attention over the plain cache: paged (gathering blocks), or contiguous with
        ``contiguous_decode`` (the kernel without the gather)."""
        e, kv_elems = self.esize, B * KV * self.s.hkv * self.s.d
        flops = 4.0 * B * self.s.hq * self.s.d * KV
        if self.contiguous_decode:
            return Bench(ops.decode_attention, lambda r: (self.queries(B), *self.contiguous_cache(B, KV)),
                         flops=flops, bytes=2.0 * e * kv_elems)
        return Bench(ops.paged_decode_attention, lambda r: (self.queries(B), *self.paged_cache(B, KV)),
                     flops=flops, bytes=6.0 * e * kv_elems)


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


def _prefill_attention(table: str, C: int, KV: int, c: Ctx) -> Bench:
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
    raise KeyError(table)
