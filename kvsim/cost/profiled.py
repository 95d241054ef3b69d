"""Step time from a measured profile, operation by operation, with the roofline for whatever the
profile does not cover (absent table, point outside the grid, or next to a missing point)."""

from __future__ import annotations

from bisect import bisect_right
from functools import lru_cache
from pathlib import Path

from kvsim.cost.base import CostModel, StepShape
from kvsim.cost.profile import interp_loglog
from kvsim.cost.roofline import RooflineCost
from kvsim.resources import profiles_dir

PROFILES_ROOT = profiles_dir()


def profile_candidates(model: str, hardware: str, tp: int, root: Path | None = None) -> list[Path]:
    """Committed kernel profiles named ``<hardware>__<model>__tp<N>.json`` that kvsim uses without being
    asked: those imported from real serving-engine timings (``imported/``). A kvprof kernel grid
    (``kvprof/``) times eager torch kernels one at a time, launch gaps and a gathered paged cache
    included; summed into a step it came out 2.0-3.0x the same step replayed as a CUDA graph on the H200
    it was measured on (docs/kvprof-kernels.md), so it is used only when given with ``--profile``."""
    root = root or PROFILES_ROOT
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob(f"{hardware}__{model}__tp{tp}.json") if "kvprof" not in p.parts)


def find_profile(model: str, hardware: str, tp: int):
    """The committed profile for this (model, hardware, TP), or None (then the roofline is used)."""
    from kvsim.cost.profile import load_profile

    for p in profile_candidates(model, hardware, tp):
        return load_profile(p)
    return None


