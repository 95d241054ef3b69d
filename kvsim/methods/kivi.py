"""KIVI: 2/4-bit asymmetric KV quantization, keys per channel and values per token, recent tokens in full precision."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsim.work import ZERO, Work
from kvsim.methods.base import (
    DEQUANT_FLOPS_PER_ELEM,
    LMDEPLOY_BLOCK,
    QUANT_FLOPS_PER_ELEM,
    Method,
    dequant_alu_work,
    full_bytes_per_token_layer,
    kv_elems_per_token_layer,
    kv_heads_per_gpu,
    length_ratio_from_tail_shares,
)
from kvsim.methods.impl import Implementation

#: bit widths KIVI's packing and fused dequant-GEMV kernels support (README: "current support 2/4 bit")
KIVI_BITS = (2, 4)


def kivi_bytes_per_token_layer(model, tp: int, bits: int, group_size: int) -> float:
    """Bytes of one quantized token in one layer on one GPU, scale and zero point amortised.

    Per KV head: keys ``head_dim x bits / 8`` plus, per channel, one scale and one zero point (model
    dtype) for every ``group_size`` tokens; values ``head_dim x bits / 8`` plus one scale and zero per
    ``group_size`` channels of the token.
    """
    d, b = model.head_dim, model.dtype_bytes
    keys = d * bits / 8.0 + d * 2.0 * b / group_size
    values = d * bits / 8.0 + math.ceil(d / group_size) * 2.0 * b
    return kv_heads_per_gpu(model, tp) * (keys + values)


def int4_token_bytes_per_layer(model, tp: int, bits: int) -> float:
    """Bytes of one token in one layer on one GPU quantised per token and head (LMDeploy's layout):
    per KV head, K and V each ``head_dim x bits / 8`` of codes plus a scale and a zero point in fp16."""
    return 2 * kv_heads_per_gpu(model, tp) * (model.head_dim * bits / 8.0 + 2 * 2.0)


def lmdeploy_quantize_work(model, tp: int, tokens: float, bits: int) -> Work:
    """Quantising ``tokens`` tokens into per-token int blocks: read them in the model dtype, write codes
    and scales (the cache-fill kernel)."""
    e = kv_elems_per_token_layer(model, tp)
    return Work(QUANT_FLOPS_PER_ELEM * tokens * e, tokens * (e * model.dtype_bytes + int4_token_bytes_per_layer(model, tp, bits)))


def lmdeploy_int_decode_work(model, tp: int, num_seqs: int, kept_tokens_sum: int, bits: int, recent: int,
                             ops_per_elem: float) -> Work:
    """Decode attention of LMDeploy's fused integer-KV paged kernel (one layer): the quantised blocks
    read once and dequantised on the CUDA cores (``ops_per_elem`` measured), the full-precision recent
    block read as is (half full on average), Q and O."""
    h, d, b = model.num_attention_heads / tp, model.head_dim, model.dtype_bytes
    recent_tokens = min(kept_tokens_sum, num_seqs * recent / 2.0)
    quant_tokens = kept_tokens_sum - recent_tokens
    flops = 4.0 * h * d * kept_tokens_sum
    bytes_ = (quant_tokens * int4_token_bytes_per_layer(model, tp, bits)
              + recent_tokens * full_bytes_per_token_layer(model, tp) + 2.0 * num_seqs * h * d * b)
    return Work(flops, bytes_) + dequant_alu_work(model, tp, quant_tokens, ops_per_elem)


def kivi_quantize_work(model, tp: int, tokens: int, bits: int, group_size: int) -> Work:
    """Quantizing ``tokens`` tokens: read K/V in the model dtype, write the packed codes and scales."""
    e = kv_elems_per_token_layer(model, tp)
    return Work(QUANT_FLOPS_PER_ELEM * tokens * e,
                tokens * (e * model.dtype_bytes + kivi_bytes_per_token_layer(model, tp, bits, group_size)))


def kivi_dequant_work(model, tp: int, kept_tokens_sum: int) -> Work:
    """Dequantizing every kept element inside the fused attention kernel (``x * scale + zero``)."""
    return Work(DEQUANT_FLOPS_PER_ELEM * kept_tokens_sum * kv_elems_per_token_layer(model, tp), 0.0)


def validate_kivi_knobs(m: Method) -> None:
    if hasattr(m, "impl"):
        m._require_impl()
    m._require_choice("bits", KIVI_BITS)
    g = m._require_int("group_size")
    r = m._require_int("residual_length")
    if r % g:
        m._fail("residual_length", r, f"must be a multiple of group_size={g} (KIVI quantizes the key tail "
                                      f"{r} tokens at a time in groups of {g})")


KIVI_IMPLEMENTATIONS = {
    "lmdeploy": Implementation(
        "lmdeploy", basis="measured", terms_key="kivi/lmdeploy",
        engine=("LMDeploy 0.6 PyTorch engine as forked by Gao et al. (MLSys 2025): a fused Triton paged-attention "
                "kernel over packed int blocks, K and V quantised per token and head (scale + zero in fp16), the "
                "recent tokens in one full-precision 64-token block, only whole blocks quantised"),
        source=("dequant_ops_per_elem fitted on the seed paper's KIVI-4 decode throughput, Llama-2-7B "
                "(../shared/reference/seed-lmdeploy; kvsim fit-methods); bytes and layout from the fork's code as "
                "that data's README describes it")),
    "reference": Implementation(
        "reference", basis="first principles",
        engine="KIVI's own Triton quantize/pack and CUDA dequant-GEMV kernels on HF-style contiguous tensors",
        source="FLOPs and bytes of the paper's algorithm (arXiv:2402.02750) through the roofline"),
}


@dataclass(frozen=True)
class KIVI(Method):
    """KIVI (Liu et al., ICML 2024): keys quantized per channel in groups of ``group_size`` tokens, values
    per token in groups of ``group_size`` channels, asymmetric (scale + zero point, model dtype); the
    most recent ``residual_length`` tokens stay in full precision.

    ``impl=lmdeploy`` (default; measured): what the seed paper's LMDeploy fork runs for "KIVI-4": paged
    blocks of integer codes quantised per token and head (K too, unlike the paper's per-channel keys),
    a scale and zero point in fp16 per token and head, the recent tokens in one full-precision 64-token
    block, only whole blocks quantised (``group_size`` and ``residual_length`` do not apply). Bytes per
    token: L x 2 Hkv (d bits/8 + 4). Decode attention reads the codes once and dequantises them on the
    CUDA cores, ``dequant_ops_per_elem`` (fitted) operations per element at the GPU's FP32 rate, which
    is why the engine measured no decode gain over FP16 at batch <= 16 (the kernel is ALU-bound, not
    memory-bound). Paged; prefix blocks not shared. Measured at 4 bits; 2 bits uses the same per-element
    cost (unpacking 2-bit codes is no cheaper).

    ``impl=reference`` (first principles): KIVI's own kernels, as follows. Keeps every token. Bytes per token (all layers, one GPU), with d = head_dim, b = dtype bytes,
    G = group_size::

        L x Hkv x [ 2 x d x bits/8  +  2b x d/G  (key scales/zeros)  +  2b x ceil(d/G)  (value scales/zeros) ]

    For d = 128, G = 32 the metadata is 1 bit per element: bits + 1 bits in all (16/3 = 5.3x smaller
    than bf16 at 2 bits, 3.2x at 4 bits). ``extra_bytes_per_seq`` = residual_length x (full - quantized)
    bytes per token: values keep exactly the last R tokens in full precision, keys keep 0..R-1 (flushed
    R at a time), so this is the reservation the reference needs. Not paged: the reference keeps
    per-request contiguous tensors grown by ``torch.cat``; no engine pages them. Prefix blocks are not
    shared (no paged blocks to share; the quantized prefix is deterministic, a paged port could share it).
    Work: decode reads the quantized cache plus the full-precision tail, dequantizing in the fused
    kernel (2 FLOPs per element); every new token is eventually quantized (values one per step, keys R at
    a time: amortised one token per step per sequence); prefill attention is FlashAttention on the fresh
    full-precision K/V and every prompt token is quantized once.
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    impl: str = "lmdeploy"

    name = "kivi"
    paper = ("Liu et al., 'KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache', ICML 2024, "
             "arXiv:2402.02750")
    runtime_needs = ("a quantise-on-write cache kernel and an attention kernel that dequantises int codes (lmdeploy: "
                     "fused Triton paged kernel, one fp16 block of recent tokens; reference: KIVI's CUDA kernels on "
                     "contiguous tensors grown by torch.cat, residual_length full-precision tokens)")
    shares_prefix = False
    IMPLEMENTATIONS = KIVI_IMPLEMENTATIONS

    @property
    def paged(self) -> bool:
        return self.impl == "lmdeploy"

    def validate(self):
        validate_kivi_knobs(self)

    def bytes_per_token(self, model, tp=1):
        if self.impl == "lmdeploy":
            return model.num_layers * int4_token_bytes_per_layer(model, tp, self.bits)
        return model.num_layers * kivi_bytes_per_token_layer(model, tp, self.bits, self.group_size)

    def _recent(self) -> int:
        return LMDEPLOY_BLOCK if self.impl == "lmdeploy" else self.residual_length

    def extra_bytes_per_seq(self, model, tp=1):
        return self._recent() * (model.kv_bytes_per_token(tensor_parallel_size=tp) - self.bytes_per_token(model, tp))

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        if self.impl == "lmdeploy":
            return lmdeploy_int_decode_work(model, tp, num_seqs, kept_tokens_sum, self.bits, LMDEPLOY_BLOCK,
                                            self.terms()["dequant_ops_per_elem"])
        return super().decode_attention_work(model, tp, num_seqs, kept_tokens_sum) + kivi_dequant_work(model, tp, kept_tokens_sum)

    def decode_extra_work(self, model, tp, num_seqs, kept_tokens_sum):
        if self.impl == "lmdeploy":
            return lmdeploy_quantize_work(model, tp, num_seqs, self.bits)
        return kivi_quantize_work(model, tp, num_seqs, self.bits, self.group_size)

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        if self.impl == "lmdeploy":
            # only whole blocks are quantised; the prompt's last partial block stays full precision
            return lmdeploy_quantize_work(model, tp, q_tokens, self.bits) if q_tokens else ZERO
        return kivi_quantize_work(model, tp, q_tokens, self.bits, self.group_size)

    def default_length_ratio(self):
        return length_ratio_from_tail_shares(
            0.028, 0.449,
            "Gao et al., MLSys 2025 (arXiv:2503.24000), Table 9: KIVI on Mistral-7B, 1,000 ShareGPT prompts, "
            "up to 1,024 new tokens: 2.8% of prompts at most half as long, 44.9% at least 1.5x as long; "
            "lognormal fitted to those two shares by kvsim. Their setting (App. A.3: G=32, R=128) is not "
            "necessarily this one; they report longer outputs at higher compression (Fig. 4)")
