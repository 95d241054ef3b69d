"""GEAR: quantized KV backbone plus a low-rank approximation of the quantization error plus sparse outliers."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.cost.work import Work
from kvsim.methods.base import (
    DEQUANT_FLOPS_PER_ELEM,
    QUANT_FLOPS_PER_ELEM,
    Method,
    full_bytes_per_token_layer,
    kv_elems_per_token_layer,
    kv_heads_per_gpu,
    length_ratio_from_tail_shares,
    q_heads_per_gpu,
)

#: bytes of one outlier's position (int32 index, as the paper's CSR/COO storage)
_INDEX_BYTES = 4
#: FLOPs per element to pick the outliers (threshold compare of a top-k / radix select)
_OUTLIER_SELECT_FLOPS = 2.0
#: FLOPs per element to form the quantization error (dequantize, subtract)
_ERROR_FLOPS = 2.0


@dataclass(frozen=True)
class GEAR(Method):
    """GEAR (Kang et al., 2024): X ~ dequant(Q_bits(X - S)) + A B^T + S, per layer, for K and for V.

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

    GROUP_SIZE = 64
    BUFFER = 64
    POWER_ITERS = 3
    BITS = (2, 4, 8)

    name = "gear"
    paper = ("Kang et al., 'GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative "
             "Inference of LLM', arXiv:2403.05527, 2024")
    runtime_needs = ("quantize/pack and fused dequant kernels (KIVI's), power-iteration low-rank solver, "
                     "top-k outlier extraction; per-request contiguous tensors with a 64-token full-precision buffer")
    paged = False
    shares_prefix = False

    def validate(self):
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
        return model.num_layers * self._layer_bytes(model, tp)

    def extra_bytes_per_seq(self, model, tp=1):
        return self.BUFFER * (model.kv_bytes_per_token(tensor_parallel_size=tp) - self.bytes_per_token(model, tp))

    def _compress(self, model, tp, tokens: int) -> Work:
        """Compressing ``tokens`` tokens (one layer): read them twice in the model dtype (outlier select,
        quantize), write the fp32 error and read it twice per power iteration, write the compressed form."""
        e, r, it = kv_elems_per_token_layer(model, tp), self.rank(model), self.POWER_ITERS
        flops = tokens * e * (_OUTLIER_SELECT_FLOPS + QUANT_FLOPS_PER_ELEM + _ERROR_FLOPS + 4.0 * it * r)
        bytes_ = tokens * (2.0 * full_bytes_per_token_layer(model, tp) + 4.0 * e * (1 + 2 * it) + self._layer_bytes(model, tp))
        return Work(flops, bytes_)

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        e, r, d = kv_elems_per_token_layer(model, tp), self.rank(model), model.head_dim
        per_token = (e * (DEQUANT_FLOPS_PER_ELEM + self.outlier_ratio)
                     + 2.0 * q_heads_per_gpu(model, tp) * (2.0 * r + 2.0 * d * r / self.BUFFER))
        return super().decode_attention_work(model, tp, num_seqs, kept_tokens_sum) + Work(kept_tokens_sum * per_token, 0.0)

    def decode_extra_work(self, model, tp, num_seqs, kept_tokens_sum):
        return self._compress(model, tp, num_seqs)

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        return self._compress(model, tp, q_tokens)

    def default_length_ratio(self):
        return length_ratio_from_tail_shares(
            0.008, 0.494,
            "Gao et al., MLSys 2025 (arXiv:2503.24000), Table 9: GEAR on Mistral-7B, 1,000 ShareGPT prompts, "
            "up to 1,024 new tokens: 0.8% of prompts at most half as long, 49.4% at least 1.5x as long; "
            "lognormal fitted to those two shares by kvsim. Their setting (App. A.3): s=2%, r=2%; they report "
            "longer outputs at higher compression (Fig. 4)")
