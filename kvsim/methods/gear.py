"""GEAR: quantized KV backbone plus a low-rank approximation of the quantization error plus sparse outliers."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.work import Work
from kvsim.methods.base import (
    QUANT_FLOPS_PER_ELEM,
    Method,
    dequant_alu_work,
    full_bytes_per_token_layer,
    kv_elems_per_token_layer,
    kv_heads_per_gpu,
    length_ratio_from_tail_shares,
    q_heads_per_gpu,
)
from kvsim.methods.impl import Implementation
from kvsim.methods.kivi import int4_token_bytes_per_layer, lmdeploy_int_decode_work, lmdeploy_quantize_work

#: bytes of one outlier's position (int32 index, as the paper's CSR/COO storage)
_INDEX_BYTES = 4
#: FLOPs per element to pick the outliers (threshold compare of a top-k / radix select)
_OUTLIER_SELECT_FLOPS = 2.0
#: FLOPs per element to form the quantization error (dequantize, subtract)
_ERROR_FLOPS = 2.0


GEAR_IMPLEMENTATIONS = {
    "lmdeploy": Implementation(
        "lmdeploy", basis="measured", terms_key="gear/lmdeploy",
        engine=("LMDeploy 0.6's built-in int4 KV cache (quant_policy=4), which the seed paper runs as 'GEAR-4': "
                "per-token, per-head scale and zero point, paged, fused dequantising Triton attention; no low-rank "
                "or sparse correction exists in that engine"),
        source=("dequant_ops_per_elem fitted on the seed paper's GEAR-4 decode throughput, Llama-2-7B and 13B "
                "(../shared/reference/seed-lmdeploy; kvsim fit-methods, leave-one-model-out checked)")),
    "reference": Implementation(
        "reference", basis="composed", borrows=("gear/lmdeploy",),
        engine="GEAR as its paper describes it (arXiv:2403.05527): KIVI-style backbone, low-rank error, outliers",
        source=("low-rank and outlier work from first principles; the backbone's dequantisation from the measured "
                "int4 term of LMDeploy's kernel (gear/lmdeploy dequant_ops_per_elem), the nearest measured kernel")),
}


@dataclass(frozen=True)
class GEAR(Method):
    """GEAR (Kang et al., 2024): X ~ dequant(Q_bits(X - S)) + A B^T + S, per layer, for K and for V.

    ``impl=lmdeploy`` (default; measured): what the seed paper measured as "GEAR-4", LMDeploy's built-in
    int4 KV cache: per-token, per-head scale and zero point (fp16), paged, a fused dequantising Triton
    kernel whose CUDA-core cost per element is fitted (``dequant_ops_per_elem``); no low-rank or outlier
    part, so ``rank_ratio`` and ``outlier_ratio`` do not apply and bytes per token are
    L x 2 Hkv (d / 2 + 4). ``impl=reference`` (composed): the paper's GEAR as below, its backbone
    dequantised at the measured int4 kernel's cost per element.

    Q: group-wise asymmetric quantization (keys per channel, values per token, KIVI-style, groups of
    ``GROUP_SIZE`` = 64 as the reference scripts' ``--group_size 64``); S: the ``outlier_ratio`` largest
    and smallest entries kept exactly (model-dtype value + int32 index); A B^T: rank-r approximation of the
    remaining quantization error of each KV head, r = int(rank_ratio x head_dim) (the reference's
    ``int(rank * dim)``; 0.02 x 128 -> 2, the scripts' ``--rank 2``), computed by ``POWER_ITERS`` = 3 power
    iterations (``--loop 3``) per streaming chunk of ``BUFFER`` = 64 tokens (``--streaming_gap 64``), which
    stores a token-side factor (BUFFER x r) and a channel-side factor (d x r), both in the model dtype.

    Bytes per token (all layers, one GPU), E = 2 x Hkv x d elements per layer, b = dtype bytes::

        L x [ E x (bits/8 + 2b/64 + outlier_ratio x (b + 4))  +  2 x Hkv x r x b x (1 + d/64) ]

    ``extra_bytes_per_seq`` = BUFFER x (full - compressed) bytes per token: the streaming buffer of
    recent tokens kept in full precision until a chunk is compressed. Not paged (HF-style contiguous
    per-request tensors in the reference); no prefix sharing (no blocks; the low-rank and outlier parts
    of a chunk depend on the whole chunk). Work: decode dequantizes the backbone (2 FLOPs/element), adds
    the outliers, and adds the low-rank part through the factors (q.B then .A^T, fused as in the
    reference ``matmul_withlrap``); every new token is compressed once (outlier select, quantize, error,
    power iterations: see ``_compress``), in prefill after FlashAttention on the fresh K/V and in decode
    one chunk every BUFFER steps (amortised per token).
    """

    bits: int = 4
    rank_ratio: float = 0.02
    outlier_ratio: float = 0.02
    impl: str = "lmdeploy"

    GROUP_SIZE = 64
    BUFFER = 64
    POWER_ITERS = 3
    BITS = (2, 4, 8)

    name = "gear"
    paper = ("Kang et al., 'GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative "
             "Inference of LLM', arXiv:2403.05527, 2024")
    runtime_needs = ("lmdeploy: LMDeploy's int4 KV cache (quant_policy=4); reference: quantize/pack and fused dequant "
                     "kernels (KIVI's), power-iteration low-rank solver, top-k outlier extraction, per-request "
                     "contiguous tensors with a 64-token full-precision buffer")
    shares_prefix = False
    IMPLEMENTATIONS = GEAR_IMPLEMENTATIONS

    @property
    def paged(self) -> bool:
        return self.impl == "lmdeploy"

    def validate(self):
        self._require_impl()
        if self.impl == "lmdeploy" and self.bits != 4:
            self._fail("bits", self.bits, "impl=lmdeploy is LMDeploy's int4 cache (quant_policy=4), measured at 4 bits "
                                          "only; use impl=reference for GEAR at other widths")
        self._require_choice("bits", self.BITS)
        self._require_ratio("rank_ratio")
        self._require_ratio("outlier_ratio")

    def rank(self, model) -> int:
        """Rank of the per-head low-rank error approximation."""
        return int(self.rank_ratio * model.head_dim)

    def _layer_bytes(self, model, tp) -> float:
        e, b, d = kv_elems_per_token_layer(model, tp), model.dtype_bytes, model.head_dim
        dense = e * (self.bits / 8.0 + 2.0 * b / self.GROUP_SIZE + self.outlier_ratio * (b + _INDEX_BYTES))
        low_rank = 2 * kv_heads_per_gpu(model, tp) * self.rank(model) * b * (1.0 + d / self.BUFFER)
        return dense + low_rank

    def bytes_per_token(self, model, tp=1):
        if self.impl == "lmdeploy":
            return model.num_layers * int4_token_bytes_per_layer(model, tp, self.bits)
        return model.num_layers * self._layer_bytes(model, tp)

    def extra_bytes_per_seq(self, model, tp=1):
        if self.impl == "lmdeploy":
            return 0.0
        return self.BUFFER * (model.kv_bytes_per_token(tensor_parallel_size=tp) - self.bytes_per_token(model, tp))

    def _compress(self, model, tp, tokens: int) -> Work:
        """Compressing ``tokens`` tokens (one layer): read them twice in the model dtype (outlier select,
        quantize), write the fp32 error and read it twice per power iteration, write the compressed form."""
        e, r, it = kv_elems_per_token_layer(model, tp), self.rank(model), self.POWER_ITERS
        flops = tokens * e * (_OUTLIER_SELECT_FLOPS + QUANT_FLOPS_PER_ELEM + _ERROR_FLOPS + 4.0 * it * r)
        bytes_ = tokens * (2.0 * full_bytes_per_token_layer(model, tp) + 4.0 * e * (1 + 2 * it) + self._layer_bytes(model, tp))
        return Work(flops, bytes_)

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        ops = self.terms()["dequant_ops_per_elem"]
        if self.impl == "lmdeploy":
            return lmdeploy_int_decode_work(model, tp, num_seqs, kept_tokens_sum, self.bits, 0, ops)
        e, r, d = kv_elems_per_token_layer(model, tp), self.rank(model), model.head_dim
        # the outliers and the low-rank correction on the tensor path; the backbone's dequantisation on
        # the CUDA cores at the measured int4 kernel's cost per element
        per_token = (e * self.outlier_ratio
                     + 2.0 * q_heads_per_gpu(model, tp) * (2.0 * r + 2.0 * d * r / self.BUFFER))
        return (super().decode_attention_work(model, tp, num_seqs, kept_tokens_sum)
                + Work(kept_tokens_sum * per_token, 0.0) + dequant_alu_work(model, tp, kept_tokens_sum, ops))

    def decode_extra_work(self, model, tp, num_seqs, kept_tokens_sum):
        if self.impl == "lmdeploy":
            return lmdeploy_quantize_work(model, tp, num_seqs, self.bits)
        return self._compress(model, tp, num_seqs)

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        if self.impl == "lmdeploy":
            return lmdeploy_quantize_work(model, tp, q_tokens, self.bits)
        return self._compress(model, tp, q_tokens)

    def default_length_ratio(self):
        return length_ratio_from_tail_shares(
            0.008, 0.494,
            "Gao et al., MLSys 2025 (arXiv:2503.24000), Table 9: GEAR on Mistral-7B, 1,000 ShareGPT prompts, "
            "up to 1,024 new tokens: 0.8% of prompts at most half as long, 49.4% at least 1.5x as long; "
            "lognormal fitted to those two shares by kvsim. Their setting (App. A.3): s=2%, r=2%; they report "
            "longer outputs at higher compression (Fig. 4)")
