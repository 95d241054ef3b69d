"""FP8 (E4M3) KV cache, as vLLM's ``kv_cache_dtype=fp8``: every token kept, one byte per element."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvsim.work import Work
from kvsim.methods.base import LengthRatio, Method, dequant_alu_work, kv_elems_per_token_layer
from kvsim.methods.impl import Implementation

#: FLOPs per element to quantize a new token (multiply by 1/scale, saturating convert)
_QUANT_FLOPS = 2.0
#: FLOPs per element read to dequantize inside the attention kernel (convert and multiply by the scale,
#: counted as one: the convert is not a floating-point operation)
_DEQUANT_FLOPS = 1.0


#: CUDA-core operations per e4m3 element to turn it into fp16 and scale it where the GPU has no fp8
#: (Ampere): a bit-level conversion (shift, mask, or) and the scale multiply. First principles; the two
#: published Ampere figures it is checked against are in docs/method-costs.md
_SOFTWARE_OPS_PER_ELEM = 4.0
#: the same for the Triton path of vllm-project/vllm#45829 (lookup-table decode, register-bound): chosen so
#: that kvsim's A100 decode kernel runs 1.60x the native bf16 one at that PR's measured shape (64
#: sequences x 2048 tokens, 8 query / 2 KV heads of 128: 483.9 us against 301.8 us);
#: tests/test_method_costs.py recomputes that ratio
_TRITON_OPS_PER_ELEM = 34.0

FP8_IMPLEMENTATIONS = {
    "auto": Implementation(
        "auto", basis="first principles / composed",
        engine="vLLM's fp8 KV path: native where the GPU has fp8 tensor cores, else the software conversion",
        source="resolves to native on GPUs with fp8 (Ada, Hopper, Blackwell) and to software on the rest (Ampere)"),
    "native": Implementation(
        "native", basis="first principles",
        engine="vLLM's fp8 KV on a GPU with fp8 support (FlashAttention 3 / FlashInfer read e4m3 blocks directly)",
        source="1 byte per element read, the conversion in the kernel's epilogue counted as one FLOP per element"),
    "software": Implementation(
        "software", basis="first principles",
        engine=("vLLM's fp8 KV on a GPU without fp8 (Ampere: FlashInfer or Triton attention converting e4m3 to fp16 "
                "in the kernel, vllm-project/vllm#24577)"),
        source=(f"{_SOFTWARE_OPS_PER_ELEM:g} CUDA-core operations per element read (bit-level conversion and scale), "
                "hidden under the halved KV traffic at serving sizes; checked against vllm-project/vllm#42058 (A100, "
                "vLLM 0.26: fp8 KV decode 0.4-5.5 % faster, prefill 2.5-5 % slower). Not LMDeploy's measured int4 "
                "term (about 100 operations per element): on an A100 that would make fp8 decode about 4x slower, "
                "which the published A100 figures refute")),
    "triton": Implementation(
        "triton", basis="published",
        engine="the lookup-table Triton fp8 path for pre-fp8 GPUs of vllm-project/vllm#45829 (TRITON_ATTN)",
        source=(f"{_TRITON_OPS_PER_ELEM:g} CUDA-core operations per element, so that the A100 decode kernel takes "
                "1.60x the bf16 one at the PR's measured shape (483.9 vs 301.8 us)")),
}


@dataclass(frozen=True)
class FP8(Method):
    """FP8 E4M3 KV cache with a per-tensor scale for K and for V (vLLM ``kv_cache_dtype=fp8_e4m3``).

    Keeps every token. Bytes per token = 2 x layers x KV heads x head_dim x 1 B (the per-tensor scales,
    two fp32 per layer, are left out: < 0.001 %). Paged like ``none`` (vLLM stores the fp8 blocks in
    the same block table) and prefix blocks are shared: quantizing a token depends only on that token.
    Work: new tokens (prompt and decode) are quantized by the cache-write kernel, counted as one read in
    the model dtype and one 1-byte write per element; decode attention reads 1 B per element and
    dequantizes it in the kernel (1 FLOP per element read). Prefill attention runs on the fresh
    full-precision K/V (FlashAttention), as in vLLM.

    ``impl``: ``native`` is the above; ``software`` (GPUs without fp8, such as Ampere) also converts
    every element read on the CUDA cores (a few operations per element, hidden under the halved traffic
    at serving sizes, as vLLM's published A100 figures show); ``triton`` is the slower lookup-table
    Triton path of vllm-project/vllm#45829 (its published kernel ratio); ``auto`` (default) picks
    ``native`` where the GPU has fp8 tensor cores, else ``software``.
    """

    impl: str = "auto"
    IMPLEMENTATIONS = FP8_IMPLEMENTATIONS

    name = "fp8"
    paper = ("FP8 E4M3 format: Micikevicius et al., 'FP8 Formats for Deep Learning', arXiv:2209.05433, 2022; "
             "served as vLLM kv_cache_dtype=fp8 (Kwon et al., SOSP 2023, arXiv:2309.06180)")
    runtime_needs = "an attention kernel that reads fp8 K/V (vLLM FlashAttention/FlashInfer fp8 path); per-tensor K/V scales"

    def validate(self):
        self._require_impl()

    def resolve(self, hardware):
        if self.impl != "auto":
            return self
        return replace(self, impl="native" if hardware.supports_fp8 else "software")

    def bytes_per_token(self, model, tp=1):
        return model.kv_bytes_per_token(kv_dtype_bytes=1, tensor_parallel_size=tp)

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        base = super().decode_attention_work(model, tp, num_seqs, kept_tokens_sum)
        if self.impl in ("software", "triton"):
            ops = _SOFTWARE_OPS_PER_ELEM if self.impl == "software" else _TRITON_OPS_PER_ELEM
            return base + dequant_alu_work(model, tp, kept_tokens_sum, ops)
        return base + Work(_DEQUANT_FLOPS * kept_tokens_sum * kv_elems_per_token_layer(model, tp), 0.0)

    def _quantize(self, model, tp, tokens: int) -> Work:
        e = kv_elems_per_token_layer(model, tp)
        return Work(_QUANT_FLOPS * tokens * e, tokens * e * (model.dtype_bytes + 1.0))

    def decode_extra_work(self, model, tp, num_seqs, kept_tokens_sum):
        return self._quantize(model, tp, num_seqs)

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        return self._quantize(model, tp, q_tokens)

    def default_length_ratio(self):
        return LengthRatio(source="no published figure found (Gao et al., MLSys 2025 measure KIVI, GEAR, H2O and "
                                  "StreamingLLM only); kvprof lengths measures it")
