"""FP8 (E4M3) KV cache, as vLLM's ``kv_cache_dtype=fp8``: every token kept, one byte per element."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvsim.cost.work import Work
from kvsim.methods.base import LengthRatio, Method, dequant_alu_work, kv_elems_per_token_layer
from kvsim.methods.impl import Implementation

#: FLOPs per element to quantize a new token (multiply by 1/scale, saturating convert)
_QUANT_FLOPS = 2.0
#: FLOPs per element read to dequantize inside the attention kernel (convert and multiply by the scale,
#: counted as one: the convert is not a floating-point operation)
_DEQUANT_FLOPS = 1.0


FP8_IMPLEMENTATIONS = {
    "auto": Implementation(
        "auto", basis="first principles / composed",
        engine="vLLM's fp8 KV path: native where the GPU has fp8 tensor cores, else a software conversion",
        source="resolves to native on GPUs with fp8 (Ada, Hopper, Blackwell) and to software on the rest (Ampere)"),
    "native": Implementation(
        "native", basis="first principles",
        engine="vLLM's fp8 KV on a GPU with fp8 support (FlashAttention 3 / FlashInfer read e4m3 blocks directly)",
        source="1 byte per element read, the conversion in the kernel's epilogue counted as one FLOP per element"),
    "software": Implementation(
        "software", basis="composed", borrows=("gear/lmdeploy",),
        engine=("an attention kernel on a GPU without fp8 (Ampere) that converts every e4m3 element to fp16 on the "
                "CUDA cores before using it (vLLM's Triton path, vllm-project/vllm#45829)"),
        source=("the conversion's cost per element borrowed from the measured int4 dequantising kernel of LMDeploy "
                "(gear/lmdeploy dequant_ops_per_elem); checked against the published A100 kernel ratio of "
                "vllm-project/vllm#45829 in docs/method-costs.md")),
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
    every element read on the CUDA cores at the measured cost per element of LMDeploy's int4 kernel;
    ``auto`` (default) picks ``native`` where the GPU has fp8 tensor cores, else ``software``.
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
        if self.impl == "software":
            return base + dequant_alu_work(model, tp, kept_tokens_sum, self.terms()["dequant_ops_per_elem"])
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
