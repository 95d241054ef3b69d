"""FP8 (E4M3) KV cache, as vLLM's ``kv_cache_dtype=fp8``: every token kept, one byte per element."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.cost.work import Work
from kvsim.methods.base import LengthRatio, Method, kv_elems_per_token_layer

#: FLOPs per element to quantize a new token (multiply by 1/scale, saturating convert)
_QUANT_FLOPS = 2.0
#: FLOPs per element read to dequantize inside the attention kernel (convert and multiply by the scale,
#: counted as one: the convert is not a floating-point operation)
_DEQUANT_FLOPS = 1.0


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
    """

    name = "fp8"
    paper = ("FP8 E4M3 format: Micikevicius et al., 'FP8 Formats for Deep Learning', arXiv:2209.05433, 2022; "
             "served as vLLM kv_cache_dtype=fp8 (Kwon et al., SOSP 2023, arXiv:2309.06180)")
    runtime_needs = "an attention kernel that reads fp8 K/V (vLLM FlashAttention/FlashInfer fp8 path); per-tensor K/V scales"

    def bytes_per_token(self, model, tp=1):
        return model.kv_bytes_per_token(kv_dtype_bytes=1, tensor_parallel_size=tp)

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        base = super().decode_attention_work(model, tp, num_seqs, kept_tokens_sum)
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
