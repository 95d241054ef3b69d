"""The embedded default cost model: a roofline per operation of one transformer layer.

For every operation ``op`` of a step the model counts FLOPs and bytes moved on one GPU and takes

    t_op = max(flops / (peak_flops * eff_flops), bytes / (mem_bw * eff_mem)) + kernel_overhead_s

(``peak_flops`` is the dense fp16/bf16 tensor peak, or the fp8 peak for an fp8 model). A step is

    t_step = num_layers * (t_qkv + t_o + t_mlp + t_other + t_attn_prefill + t_attn_decode
                           + t_method_extra + t_allreduce) + t_lm_head + step_overhead_s

Counts, with T new tokens in the step, h hidden size, q = heads x head_dim, k = kv_heads x head_dim,
i intermediate size, p = tensor-parallel degree, b bytes per weight/activation element:

- QKV: flops 2 T h (q + 2k) / p; bytes b (h (q + 2k) / p + T h + T (q + 2k) / p)   (weights read once)
- O:   flops 2 T q h / p;       bytes b (q h / p + T q / p + T h)
- MLP (gated): flops 6 T h i / p; bytes b (3 h i / p + T h + 3 T i / p)
- MoE: as MLP over the experts each token activates (top-k); weight bytes of the distinct experts the
  step touches, E (1 - (1 - k/E)^T) experts in expectation; router 2 T h E flops
- other (2 RMSNorms, rotary, 2 residual adds): memory bound, bytes 10 T h b
- attention: from the compression method (``Method.prefill_attention_work`` /
  ``decode_attention_work`` and the ``*_extra_work`` hooks), so each method's kernel path is costed
- all-reduce (p > 1): 2 per layer of T h b bytes, ring: 2 (p-1)/p x bytes / interconnect + latency
- LM head: flops 2 R h V / p, bytes b (h V / p + R h) for the R rows that sample a token

The efficiency terms live in :class:`RooflineParams`; ``kvsim/cost/calibration.yaml`` holds values
fitted on published real-GPU timings per hardware (see README, "Calibration"), and the generic
defaults below are used for hardware without a fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from importlib import resources

import yaml

from kvsim.cost.base import CostModel, StepShape
from kvsim.cost.work import Work
from kvsim.methods.base import Method
from kvsim.specs.hardware import HardwareSpec
from kvsim.specs.model import ModelSpec


@dataclass(frozen=True)
class RooflineParams:
    #: achieved fraction of peak tensor FLOP/s in large GEMMs
    eff_flops: float = 0.7
    #: achieved fraction of peak memory bandwidth for streaming reads (weights, KV)
    eff_mem: float = 0.8
    #: achieved fraction of peak FLOP/s in attention kernels
    eff_attn_flops: float = 0.5
    #: fixed time per kernel launch-and-drain, charged once per operation per layer
    kernel_overhead_s: float = 4e-6
    #: fixed time per engine step (scheduler, sampler, input preparation)
    step_overhead_s: float = 2e-3
    #: all-reduce latency per call
    allreduce_latency_s: float = 10e-6
    #: where these values came from
    source: str = "generic defaults (uncalibrated)"


def calibrated_params(hardware: str) -> RooflineParams:
    """Fitted params for this hardware if ``calibration.yaml`` has them, else the generic defaults."""
    try:
        text = resources.files("kvsim.cost").joinpath("calibration.yaml").read_text()
    except FileNotFoundError:
        return RooflineParams()
    table = (yaml.safe_load(text) or {}).get("hardware", {})
    entry = table.get(hardware) or table.get("default")
    if not entry:
        return RooflineParams()
    known = {f.name for f in fields(RooflineParams)}
    return replace(RooflineParams(), **{k: v for k, v in entry.items() if k in known})


class RooflineCost(CostModel):
    def __init__(self, model: ModelSpec, hardware: HardwareSpec, method: Method | None = None,
                 tensor_parallel_size: int = 1, params: RooflineParams | None = None,
                 expert_parallel_size: int = 1):
        from kvsim.methods.none import NoCompression

        self.model, self.hw = model, hardware
        self.method = method or NoCompression()
        self.tp = tensor_parallel_size
        self.ep = expert_parallel_size
        self.params = params or calibrated_params(hardware.name)
        self.name = "roofline"
        self.peak_flops = hardware.fp8_flops if (model.dtype_bytes == 1 and hardware.fp8_flops) else hardware.fp16_flops
        self._flops_rate = self.peak_flops * self.params.eff_flops
        self._attn_rate = self.peak_flops * self.params.eff_attn_flops
        self._bw = hardware.mem_bw_bytes_per_s * self.params.eff_mem
        self._dense_cache: dict[int, float] = {}
        self._affine: dict[int, object] = {}
        self._decode_coef: dict[int, object] = {}

    # -- primitives --------------------------------------------------------------------------
    def _t(self, w: Work, attn: bool = False) -> float:
        if w.flops == 0.0 and w.bytes == 0.0:
            return 0.0
        rate = self._attn_rate if attn else self._flops_rate
        return max(w.flops / rate, w.bytes / self._bw) + self.params.kernel_overhead_s

    # -- per-layer linear work over T tokens ----------------------------------------------------
    def linear_works(self, T: int) -> dict[str, Work]:
        m, p, b = self.model, self.tp, self.model.dtype_bytes
        h, q, k = m.hidden_size, m.q_size, m.kv_size
        works = {
            "qkv": Work(2.0 * T * h * (q + 2 * k) / p, b * (h * (q + 2 * k) / p + T * h + T * (q + 2 * k) / p)),
            "o": Work(2.0 * T * q * h / p, b * (q * h / p + T * q / p + T * h)),
            "other": Work(0.0, 10.0 * T * h * b),
        }
        if m.is_moe:
            E, topk, ie = m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size
            touched = E * (1.0 - (1.0 - topk / E) ** T)
            experts_here = touched / self.ep
            flops = 6.0 * T * topk * h * ie / (p * self.ep) + 2.0 * T * h * E
            shared = m.num_shared_experts * 3 * h * ie
            works["mlp"] = Work(flops + 6.0 * T * h * m.num_shared_experts * ie / p,
                                b * (experts_here * 3 * h * ie / p + shared / p + h * E + 2 * T * h + 3 * T * topk * ie / p))
        else:
            i = m.intermediate_size
            works["mlp"] = Work(6.0 * T * h * i / p, b * (3 * h * i / p + T * h + 3 * T * i / p))
        return works

    def allreduce_time_s(self, T: int) -> float:
        if self.tp == 1:
            return 0.0
        nbytes = T * self.model.hidden_size * self.model.dtype_bytes
        ring = 2.0 * (self.tp - 1) / self.tp * nbytes / self.hw.interconnect_bw_bytes_per_s
        return 2.0 * (ring + self.params.allreduce_latency_s)

    def lm_head_time_s(self, rows: int) -> float:
        if rows == 0:
            return 0.0
        m, b = self.model, self.model.dtype_bytes
        return self._t(Work(2.0 * rows * m.hidden_size * m.vocab_size / self.tp,
                            b * (m.hidden_size * m.vocab_size / self.tp + rows * m.hidden_size)))

    def dense_time_s(self, T: int, logit_rows: int) -> float:
        """Everything of a step that depends only on token counts (not on attention)."""
        per_layer = sum(self._t(w) for w in self.linear_works(T).values()) + self.allreduce_time_s(T)
        return self.model.num_layers * per_layer + self.lm_head_time_s(logit_rows) + self.params.step_overhead_s

    # -- attention ---------------------------------------------------------------------------------
    def decode_attention_time_s(self, num_seqs: int, kept: int) -> float:
        if num_seqs == 0:
            return 0.0
        coef = self._affine.get(num_seqs)
        if coef is None:
            coef = self._affine[num_seqs] = self._affine_coefficients(num_seqs)
        if coef is False:
            return self._decode_attention_direct(num_seqs, kept)
        fa0, fa1, ba0, ba1, fe0, fe1, be0, be1 = coef
        ko = self.params.kernel_overhead_s
        t = max((fa0 + fa1 * kept) / self._attn_rate, (ba0 + ba1 * kept) / self._bw) + ko
        fe, be = fe0 + fe1 * kept, be0 + be1 * kept
        if fe or be:
            t += max(fe / self._flops_rate, be / self._bw) + ko
        return self.model.num_layers * t

    def _decode_attention_direct(self, num_seqs: int, kept: int) -> float:
        m, tp = self.model, self.tp
        t = self._t(self.method.decode_attention_work(m, tp, num_seqs, kept), attn=True)
        t += self._t(self.method.decode_extra_work(m, tp, num_seqs, kept))
        return m.num_layers * t

    def _affine_coefficients(self, B: int):
        """Per batch size, decode work is affine in the kept-token sum for every shipped method;
        precomputing the coefficients makes the fast-forward loop cheap. Checked at a third point, and
        a method whose work is not affine is costed by direct calls instead."""
        m, tp, meth = self.model, self.tp, self.method
        x1 = 1 << 20
        a0, a1 = meth.decode_attention_work(m, tp, B, 0), meth.decode_attention_work(m, tp, B, x1)
        e0, e1 = meth.decode_extra_work(m, tp, B, 0), meth.decode_extra_work(m, tp, B, x1)
        coef = (a0.flops, (a1.flops - a0.flops) / x1, a0.bytes, (a1.bytes - a0.bytes) / x1,
                e0.flops, (e1.flops - e0.flops) / x1, e0.bytes, (e1.bytes - e0.bytes) / x1)
        x = 98_765
        for w, c0, c1 in ((meth.decode_attention_work(m, tp, B, x), 0, 2), (meth.decode_extra_work(m, tp, B, x), 4, 6)):
            if not (math.isclose(w.flops, coef[c0] + coef[c0 + 1] * x, rel_tol=1e-9, abs_tol=1e-6)
                    and math.isclose(w.bytes, coef[c1] + coef[c1 + 1] * x, rel_tol=1e-9, abs_tol=1e-6)):
                return False
        return coef

    def prefill_attention_time_s(self, chunks) -> float:
        m, tp, meth = self.model, self.tp, self.method
        t = 0.0
        for q, kv, last in chunks:
            t += self._t(meth.prefill_attention_work(m, tp, q, kv), attn=True)
            t += self._t(meth.prefill_extra_work(m, tp, q, kv, last))
        return m.num_layers * t

    # -- the interface -----------------------------------------------------------------------------
    def step_time_s(self, shape: StepShape) -> float:
        if not shape.prefill_chunks:
            return self.decode_step_time_s(shape.num_decode_seqs, shape.decode_kept_tokens)
        dense = self.dense_time_s(shape.num_tokens, shape.num_logit_tokens)
        return (dense + self.decode_attention_time_s(shape.num_decode_seqs, shape.decode_kept_tokens)
                + self.prefill_attention_time_s(shape.prefill_chunks))

    def decode_step_time_s(self, num_seqs: int, kept_tokens_sum: int) -> float:
        c = self._decode_coef.get(num_seqs)
        if c is None:
            c = self._decode_coef[num_seqs] = self._decode_coefficients(num_seqs)
        if c is False:
            return self._dense(num_seqs) + self.decode_attention_time_s(num_seqs, kept_tokens_sum)
        # the same arithmetic as dense + decode_attention_time_s, pre-multiplied per batch size
        base, p0, p1, q0, q1, e = c
        t = base + max(p0 + p1 * kept_tokens_sum, q0 + q1 * kept_tokens_sum)
        if e is not None:
            f = e[0] + e[1] * kept_tokens_sum
            g = e[2] + e[3] * kept_tokens_sum
            if f or g:
                t += max(f, g) + e[4]
        return t

    def _dense(self, B: int) -> float:
        dense = self._dense_cache.get(B)
        if dense is None:
            dense = self._dense_cache[B] = self.dense_time_s(B, B)
        return dense

    def _decode_coefficients(self, B: int):
        coef = self._affine.get(B)
        if coef is None:
            coef = self._affine[B] = self._affine_coefficients(B)
        if coef is False:
            return False
        fa0, fa1, ba0, ba1, fe0, fe1, be0, be1 = coef
        L, ko = self.model.num_layers, self.params.kernel_overhead_s
        extra = None
        if fe0 or fe1 or be0 or be1:
            extra = (L * fe0 / self._flops_rate, L * fe1 / self._flops_rate, L * be0 / self._bw, L * be1 / self._bw, L * ko)
        return (self._dense(B) + L * ko, L * fa0 / self._attn_rate, L * fa1 / self._attn_rate,
                L * ba0 / self._bw, L * ba1 / self._bw, extra)

    def breakdown(self, shape: StepShape) -> dict[str, float]:
        L = self.model.num_layers
        out = {k: L * self._t(w) for k, w in self.linear_works(shape.num_tokens).items()}
        out["allreduce"] = L * self.allreduce_time_s(shape.num_tokens)
        out["lm_head"] = self.lm_head_time_s(shape.num_logit_tokens)
        out["attn_decode"] = self.decode_attention_time_s(shape.num_decode_seqs, shape.decode_kept_tokens)
        out["attn_prefill"] = self.prefill_attention_time_s(shape.prefill_chunks)
        out["step_overhead"] = self.params.step_overhead_s
        out["total"] = self.step_time_s(shape)
        return out


def tokens_per_second_limit(cost: RooflineCost, batch: int, context: int) -> float:
    """Decode tokens/s a replica reaches at a fixed batch and context (for physics checks)."""
    return batch / cost.decode_step_time_s(batch, batch * context)


__all__ = ["RooflineCost", "RooflineParams", "calibrated_params", "tokens_per_second_limit"]