@lru_cache(maxsize=1)
def length_profiles():
    """The committed ``kvprof lengths`` profiles (``kvsim/profiles/lengths/*.json``), loaded once. Which one a run
    uses is decided in kvsim.engine.output_length.choose_length_ratio."""
    from kvsim.cost.profile import load_profile

    d = PROFILES_ROOT / "lengths"
    return [(p, load_profile(p)) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def prefill_lookup(table, q: int, kv: int):
    """Prefill attention at (chunk q, kv = q + history). Pure prefills sit on the diagonal kv = q,
    whose lower neighbours are impossible (null) cells, so the plain bilinear lookup fails there;
    then interpolate between the two measured chunk rows at the same history instead."""
    v = table.lookup_at(q, kv)
    if v is not None:
        return v
    xs = table.axes[table.axis_names[0]]
    if not (xs[0] <= q <= xs[-1]):
        return None
    i = bisect_right(xs, q) - 1
    if xs[i] == q or i + 1 >= len(xs):
        return None
    h = kv - q
    c0, c1 = xs[i], xs[i + 1]
    v0, v1 = table.lookup_at(c0, c0 + h), table.lookup_at(c1, c1 + h)
    if v0 is None or v1 is None:
        return None
    return interp_loglog(q, c0, v0, c1, v1)


def linear_edge_lookup(table, x) -> float:
    """Per-step tables (embedding, sampler, final norm) scale linearly in tokens: beyond the grid,
    scale the nearest edge value instead of dropping the operation."""
    xs = table.axes[table.axis_names[0]]
    if x > xs[-1]:
        edge = table.lookup_at(xs[-1])
        return (edge or 0.0) * x / xs[-1]
    if x < xs[0]:
        return table.lookup_at(xs[0]) or 0.0
    v = table.lookup_at(x)
    return v if v is not None else 0.0


class ProfiledCost(CostModel):
    """Each operation from the profile's table when the point is inside its measured grid, else from
    the roofline. Decode attention of a method without its own table is the measured full-cache time
    scaled by the roofline's ratio (method / full cache) at the same batch and context, so the
    measured baseline carries over and only the method's relative cost is modelled.
    """

    LINEAR = ("qkv", "o", "mlp", "other")

    def __init__(self, profile, fallback: RooflineCost):
        from kvsim.methods.none import NoCompression

        self.profile = profile
        self.roof = fallback
        self.model = fallback.model
        self.method = fallback.method
        self.name = f"profile {profile.name}"
        t = profile.tables
        self._linear = {op: t.get(f"linear.{'moe' if op == 'mlp' and self.model.is_moe else op}") for op in self.LINEAR}
        self._lm_head = t.get("linear.lm_head")
        self._allreduce = t.get("comm.all_reduce")
        self._step_tok = [tab for name, tab in t.items() if name.startswith("step.") and tab.axis_names == ("num_tokens",)]
        self._step_seq = [tab for name, tab in t.items() if name.startswith("step.") and tab.axis_names == ("batch_size",)]
        #: once-per-step kernels the profile lacks come from the roofline (Vidur has no final norm or sampler)
        self._step_roof_tok = [op for op in ("embedding", "final_norm") if f"step.{op}" not in t]
        self._step_roof_seq = [op for op in ("sampler",) if f"step.{op}" not in t]
        #: expert parallelism: the profile times all experts on one GPU; a rank holds E / ep of them
        self._moe_by_experts = t.get("linear.moe_by_experts") if (self.model.is_moe and fallback.ep > 1) else None
        self._prefill = t.get(f"attention.prefill.{self.method.prefill_attention}")
        # measured as bf16 KV with FlashAttention, so it stands for the uncompressed cache only
        self._mixed = t.get("attention.mixed.flash") if self.method.name == "none" else None
        # a profile's method tables time one implementation of the method (kvprof records which); another
        # implementation of the same method is costed from the full-cache tables and its own terms
        timed = (profile.provenance.get("implementations") or {}).get(self.method.name, "?")
        own = self.method.name == "none" or timed == getattr(self.method, "impl", None)
        name = self.method.name if own else "-"
        self._decode = t.get(f"attention.decode.{name}")
        self._decode_scaled = None
        if self._decode is None and self.method.name != "none":
            self._decode_scaled = t.get("attention.decode.none")
            self._roof_none = RooflineCost(fallback.model, fallback.hw, NoCompression(), fallback.tp, fallback.params, fallback.ep)
        self._extra_decode = t.get(f"extra.decode.{name}")
        self._extra_prefill = t.get(f"extra.prefill.{name}")
        # a profile of kernel times only (no step_overhead_s) gets the roofline's a-priori time outside
        # kernels: per step, and per layer (gaps between a layer's kernels in a CUDA-graph replay)
        self.step_overhead_s = (profile.step_overhead_s if "step_overhead_s" in profile.data
                                else fallback.params.step_overhead_s
                                + self.model.num_layers * fallback.params.layer_overhead_s)
        self._dense_cache: dict[int, float] = {}
        # a profile's own measured skew (imported from LLMServingSim's skew.csv) wins over the roofline's
        skew = profile.decode_skew_alpha
        self._skew_decode = skew.get("decode", fallback.params.attn_skew_decode)
        self._skew_mixed = skew.get("mixed", fallback.params.attn_skew_mixed)
        self.hits = 0
        self.misses = 0

    def _get(self, table, fallback_fn, *point):
        if table is not None:
            v = table.lookup_at(*point)
            if v is not None:
                self.hits += 1
                return v
        self.misses += 1
        return fallback_fn()

    def dense_time_s(self, T: int, rows: int) -> float:
        roof = self.roof
        works = None
        per_layer = 0.0
        for op in self.LINEAR:
            tab = self._linear[op]
            if op == "mlp" and self._moe_by_experts is not None:
                v = self._moe_rank_time(T * roof.ep)
            else:
                v = tab.lookup_at(T) if tab is not None else None
            if v is None:
                works = works or roof.linear_works(T)
                v = roof.linear_time_s(op, T, works)
                self.misses += 1
            else:
                self.hits += 1
            per_layer += v
        if roof.tp > 1:
            nbytes = T * self.model.hidden_size * self.model.dtype_bytes
            per_layer += 2 * self._get(self._allreduce, lambda: roof.allreduce_time_s(T) / 2, nbytes)
        per_layer += roof.alltoall_time_s(T)
        t = self.model.num_layers * per_layer
        t += self._get(self._lm_head, lambda: roof.lm_head_time_s(rows), rows) if rows else 0.0
        for tab in self._step_tok:
            t += linear_edge_lookup(tab, T)
        if rows:
            for tab in self._step_seq:
                t += linear_edge_lookup(tab, rows)
        for op in self._step_roof_tok:
            t += roof.step_op_time_s(op, T)
        for op in self._step_roof_seq:
            t += roof.step_op_time_s(op, rows)
        return t + self.step_overhead_s

    def moe_time_s(self, T: int) -> float:
        if not self.model.is_moe or T == 0:
            return 0.0
        return self.moe_group_time_s(T * self.roof.ep, T)

    def moe_group_time_s(self, gathered_tokens: int, largest_share: int) -> float:
        if not self.model.is_moe or gathered_tokens == 0:
            return 0.0
        roof = self.roof
        v = None
        if self._moe_by_experts is not None:
            v = self._moe_rank_time(gathered_tokens)
        elif self._linear["mlp"] is not None:
            v = self._linear["mlp"].lookup_at(gathered_tokens / roof.ep)
        if v is None:
            v = roof.moe_compute_time_s(gathered_tokens)
        return self.model.num_layers * (v + roof.alltoall_time_s(largest_share))

    def _moe_rank_time(self, gathered: float):
        """One expert-parallel rank's MoE block over the ``gathered`` tokens of its group (vLLM 0.19's
        all-gather dispatch; ``RooflineCost`` docstring): the gathered x top_k / ep token-expert pairs
        that land on its E / ep experts, i.e. those of gathered / ep tokens, over the local experts the
        gathered tokens touch, looked up in the profile's (tokens, activated experts) grid; None outside
        it. The grid times one GPU holding all E experts, so the element-wise kernels that vLLM runs
        over every gathered pair (activation, ``moe_sum``) are charged for the local pairs only."""
        m, ep = self.model, self.roof.ep
        E, k = m.num_experts, m.num_experts_per_tok
        local = (E / ep) * (1.0 - (1.0 - k / E) ** gathered)
        tab = self._moe_by_experts
        ax = tab.axes["activated_experts"]
        # the grid's smallest expert count is top_k: fewer distinct local experts cost no less than that
        return tab.lookup_at(gathered / ep, min(max(local, ax[0]), ax[-1]))

    def _decode_table_s(self, B: int, kept: int):
        """The measured decode attention of B sequences at kept / B tokens each, None off the grid."""
        ctx = kept / B
        if self._decode is not None:
            v = self._decode.lookup_at(B, ctx)
            return self.model.num_layers * v if v is not None else None
        if self._decode_scaled is not None:
            v = self._decode_scaled.lookup_at(B, ctx)
            if v is not None:
                roof = self.roof
                return (self.model.num_layers * v * roof.decode_attention_time_s(B, kept)
                        / self._roof_none.decode_attention_time_s(B, kept))
        return None

    def decode_skew_s(self, B: int, kept: int, max_kept: int) -> float:
        """What unequal contexts add to a decode call (the roofline's ``decode_skew_s`` on measured
        times): alpha of the gap between the batch at the largest and at the mean kept count."""
        hi = max_kept * B
        if not self._skew_decode or hi <= kept:
            return 0.0
        t_hi, t_mean = self._decode_table_s(B, hi), self._decode_table_s(B, kept)
        if t_hi is None or t_mean is None:
            roof = self.roof
            t_hi, t_mean = roof.decode_kernel_s(B, hi), roof.decode_kernel_s(B, kept)
        return self._skew_decode * (t_hi - t_mean)

    def decode_attention_time_s(self, B: int, kept: int) -> float:
        if B == 0:
            return 0.0
        roof, L = self.roof, self.model.num_layers
        ctx = kept / B
        t = self._decode_table_s(B, kept)
        if t is None:
            self.misses += 1
            return roof.decode_attention_time_s(B, kept)
        self.hits += 1
        if self._extra_decode is not None:
            e = self._extra_decode.lookup_at(B, ctx)
            if e is not None:
                return t + L * e
        # the roofline's method-extra part (decode_attention_time_s includes both; subtract attention)
        extra = roof._t(roof.method.decode_extra_work(self.model, roof.tp, B, kept))
        return t + L * extra

    def prefill_attention_time_s(self, chunks) -> float:
        roof, L, m = self.roof, self.model.num_layers, self.model
        t = 0.0
        for q, kv, last in chunks:
            v = prefill_lookup(self._prefill, q, kv) if self._prefill is not None else None
            if v is None:
                self.misses += 1
                v = roof.attention_time_s(self.method.prefill_attention_work(m, roof.tp, q, kv), 1, q)
            else:
                self.hits += 1
            e = self._extra_prefill.lookup_at(q, kv) if self._extra_prefill is not None else None
            if e is None:
                e = roof._t(self.method.prefill_extra_work(m, roof.tp, q, kv, last))
            t += v + e
        if chunks:
            t += roof._t(self.method.prefill_call_work(m, roof.tp, chunks))
        return L * t

    def step_time_s(self, shape: StepShape) -> float:
        if not shape.prefill_chunks:
            return self.decode_step_time_s(shape.num_decode_seqs, shape.decode_kept_tokens, shape.decode_max_kept)
        # decodes in a step that prefills are rows of one variable-length prefill call (vLLM V1): the
        # profile's pure-decode table does not apply. One chunk with decodes is the shape the mixed table
        # measured; otherwise the roofline fitted on this GPU's prefill kernel costs the decode rows
        B, kept, roof = shape.num_decode_seqs, shape.decode_kept_tokens, self.roof
        attn = None
        if self._mixed is not None and B and len(shape.prefill_chunks) == 1:
            q, kv, _ = shape.prefill_chunks[0]
            attn = self._mixed.lookup_at(q, kv - q, B, kept / B)
            if attn is not None:
                self.hits += 1
                attn *= self.model.num_layers
        if attn is None:
            attn = roof.mixed_decode_attention_time_s(B, kept) + self.prefill_attention_time_s(shape.prefill_chunks)
        return (self.dense_time_s(shape.num_tokens, shape.num_logit_tokens) + attn
                + roof.mixed_skew_s(B, kept, shape.decode_max_kept, self._skew_mixed))

    def decode_step_time_s(self, num_seqs: int, kept_tokens_sum: int, max_kept: int = 0) -> float:
        dense = self._dense_cache.get(num_seqs)
        if dense is None:
            dense = self._dense_cache[num_seqs] = self.dense_time_s(num_seqs, num_seqs)
        t = dense + self.decode_attention_time_s(num_seqs, kept_tokens_sum)
        if self._skew_decode and max_kept * num_seqs > kept_tokens_sum:
            t += self.decode_skew_s(num_seqs, kept_tokens_sum, max_kept)
        return t
