"""KIVI: 2/4-bit asymmetric KV quantization, keys per channel and values per token, recent tokens in full precision."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsim.cost.work import Work
from kvsim.methods.base import (
    DEQUANT_FLOPS_PER_ELEM,
    QUANT_FLOPS_PER_ELEM,
    Method,
    kv_elems_per_token_layer,
    kv_heads_per_gpu,
    length_ratio_from_tail_shares,
)

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


def kivi_quantize_work(model, tp: int, tokens: int, bits: int, group_size: int) -> Work:
    """Quantizing ``tokens`` tokens: read K/V in the model dtype, write the packed codes and scales."""
    e = kv_elems_per_token_layer(model, tp)
    return Work(QUANT_FLOPS_PER_ELEM * tokens * e,
                tokens * (e * model.dtype_bytes + kivi_bytes_per_token_layer(model, tp, bits, group_size)))


def kivi_dequant_work(model, tp: int, kept_tokens_sum: int) -> Work:
    """Dequantizing every kept element inside the fused attention kernel (``x * scale + zero``)."""
    return Work(DEQUANT_FLOPS_PER_ELEM * kept_tokens_sum * kv_elems_per_token_layer(model, tp), 0.0)


def validate_kivi_knobs(m: Method) -> None:
    m._require_choice("bits", KIVI_BITS)
    g = m._require_int("group_size")
    r = m._require_int("residual_length")
    if r % g:
        m._fail("residual_length", r, f"must be a multiple of group_size={g} (KIVI quantizes the key tail "
                                      f"{r} tokens at a time in groups of {g})")


@dataclass(frozen=True)
class KIVI(Method):
    """KIVI (Liu et al., ICML 2024): keys quantized per channel in groups of ``group_size`` tokens, values
    per token in groups of ``group_size`` channels, asymmetric (scale + zero point, model dtype); the
    most recent ``residual_length`` tokens stay in full precision.

    Keeps every token. Bytes per token (all layers, one GPU), with d = head_dim, b = dtype bytes,
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

    name = "kivi"
    paper = ("Liu et al., 'KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache', ICML 2024, "
             "arXiv:2402.02750")
    runtime_needs = ("KIVI's Triton quantize/pack and CUDA dequant-GEMV kernels; per-request contiguous "
                     "tensors (HF-style, grown by torch.cat); residual_length full-precision tokens per request")
    paged = False
    shares_prefix = False

    def validate(self):
        validate_kivi_knobs(self)

    def bytes_per_token(self, model, tp=1):
        return model.num_layers * kivi_bytes_per_token_layer(model, tp, self.bits, self.group_size)

    def extra_bytes_per_seq(self, model, tp=1):
        return self.residual_length * (model.kv_bytes_per_token(tensor_parallel_size=tp) - self.bytes_per_token(model, tp))

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        return super().decode_attention_work(model, tp, num_seqs, kept_tokens_sum) + kivi_dequant_work(model, tp, kept_tokens_sum)

    def decode_extra_work(self, model, tp, num_seqs, kept_tokens_sum):
        return kivi_quantize_work(model, tp, num_seqs, self.bits, self.group_size)

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        return kivi_quantize_work(model, tp, q_tokens, self.bits, self.group_size)

    def default_length_ratio(self):
        return length_ratio_from_tail_shares(
            0.028, 0.449,
            "Gao et al., MLSys 2025 (arXiv:2503.24000), Table 9: KIVI on Mistral-7B, 1,000 ShareGPT prompts, "
            "up to 1,024 new tokens: 2.8% of prompts at most half as long, 44.9% at least 1.5x as long; "
            "lognormal fitted to those two shares by kvsim. Their setting (App. A.3: G=32, R=128) is not "
            "necessarily this one; they report longer outputs at higher compression (Fig. 4)")
