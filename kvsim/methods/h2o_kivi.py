"""H2O eviction on a KIVI-quantized cache: few tokens, few bits each."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.work import ZERO
from kvsim.methods.base import (
    LMDEPLOY_BLOCK,
    LengthRatio,
    Method,
    block_cut_kept,
    evicting_kept,
    score_pass_work,
    score_step_work,
)
from kvsim.methods.h2o import h2o_decode_extra_work, h2o_prefill_extra_work
from kvsim.methods.impl import Implementation
from kvsim.methods.kivi import (
    int4_token_bytes_per_layer,
    kivi_bytes_per_token_layer,
    kivi_dequant_work,
    kivi_quantize_work,
    lmdeploy_int_decode_work,
    lmdeploy_quantize_work,
    validate_kivi_knobs,
)

H2O_KIVI_IMPLEMENTATIONS = {
    "composed": Implementation(
        "composed", basis="composed", borrows=("h2o/lmdeploy", "kivi/lmdeploy"),
        engine=("LMDeploy-style H2O (score kernel in prefill, one cut to the budget at 64-token blocks, growth in "
                "decode) over LMDeploy-style int blocks (per-token quantisation, a full-precision recent block)"),
        source=("no measurement of the combination: the score terms of h2o/lmdeploy and the dequantisation term of "
                "kivi/lmdeploy, each measured on its own")),
    "reference": Implementation(
        "reference", basis="first principles",
        engine="the H2O and KIVI reference codes combined (eager attention, per-step eviction, contiguous tensors)",
        source="FLOPs and bytes of both papers' algorithms through the roofline"),
}


@dataclass(frozen=True)
class H2OKIVI(Method):
    """H2O's heavy-hitter + recent-window eviction with the kept tokens stored in KIVI's format (the
    sparse + quantized combination studied by Q-Hitter).

    Kept as ``h2o`` (whole prompt during prefill, then min(context, budget); ``kept_limit`` = budget);
    bytes per token as ``kivi`` with this ``bits``/``group_size``; ``extra_bytes_per_seq`` = min(R,
    budget) x (full - quantized) bytes per token (the full-precision tail can not exceed the budget).
    Prefill: eager attention and H2O's column sums; after the last chunk, H2O's selection and gather and
    KIVI quantization of the min(prompt, budget) survivors (nothing is quantized before eviction, which
    needs the full cache). Decode: KIVI's dequantizing attention over the kept tokens, H2O's score
    accumulation and eviction, and KIVI's quantization of one token per sequence per step. Not paged,
    no prefix sharing (both parents are contiguous and request-specific). That is ``impl=reference``.

    ``impl=composed`` (default): the two measured LMDeploy implementations put together, since nobody
    measured the combination: H2O's score kernel, cut and growth (``h2o:impl=lmdeploy``) over KIVI's
    per-token int blocks (``kivi:impl=lmdeploy``); paged.
    """

    budget: int = 256
    window: int = 32
    bits: int = 4
    group_size: int = 32
    residual_length: int = 128
    impl: str = "composed"

    name = "h2o_kivi"
    paper = ("combination of H2O (Zhang et al., NeurIPS 2023, arXiv:2306.14048) and KIVI (Liu et al., ICML 2024, "
             "arXiv:2402.02750); sparse + quantized KV as in Q-Hitter (Zhang et al., MLSys 2024)")
    runtime_needs = ("everything h2o needs (composed: LMDeploy's score kernel and cut; reference: eager attention "
                     "and a score accumulator) plus an integer KV cache and its dequantising attention")
    shares_prefix = False
    IMPLEMENTATIONS = H2O_KIVI_IMPLEMENTATIONS

    @property
    def paged(self) -> bool:
        return self.impl == "composed"

    @property
    def prefill_attention(self) -> str:
        return "flash" if self.impl == "composed" else "eager"

    def validate(self):
        self._require_budget_above_window()
        validate_kivi_knobs(self)

    def kept_tokens(self, prompt_tokens, context_tokens):
        if self.impl == "composed":
            return block_cut_kept(prompt_tokens, context_tokens, self.budget, LMDEPLOY_BLOCK)
        return evicting_kept(prompt_tokens, context_tokens, self.budget)

    def kept_limit(self, prompt_tokens):
        return None if self.impl == "composed" else self.budget

    def bytes_per_token(self, model, tp=1):
        if self.impl == "composed":
            return model.num_layers * int4_token_bytes_per_layer(model, tp, self.bits)
        return model.num_layers * kivi_bytes_per_token_layer(model, tp, self.bits, self.group_size)

    def extra_bytes_per_seq(self, model, tp=1):
        tail = LMDEPLOY_BLOCK if self.impl == "composed" else min(self.residual_length, self.budget)
        return tail * (model.kv_bytes_per_token(tensor_parallel_size=tp) - self.bytes_per_token(model, tp))

    def decode_attention_work(self, model, tp, num_seqs, kept_tokens_sum):
        if self.impl == "composed":
            return lmdeploy_int_decode_work(model, tp, num_seqs, kept_tokens_sum, self.bits, LMDEPLOY_BLOCK,
                                            self.terms()["dequant_ops_per_elem"])
        return super().decode_attention_work(model, tp, num_seqs, kept_tokens_sum) + kivi_dequant_work(model, tp, kept_tokens_sum)

    def decode_extra_work(self, model, tp, num_seqs, kept_tokens_sum):
        if self.impl == "composed":
            return lmdeploy_quantize_work(model, tp, num_seqs, self.bits)
        return (h2o_decode_extra_work(model, tp, kept_tokens_sum)
                + kivi_quantize_work(model, tp, num_seqs, self.bits, self.group_size))

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        if self.impl == "composed":
            return score_pass_work(self.terms(), q_tokens) + lmdeploy_quantize_work(model, tp, q_tokens, self.bits)
        work = h2o_prefill_extra_work(model, tp, q_tokens, kv_tokens, last_chunk, self.budget, self.window)
        quant = kivi_quantize_work(model, tp, min(kv_tokens, self.budget), self.bits, self.group_size) if last_chunk else ZERO
        return work + quant

    def prefill_call_work(self, model, tp, chunks):
        return score_step_work(self.terms()) if self.impl == "composed" else ZERO

    def default_length_ratio(self):
        return LengthRatio(source="no published figure found for the combination (Gao et al., MLSys 2025 measure "
                                  "H2O and KIVI separately); kvprof lengths measures it")
