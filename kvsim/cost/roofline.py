"""The embedded default cost model: a roofline per operation of one transformer layer.

For every operation of a step the model counts FLOPs ``F`` and bytes moved ``B`` on one GPU, and the
number of kernels ``n`` it launches. ``P`` is the dense fp16/bf16 tensor peak (the fp8 peak for an fp8
model), ``W`` the peak memory bandwidth, ``X`` the per-GPU interconnect bandwidth (one direction).

    GEMM over T tokens:   t = max(F / (P eff_gemm(T)), B / (W eff_mem)) + n kernel_overhead_s
                          eff_gemm(T) = eff_flops T / (T + gemm_half_tokens)
    element-wise op:      t = B / (W eff_elem) + n elem_overhead_s
                          (eff_elem > 1 where activations stay in the L2 cache between kernels)
    attention (one call): t = max(F' / (P eff_attn_flops), B / (W eff_attn_mem)) + s attn_seq_overhead_s
                              + attn_overhead_s   (the KV-cache write and the attention kernel)
                          s sequences; for a prefill chunk of q tokens over H query heads
                          F' = F max(H max(q, attn_q_tile), attn_ctas attn_q_tile) / (H q):
                          a partial query tile costs a whole one, and a call with fewer than
                          attn_ctas tiles leaves the GPU partly idle (wave quantisation)
    all-reduce of S bytes over p GPUs (ring):  t = allreduce_latency_s + 2 (p-1)/p S / (X eff_comm)
                          or, where the hardware spec has a figure for its machine's collectives (one
                          ring step: bandwidth C, latency c): t = 2 (p-1) (c + S / (p C)),
                          or, where it has vLLM's own NVLink all-reduce (one shot latency a, per-GPU
                          read bandwidth A): t = min(a + (p-1) S / A, 2 a + 2 (p-1)/p S / A)
    decodes of unequal context: t = t_attn(mean) + alpha (t_attn(max) - t_attn(mean)), where t_attn(x)
                          is the attention of the same batch with every decode at x kept tokens and
                          alpha = attn_skew_decode (pure decode call) or attn_skew_mixed (decodes as
                          rows of a prefill call), fitted on LLMServingSim's skew.csv (docs/reference-data.md)

``eff_gemm(T)`` is the achieved fraction of peak of a GEMM whose M dimension is T tokens: it rises to
``eff_flops`` for large T and is lower for small T (tile and wave quantisation), which in time is a
floor of ``gemm_half_tokens`` tokens' worth of FLOPs on every GEMM. A step is

    t_step = num_layers * (t_qkv + t_o + t_mlp + t_other + t_attn_prefill + t_attn_decode
                           + t_method_extra + t_allreduce + t_alltoall + layer_overhead_s)
             + t_lm_head + t_embedding + t_final_norm + t_sampler + step_overhead_s

Counts, with T new tokens in the step, R rows that sample a token, h hidden size, q = heads x head_dim,
k = kv_heads x head_dim, i intermediate size, V vocabulary, p tensor-parallel degree, b bytes per
weight/activation element:

- QKV (GEMM, 1 kernel): F 2 T h (q + 2k) / p; B b (h (q + 2k) / p + T h + T (q + 2k) / p) (weights read once)
- O (GEMM, 1):          F 2 T q h / p;       B b (q h / p + T q / p + T h)
- MLP (gated; GEMM, 3: gate_up, activation, down): F 6 T h i / p; B b (3 h i / p + T h + 3 T i / p)
- MoE (GEMM, 6: router, top-k, align, two grouped GEMMs, activation) with E experts of width i_e, top-k
  routing and ``e`` expert-parallel ranks. vLLM 0.19's default EP backend, ``allgather_reducescatter``
  (``vllm/config/parallel.py`` ``ParallelConfig.all2all_backend``; ``AgRsAll2AllManager`` in
  ``vllm/distributed/device_communicators/all2all.py``), all-gathers the hidden states and router logits
  of all ranks before each MoE layer, runs the rank's E / e local experts over the gathered N tokens
  (``expert_map``: pairs routed elsewhere are skipped) and reduce-scatters the outputs. A rank thus
  computes N k / e token-expert pairs in expectation, i.e. the pairs of T' = N / e tokens
  (F 6 T' k h i_e / p + router 2 T' h E), and reads the weights of the distinct local experts the N
  tokens touch, (E / e) (1 - (1 - k/E)^N) (``moe_compute_time_s``). A rank's own step assumes every rank
  carries its T (N = e T); a lockstep group charges the group's actual N (``moe_group_time_s``,
  kvsim.engine.sim). The exchange of a layer whose largest per-rank share is S tokens: an all-gather of
  S (h + E) b and a reduce-scatter of S h b bytes a rank, (e-1) (c + S (h + E) b / C) + (e-1) (c + S h b / C)
  with the machine's figure (the ring; exact for 2 ranks, whose two shares cross the link at once),
  else 2 allreduce_latency_s + (e-1) S (2h + E) b / (X eff_comm)
- other (element-wise, 3 kernels as vLLM runs them: 2 fused add+RMSNorm, rotary): B T (8 h + 2 (q + 2k)) b
- attention: from the compression method (``Method.prefill_attention_work`` /
  ``decode_attention_work`` and the ``*_extra_work`` hooks), so each method's kernel path is costed.
  A step that prefills runs all its attention as one variable-length prefill call (vLLM V1), so its
  decodes are one-query rows of that call: each pays a whole query tile per head (F' above with q = 1),
  without the decode kernel's split-KV and grouped-query packing
- all-reduce (p > 1): 2 per layer of T h b bytes
- LM head (GEMM over R rows): F 2 R h V / p, B b (h V / p + R h); embedding (1 kernel) B 2 T h b;
  final norm (1) B 4 T h b; sampler (6, greedy: fp32 logits written and read) B 8 R V
- ``layer_overhead_s`` and ``step_overhead_s``: what a real step takes beyond its kernels' own times
  (gaps between kernels in a CUDA-graph replay, input copies, host work not hidden by asynchronous
  scheduling). Kernel timings cannot show them, so they are set a priori (README, "Calibration").

The efficiency terms live in :class:`RooflineParams`. ``kvsim/cost/calibration.yaml`` holds values
fitted per hardware by ``kvsim calibrate`` on the real-GPU kernel timings in ``kvsim/profiles/imported/``
(a ``default`` entry, fitted across all of them, serves hardware without a fit); the generic defaults
below are used only when that file is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from importlib import resources

import yaml

from kvsim.cost.base import CostModel, StepShape
from kvsim.work import Work
from kvsim.methods.base import Method
from kvsim.specs.hardware import HardwareSpec
from kvsim.specs.model import ModelSpec

#: kernels launched per operation (each pays ``kernel_overhead_s``)
KERNELS = {"qkv": 1, "o": 1, "mlp": 3, "moe": 6, "other": 3, "lm_head": 1, "attention": 2,
           "embedding": 1, "final_norm": 1, "sampler": 6}


@dataclass(frozen=True)
class RooflineParams:
    #: achieved fraction of peak tensor FLOP/s in large GEMMs
    eff_flops: float = 0.7
    #: GEMM efficiency falls as T / (T + gemm_half_tokens) for a GEMM over T tokens (0 = flat)
    gemm_half_tokens: float = 0.0
    #: achieved fraction of peak memory bandwidth for streaming reads (weights, activations)
    eff_mem: float = 0.8
    #: achieved fraction of peak memory bandwidth in element-wise kernels (norms, rotary, sampler); None = eff_mem
    eff_elem: float | None = None
    #: achieved fraction of peak FLOP/s in attention kernels
    eff_attn_flops: float = 0.5
    #: achieved fraction of peak memory bandwidth reading the (paged) KV cache; None = eff_mem
    eff_attn_mem: float | None = None
    #: query rows of one attention tile: a prefill chunk of q < attn_q_tile tokens costs the FLOPs of
    #: attn_q_tile queries (0 = no padding)
    attn_q_tile: float = 0.0
    #: attention tiles the GPU runs at once: a prefill call with fewer (heads x query tiles) takes as
    #: long as this many would (0 = no such floor)
    attn_ctas: float = 0.0
    #: fixed time of one attention call (KV-cache write + attention kernel); None = 2 kernel_overhead_s
    attn_overhead_s: float | None = None
    #: attention time per sequence in the batch (block-table walk, partial last block, split-KV merge)
    attn_seq_overhead_s: float = 0.0
    #: fixed time of one kernel (launch-and-drain as a kernel timer sees it)
    kernel_overhead_s: float = 4e-6
    #: fixed time of one element-wise kernel (norm, rotary, sampler); None = kernel_overhead_s
    elem_overhead_s: float | None = None
    #: per layer per step: gaps between the layer's kernels in a real step (not in kernel timings)
    layer_overhead_s: float = 0.0
    #: fixed time per engine step beyond its kernels (input copies, host work not overlapped)
    step_overhead_s: float = 2e-3
    #: an engine whose host path is slower than the GPU (an eager PyTorch engine launching kernels from
    #: Python) makes the step's dense part (GEMMs, element-wise kernels, LM head, sampler) take at least
    #: this long: per step, plus per prompt token the step prefills. The GPU's dense work runs under it;
    #: attention and a method's own kernels add. 0 for vLLM (CUDA graphs, asynchronous scheduling)
    host_floor_step_s: float = 0.0
    host_floor_prefill_token_s: float = 0.0
    #: achieved fraction of the interconnect bandwidth in collectives
    eff_comm: float = 1.0
    #: latency of one collective call
    allreduce_latency_s: float = 10e-6
    #: where a batch of decodes with unequal contexts lies between the uniform batch at the mean and at
    #: the largest context (0 = at the mean); one value for a decode call, one for decodes inside a
    #: prefill call, fitted on measured skewed batches (kvsim calibrate, ``decode_skew_alpha``)
    attn_skew_decode: float = 0.0
    attn_skew_mixed: float = 0.0
    #: where these values came from
    source: str = "generic defaults (uncalibrated)"


@lru_cache(maxsize=1)
def _calibration_table() -> dict:
    try:
        text = resources.files("kvsim.cost").joinpath("calibration.yaml").read_text()
    except (FileNotFoundError, OSError):
        return {}
    return yaml.safe_load(text) or {}


def reload_calibration() -> None:
    """Read calibration.yaml again on next use (after ``kvsim calibrate`` rewrote it)."""
    _calibration_table.cache_clear()


def params_from_entry(entry: dict, source: str | None = None) -> RooflineParams:
    known = {f.name for f in fields(RooflineParams)}
    kw = {}
    for k, v in entry.items():
        if k not in known:
            continue
        if k != "source" and v is not None:
            try:
                v = float(v)  # PyYAML reads "1e-05" (no dot) as a string
            except (TypeError, ValueError):
                from kvsim.errors import ConfigError

                raise ConfigError(f"calibration.yaml: {k}: value {v!r} is not a number") from None
        kw[k] = v
    if source is not None and "source" not in kw:
        kw["source"] = source
    return replace(RooflineParams(), **kw)


def calibrated_params(hardware: str) -> RooflineParams:
    """Fitted params for this hardware if ``calibration.yaml`` has them, else its ``default`` entry
    (fitted across all hardware), else the generic defaults."""
    table = _calibration_table().get("hardware", {})
    entry = table.get(hardware)
    if entry:
        return params_from_entry(entry, f"calibration.yaml: {hardware}")
    entry = table.get("default")
    if entry:
        return params_from_entry(entry, f"calibration.yaml: default (no fit for {hardware})")
    return RooflineParams()


def withheld_params(hardware: str, model: str) -> RooflineParams | None:
    """Params fitted with this (hardware, model)'s profiles left out (``leave_one_out`` in
    ``calibration.yaml``), for validating the roofline on a pair it never saw; None if not fitted."""
    entry = (_calibration_table().get("leave_one_out") or {}).get(f"{hardware}/{model}")
    return params_from_entry(entry, f"calibration.yaml: {hardware} without {model}") if entry else None


class RooflineCost(CostModel):
    def __init__(self, model: ModelSpec, hardware: HardwareSpec, method: Method | None = None,
                 tensor_parallel_size: int = 1, params: RooflineParams | None = None,
                 expert_parallel_size: int = 1):
        from kvsim.methods.none import NoCompression

        self.model, self.hw = model, hardware
        self.method = (method or NoCompression()).resolve(hardware)
        self.tp = tensor_parallel_size
        self.ep = expert_parallel_size
        self.params = params or calibrated_params(hardware.name)
        self.name = "roofline"
        pr = self.params
        self.peak_flops = hardware.fp8_flops if (model.dtype_bytes == 1 and hardware.fp8_flops) else hardware.fp16_flops
        self._flops_rate = self.peak_flops * pr.eff_flops
        # dequantisation and other element-wise ALU work runs on the CUDA cores; a method's measured
        # implementation states it in operations per element at this datasheet rate (its efficiency
        # folded into the count), so no efficiency term here
        self._alu_rate = hardware.fp32_flops
        self._floor0 = pr.host_floor_step_s
        self._floor_tok = pr.host_floor_prefill_token_s
        self._attn_rate = self.peak_flops * pr.eff_attn_flops
        self._bw = hardware.mem_bw_bytes_per_s * pr.eff_mem
        self._attn_bw = hardware.mem_bw_bytes_per_s * (pr.eff_attn_mem if pr.eff_attn_mem is not None else pr.eff_mem)
        self._elem_bw = hardware.mem_bw_bytes_per_s * (pr.eff_elem if pr.eff_elem is not None else pr.eff_mem)
        self._qtile = pr.attn_q_tile
        self._ctas = pr.attn_ctas
        self._heads = model.num_attention_heads / tensor_parallel_size
        self._seq_ko = pr.attn_seq_overhead_s
        self._elem_ko = pr.elem_overhead_s if pr.elem_overhead_s is not None else pr.kernel_overhead_s
        self._attn_ko = pr.attn_overhead_s if pr.attn_overhead_s is not None else KERNELS["attention"] * pr.kernel_overhead_s
        self._link = hardware.interconnect_bw_bytes_per_s * pr.eff_comm
        # eff_comm and allreduce_latency_s are fitted on NCCL over NVLink; a machine's own collective
        # figure (a PCIe box, where NCCL may stage data through host memory) is used as it stands
        self._step_bw = hardware.collective_bw_bytes_per_s
        self._step_lat = hardware.collective_latency_s
        # vLLM's own NVLink all-reduce (one-/two-shot kernels in the step's CUDA graph), where published
        self._ar_bw = getattr(hardware, "allreduce_bw_bytes_per_s", None)
        self._ar_lat = getattr(hardware, "allreduce_latency_s", None)
        self._ko = pr.kernel_overhead_s
        self._half = pr.gemm_half_tokens
        self._dense_cache: dict[int, float] = {}
        self._dense_by_tokens: dict[int, tuple] = {}
        self._dense_by_rows: dict[int, tuple] = {}
        self._affine: dict[int, object] = {}
        self._skew_decode = pr.attn_skew_decode
        self._skew_mixed = pr.attn_skew_mixed
        self._decode_fn: dict[int, object] = {}

    # -- primitives --------------------------------------------------------------------------
    def _t(self, w: Work, attn: bool = False) -> float:
        """A generic kernel (a method's own work): max of tensor, memory and ALU time plus one overhead,
        plus any host time it waits for."""
        if w.flops == 0.0 and w.bytes == 0.0 and w.alu_ops == 0.0:
            return w.host_s
        if attn:
            return max(w.flops / self._attn_rate, w.bytes / self._attn_bw, w.alu_ops / self._alu_rate) + self._ko + w.host_s
        return max(w.flops / self._flops_rate, w.bytes / self._bw, w.alu_ops / self._alu_rate) + self._ko + w.host_s

    def gemm_time_s(self, w: Work, tokens: float, kernels: int = 1) -> float:
        if w.flops == 0.0 and w.bytes == 0.0:
            return 0.0
        tf = w.flops / self._flops_rate
        if self._half and tokens > 0:
            tf *= 1.0 + self._half / tokens
        return max(tf, w.bytes / self._bw) + kernels * self._ko

    def mem_time_s(self, w: Work, kernels: int = 1) -> float:
        """An element-wise (memory-bound) operation."""
        if w.bytes == 0.0:
            return 0.0
        return w.bytes / self._elem_bw + kernels * self._elem_ko

    def attention_time_s(self, w: Work, num_seqs: int = 1, q_tokens: int | None = None, fixed: bool = True) -> float:
        """One attention call over ``num_seqs`` sequences; ``q_tokens``: the prefill chunk, whose FLOPs
        are padded to a whole query tile; ``fixed``: charge the call's two kernels (False when another
        part of the same step's attention call already did)."""
        if w.flops == 0.0 and w.bytes == 0.0 and w.alu_ops == 0.0:
            return w.host_s
        f = w.flops
        if q_tokens and (self._qtile or self._ctas):
            rows = self._heads * max(q_tokens, self._qtile)
            f *= max(rows, self._ctas * self._qtile) / (self._heads * q_tokens)
        t = max(f / self._attn_rate, w.bytes / self._attn_bw, w.alu_ops / self._alu_rate) + num_seqs * self._seq_ko + w.host_s
        return t + self._attn_ko if fixed else t

    def collective_time_s(self, nbytes: float, group: int) -> float:
        """One ring all-reduce of ``nbytes`` over ``group`` GPUs."""
        if group <= 1:
            return 0.0
        if self._ar_bw:
            # vLLM's custom all-reduce: one shot (read the p-1 peers' buffers and sum) or two shots
            # (reduce-scatter, all-gather), whichever is faster at this size
            one = self._ar_lat + (group - 1) * nbytes / self._ar_bw
            two = 2.0 * self._ar_lat + 2.0 * (group - 1) / group * nbytes / self._ar_bw
            return one if one < two else two
        if self._step_bw:
            # ring: reduce-scatter then all-gather, 2 (p-1) steps of S/p bytes, each paying the latency
            return 2.0 * (group - 1) * (self._step_lat + nbytes / group / self._step_bw)
        return self.params.allreduce_latency_s + 2.0 * (group - 1) / group * nbytes / self._link

    # -- per-layer linear work over T tokens ----------------------------------------------------
    def linear_works(self, T: int) -> dict[str, Work]:
        m, p, b = self.model, self.tp, self.model.dtype_bytes
        h, q, k = m.hidden_size, m.q_size, m.kv_size
        works = {
            "qkv": Work(2.0 * T * h * (q + 2 * k) / p, b * (h * (q + 2 * k) / p + T * h + T * (q + 2 * k) / p)),
            "o": Work(2.0 * T * q * h / p, b * (q * h / p + T * q / p + T * h)),
            "other": Work(0.0, T * (8.0 * h + 2.0 * (q + 2 * k)) * b),
        }
        if m.is_moe:
            works["mlp"] = self.moe_work(T * self.ep)
        else:
            i = m.intermediate_size
            works["mlp"] = Work(6.0 * T * h * i / p, b * (3 * h * i / p + T * h + 3 * T * i / p))
        return works

    def moe_work(self, gathered: float) -> Work:
        """One rank's MoE block (one layer) over the ``gathered`` tokens of its expert-parallel group
        (module docstring): the token-expert pairs of T' = gathered / ep tokens over the local experts
        the gathered tokens touch."""
        m, p, b = self.model, self.tp, self.model.dtype_bytes
        h, E, topk, ie, ep = m.hidden_size, m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, self.ep
        T = gathered / ep
        experts_here = (E / ep) * (1.0 - (1.0 - topk / E) ** gathered)
        flops = 6.0 * T * topk * h * ie / p + 2.0 * T * h * E
        shared = m.num_shared_experts * 3 * h * ie
        return Work(flops + 6.0 * T * h * m.num_shared_experts * ie / p,
                    b * (experts_here * 3 * h * ie / p + shared / p + h * E + 2 * T * h + 3 * T * topk * ie / p))

    def moe_compute_time_s(self, gathered: float) -> float:
        """One layer's MoE block on one expert-parallel rank over the group's ``gathered`` tokens
        (``linear_time_s("mlp", T)`` is this at gathered = ep T)."""
        return self.gemm_time_s(self.moe_work(gathered), gathered / self.ep, KERNELS["moe"])

    def linear_time_s(self, op: str, T: int, works: dict | None = None) -> float:
        """Time of one per-layer linear operation (``qkv``, ``o``, ``mlp`` or ``other``) over T tokens."""
        w = (works or self.linear_works(T))[op]
        if op == "other":
            return self.mem_time_s(w, KERNELS["other"])
        kernels = KERNELS["moe"] if (op == "mlp" and self.model.is_moe) else KERNELS[op]
        return self.gemm_time_s(w, T, kernels)

    def allreduce_time_s(self, T: int) -> float:
        """Tensor-parallel all-reduces of one layer (two: after attention and after the MLP)."""
        if self.tp == 1:
            return 0.0
        return 2.0 * self.collective_time_s(T * self.model.hidden_size * self.model.dtype_bytes, self.tp)

    def alltoall_time_s(self, T: int) -> float:
        """Expert-parallel token exchange of one MoE layer whose largest per-rank share is T tokens:
        all-gather of hidden states and router logits in, reduce-scatter of the outputs out (vLLM 0.19
        ``AgRsAll2AllManager.dispatch_router_logits`` / ``combine``)."""
        if self.ep <= 1 or not self.model.is_moe or T == 0:
            return 0.0
        m = self.model
        gather = T * (m.hidden_size + m.num_experts) * m.dtype_bytes
        scatter = T * m.hidden_size * m.dtype_bytes
        if self._step_bw:
            # ring all-gather and reduce-scatter: p-1 steps of one rank's share each
            return (self.ep - 1) * (2.0 * self._step_lat + (gather + scatter) / self._step_bw)
        return 2.0 * self.params.allreduce_latency_s + (self.ep - 1) * (gather + scatter) / self._link

    def moe_time_s(self, T: int) -> float:
        if not self.model.is_moe or T == 0:
            return 0.0
        return self.model.num_layers * (self.linear_time_s("mlp", T) + self.alltoall_time_s(T))

    def moe_group_time_s(self, gathered_tokens: int, largest_share: int) -> float:
        if not self.model.is_moe or gathered_tokens == 0:
            return 0.0
        return self.model.num_layers * (self.moe_compute_time_s(gathered_tokens) + self.alltoall_time_s(largest_share))

    def lm_head_work(self, rows: int) -> Work:
        m, b = self.model, self.model.dtype_bytes
        return Work(2.0 * rows * m.hidden_size * m.vocab_size / self.tp,
                    b * (m.hidden_size * m.vocab_size / self.tp + rows * m.hidden_size))

    def lm_head_time_s(self, rows: int) -> float:
        if rows == 0:
            return 0.0
        return self.gemm_time_s(self.lm_head_work(rows), rows, KERNELS["lm_head"])

    def step_op_work(self, op: str, n: int) -> Work:
        m, b = self.model, self.model.dtype_bytes
        if op == "embedding":
            return Work(0.0, 2.0 * n * m.hidden_size * b)
        if op == "final_norm":
            return Work(0.0, 4.0 * n * m.hidden_size * b)
        if op == "sampler":
            return Work(0.0, 8.0 * n * m.vocab_size)
        raise KeyError(op)

    def step_op_time_s(self, op: str, n: int) -> float:
        """Once-per-step kernels: ``embedding`` and ``final_norm`` over n tokens, ``sampler`` over n rows."""
        if n == 0:
            return 0.0
        return self.mem_time_s(self.step_op_work(op, n), KERNELS[op])

    def per_layer_overhead_s(self) -> float:
        return self.params.layer_overhead_s

    def dense_time_s(self, T: int, logit_rows: int, prefill_tokens: int = 0) -> float:
        """Everything of a step that depends only on token counts (not on attention); at least the
        engine's host floor (``host_floor_step_s`` + ``host_floor_prefill_token_s`` per prompt token)."""
        # every term depends on T alone or on the rows alone: cached apart (a step's T is at most
        # max_num_batched_tokens), summed in the same order every time
        by_t = self._dense_by_tokens.get(T)
        if by_t is None:
            works = self.linear_works(T)
            per_layer = (sum(self.linear_time_s(op, T, works) for op in works) + self.allreduce_time_s(T)
                         + self.alltoall_time_s(T) + self.params.layer_overhead_s)
            by_t = self._dense_by_tokens[T] = (self.model.num_layers * per_layer, self.step_op_time_s("embedding", T),
                                               self.step_op_time_s("final_norm", T))
        by_r = self._dense_by_rows.get(logit_rows)
        if by_r is None:
            by_r = self._dense_by_rows[logit_rows] = (self.lm_head_time_s(logit_rows),
                                                      self.step_op_time_s("sampler", logit_rows))
        layers, embedding, final_norm = by_t
        lm_head, sampler = by_r
        gpu = layers + lm_head + embedding + final_norm + sampler
        if self._floor0 or self._floor_tok:
            floor = self._floor0 + self._floor_tok * prefill_tokens
            if floor > gpu:
                gpu = floor
        return gpu + self.params.step_overhead_s

    # -- attention ---------------------------------------------------------------------------------
    def decode_attention_time_s(self, num_seqs: int, kept: int) -> float:
        if num_seqs == 0:
            return 0.0
        coef = self._affine.get(num_seqs)
        if coef is None:
            coef = self._affine[num_seqs] = self._affine_coefficients(num_seqs)
        if coef is False:
            return self._decode_attention_direct(num_seqs, kept)
        (fa0, fa1, ba0, ba1, aa0, aa1, ha0, ha1), (fe0, fe1, be0, be1, ae0, ae1, he0, he1) = coef
        ko = self._ko
        t = (max((fa0 + fa1 * kept) / self._attn_rate, (ba0 + ba1 * kept) / self._attn_bw,
                 (aa0 + aa1 * kept) / self._alu_rate)
             + ha0 + ha1 * kept + self._attn_ko + num_seqs * self._seq_ko)
        fe, be, ae = fe0 + fe1 * kept, be0 + be1 * kept, ae0 + ae1 * kept
        if fe or be or ae:
            t += max(fe / self._flops_rate, be / self._bw, ae / self._alu_rate) + ko
        t += he0 + he1 * kept
        return self.model.num_layers * t

    def _decode_attention_direct(self, num_seqs: int, kept: int) -> float:
        m, tp = self.model, self.tp
        t = self.attention_time_s(self.method.decode_attention_work(m, tp, num_seqs, kept), num_seqs)
        t += self._t(self.method.decode_extra_work(m, tp, num_seqs, kept))
        return m.num_layers * t

    def _affine_coefficients(self, B: int):
        """Per batch size, decode work is affine in the kept-token sum for every shipped method;
        precomputing the coefficients makes the fast-forward loop cheap. Checked at a third point, and
        a method whose work is not affine is costed by direct calls instead."""
        m, tp, meth = self.model, self.tp, self.method
        x1, x = 1 << 20, 98_765
        out = []
        for work in (meth.decode_attention_work, meth.decode_extra_work):
            w0, w1, wx = work(m, tp, B, 0), work(m, tp, B, x1), work(m, tp, B, x)
            c = []
            for f in ("flops", "bytes", "alu_ops", "host_s"):
                v0, v1, vx = getattr(w0, f), getattr(w1, f), getattr(wx, f)
                slope = (v1 - v0) / x1
                if not math.isclose(vx, v0 + slope * x, rel_tol=1e-9, abs_tol=1e-12):
                    return False
                c += [v0, slope]
            out.append(tuple(c))
        return tuple(out)

    def mixed_decode_attention_time_s(self, num_seqs: int, kept: int, max_kept: int = 0) -> float:
        """Decode sequences' attention in a step that also prefills. vLLM runs such a step's attention
        as one variable-length prefill call, where a decode is a one-query row: it does not get the
        decode kernel's split-KV and grouped-query packing, and costs a whole query tile per query
        head (the prefill kernel's tile padding, ``attn_q_tile`` / ``attn_ctas``). The call's fixed
        time is charged with the prefill part (``prefill_attention_time_s``)."""
        if num_seqs == 0:
            return 0.0
        m, tp, meth = self.model, self.tp, self.method
        t = self._mixed_rows_s(num_seqs, kept) + num_seqs * self._seq_ko
        t += self._t(meth.decode_extra_work(m, tp, num_seqs, kept))
        return m.num_layers * t + self.mixed_skew_s(num_seqs, kept, max_kept)

    def _mixed_rows_s(self, num_seqs: int, kept: int) -> float:
        w = self.method.decode_attention_work(self.model, self.tp, num_seqs, kept)
        f = w.flops
        if self._qtile or self._ctas:
            rows = self._heads * num_seqs * max(1.0, self._qtile)
            f *= max(rows, self._ctas * self._qtile) / (self._heads * num_seqs)
        return max(f / self._attn_rate, w.bytes / self._attn_bw, w.alu_ops / self._alu_rate) + w.host_s

    def mixed_skew_s(self, num_seqs: int, kept: int, max_kept: int, alpha: float | None = None) -> float:
        """What unequal contexts add to the decode rows of a prefill call: ``alpha`` (default
        ``attn_skew_mixed``; a profile passes its own) of the gap between every row at the largest and
        every row at the mean context."""
        alpha = self._skew_mixed if alpha is None else alpha
        hi = max_kept * num_seqs
        if not alpha or hi <= kept:
            return 0.0
        return alpha * self.model.num_layers * (self._mixed_rows_s(num_seqs, hi) - self._mixed_rows_s(num_seqs, kept))

    def prefill_attention_time_s(self, chunks, with_decodes: bool = False) -> float:
        """Prefill chunks' attention; vLLM runs a step's attention as one call, so the call's fixed
        time is charged once, with the first chunk (``with_decodes`` is accepted for compatibility:
        the decode part of a mixed step, ``mixed_decode_attention_time_s``, charges none)."""
        m, tp, meth = self.model, self.tp, self.method
        t = 0.0
        fixed = True
        for q, kv, last in chunks:
            t += self.attention_time_s(meth.prefill_attention_work(m, tp, q, kv), 1, q, fixed)
            t += self._t(meth.prefill_extra_work(m, tp, q, kv, last))
            fixed = False
        if chunks:
            t += self._t(meth.prefill_call_work(m, tp, chunks))
        return m.num_layers * t

    # -- the interface -----------------------------------------------------------------------------
    def step_time_s(self, shape: StepShape) -> float:
        if not shape.prefill_chunks:
            return self.decode_step_time_s(shape.num_decode_seqs, shape.decode_kept_tokens, shape.decode_max_kept)
        dense = self.dense_time_s(shape.num_tokens, shape.num_logit_tokens, shape.num_tokens - shape.num_decode_seqs)
        return (dense + self.mixed_decode_attention_time_s(shape.num_decode_seqs, shape.decode_kept_tokens,
                                                           shape.decode_max_kept)
                + self.prefill_attention_time_s(shape.prefill_chunks))

    def decode_step_time_s(self, num_seqs: int, kept_tokens_sum: int, max_kept: int = 0) -> float:
        return self.decode_step_fn(num_seqs)(kept_tokens_sum, max_kept)

    def decode_skew_s(self, num_seqs: int, kept: int, max_kept: int) -> float:
        """What unequal contexts add to a decode call: ``attn_skew_decode`` of the gap between the
        batch with every decode at the largest and every decode at the mean kept count (the attention
        kernel only: a method's extra work is costed on the kept-token sum)."""
        hi = max_kept * num_seqs
        if not self._skew_decode or hi <= kept:
            return 0.0
        return self._skew_decode * (self.decode_kernel_s(num_seqs, hi) - self.decode_kernel_s(num_seqs, kept))

    def decode_kernel_s(self, num_seqs: int, kept: int) -> float:
        """The decode attention kernel alone (no method extra work), all layers."""
        m = self.model
        return m.num_layers * self.attention_time_s(self.method.decode_attention_work(m, self.tp, num_seqs, kept), num_seqs)

    def decode_step_fn(self, num_seqs: int):
        fn = self._decode_fn.get(num_seqs)
        if fn is None:
            fn = self._decode_fn[num_seqs] = self._make_decode_fn(num_seqs)
        return fn

    def _make_decode_fn(self, B: int):
        c = self._decode_coefficients(B)
        if c is False:  # a method whose decode work is not affine in the kept tokens: operation by operation
            def direct(kept: int, max_kept: int = 0) -> float:
                return self._dense(B) + self.decode_attention_time_s(B, kept) + self.decode_skew_s(B, kept, max_kept)
            return direct
        # dense + decode_attention_time_s + decode_skew_s with this batch size's coefficients bound
        # (``b if b > a else a`` is what max(a, b) returns); the fast-forward calls this once a step
        base, p0, p1, q0, q1, e = c
        alpha = self._skew_decode
        extra = e is not None
        e0, e1, e2, e3, e4 = e if extra else (0.0,) * 5

        def step_time(kept: int, max_kept: int = 0) -> float:
            a = p0 + p1 * kept
            b = q0 + q1 * kept
            m = b if b > a else a
            t = base + m
            if extra:
                f = e0 + e1 * kept
                g = e2 + e3 * kept
                if f or g:
                    t += (g if g > f else f) + e4
            if alpha and max_kept * B > kept:
                hi = max_kept * B
                ah = p0 + p1 * hi
                bh = q0 + q1 * hi
                t += alpha * ((bh if bh > ah else ah) - m)
            return t
        return step_time

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
        (fa0, fa1, ba0, ba1, aa0, aa1, ha0, ha1), (fe0, fe1, be0, be1, ae0, ae1, he0, he1) = coef
        if aa0 or aa1 or ha0 or ha1 or ae0 or ae1 or he0 or he1:
            return False  # ALU-bound or host terms: decode_attention_time_s costs them step by step
        L, ko = self.model.num_layers, self._ko
        extra = None
        if fe0 or fe1 or be0 or be1:
            extra = (L * fe0 / self._flops_rate, L * fe1 / self._flops_rate, L * be0 / self._bw, L * be1 / self._bw, L * ko)
        return (self._dense(B) + L * (self._attn_ko + B * self._seq_ko), L * fa0 / self._attn_rate, L * fa1 / self._attn_rate,
                L * ba0 / self._attn_bw, L * ba1 / self._attn_bw, extra)

    def breakdown(self, shape: StepShape) -> dict[str, float]:
        L, T = self.model.num_layers, shape.num_tokens
        works = self.linear_works(T)
        out = {k: L * self.linear_time_s(k, T, works) for k in works}
        out["allreduce"] = L * self.allreduce_time_s(T)
        out["alltoall"] = L * self.alltoall_time_s(T)
        out["lm_head"] = self.lm_head_time_s(shape.num_logit_tokens)
        out["embedding"] = self.step_op_time_s("embedding", T)
        out["final_norm"] = self.step_op_time_s("final_norm", T)
        out["sampler"] = self.step_op_time_s("sampler", shape.num_logit_tokens)
        out["attn_decode"] = (self.mixed_decode_attention_time_s(shape.num_decode_seqs, shape.decode_kept_tokens)
                              if shape.prefill_chunks else
                              self.decode_attention_time_s(shape.num_decode_seqs, shape.decode_kept_tokens))
        out["attn_prefill"] = self.prefill_attention_time_s(shape.prefill_chunks)
        out["layer_overhead"] = L * self.params.layer_overhead_s
        out["step_overhead"] = self.params.step_overhead_s
        out["total"] = self.step_time_s(shape)
        return out


def tokens_per_second_limit(cost: RooflineCost, batch: int, context: int) -> float:
    """Decode tokens/s a replica reaches at a fixed batch and context (for physics checks)."""
    return batch / cost.decode_step_time_s(batch, batch * context)


__all__ = ["RooflineCost", "RooflineParams", "calibrated_params", "withheld_params", "params_from_entry",
           "tokens_per_second_limit", "KERNELS"]
