"""H2O: keep the heavy hitters (largest accumulated attention) plus a window of recent tokens, evicting every step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsim.work import ZERO, Work
from kvsim.methods.base import (
    LMDEPLOY_BLOCK,
    SCORE_BYTES,
    Method,
    block_cut_kept,
    evicting_kept,
    full_bytes_per_token_layer,
    kv_heads_per_gpu,
    length_ratio_from_tail_shares,
    q_heads_per_gpu,
    score_pass_work,
    score_step_work,
)
from kvsim.methods.impl import Implementation


def h2o_decode_extra_work(model, tp: int, kept_tokens_sum: int) -> Work:
    """Score accumulation and eviction of one decode step (one layer, all sequences).

    Scores are kept per KV head (the probabilities of the query heads of a group summed; per head for
    MHA), because a KV head's K and V can only be evicted together. Per kept token:
    the attention kernel writes its probabilities (fp32, every query head) and the accumulation reads
    them back; the accumulator (fp32, per KV head) is read and written; the eviction reads it again for
    an argmin over the older tokens and overwrites the victim's slot in place. FLOPs: one add per
    probability, one compare per accumulated score.
    """
    h, hkv = q_heads_per_gpu(model, tp), kv_heads_per_gpu(model, tp)
    flops = (h + hkv) * kept_tokens_sum
    bytes_ = SCORE_BYTES * kept_tokens_sum * (2.0 * h + 3.0 * hkv)
    return Work(flops, bytes_)


def h2o_prefill_extra_work(model, tp: int, q_tokens: int, kv_tokens: int, last_chunk: bool,
                           budget: int, window: int) -> Work:
    """Prefill chunk: column sums of the (materialised) probability matrix into the per-KV-head scores;
    after the last chunk, top-(budget - window) selection per KV head and a gather of the kept tokens
    into the compacted cache when the prompt is longer than the budget."""
    h, hkv = q_heads_per_gpu(model, tp), kv_heads_per_gpu(model, tp)
    pairs = q_tokens * kv_tokens  # the eager kernel's score matrix is the full rectangle
    flops = h * pairs
    bytes_ = SCORE_BYTES * (h * pairs + 2.0 * hkv * kv_tokens)
    if last_chunk and kv_tokens > budget:
        flops += hkv * kv_tokens * math.log2(max(2, budget - window))
        bytes_ += SCORE_BYTES * hkv * kv_tokens + 2.0 * budget * full_bytes_per_token_layer(model, tp)
    return Work(flops, bytes_)


H2O_IMPLEMENTATIONS = {
    "lmdeploy": Implementation(
        "lmdeploy", basis="measured", terms_key="h2o/lmdeploy",
        engine=("LMDeploy 0.6 PyTorch engine as forked by Gao et al. (MLSys 2025): the normal Triton prefill "
                "attention plus an extra Triton kernel that computes attention scores; after prefill the cache is "
                "cut once to the budget at 64-token block granularity (first and recent blocks), then grows again "
                "during decoding; paged; no work in decode"),
        source=("score_host_step_s and score_bytes_per_token fitted on the seed paper's H2O prefill "
                "throughput, Llama-2-7B and 13B (../shared/reference/seed-lmdeploy; kvsim fit-methods, "
                "leave-one-model-out checked); the decode side follows from the kept tokens alone")),
    "reference": Implementation(
        "reference", basis="first principles",
        engine="H2O's reference code (HF eager attention, per-step eviction on contiguous per-request tensors)",
        source="FLOPs and bytes of the paper's algorithm (arXiv:2306.14048) through the roofline"),
}


@dataclass(frozen=True)
class H2O(Method):
    """H2O (Zhang et al., NeurIPS 2023): a fixed budget of ``budget`` tokens per sequence = the ``window``
    most recent tokens plus the ``budget - window`` heavy hitters with the largest accumulated attention.

    ``impl=lmdeploy`` (default; measured): what the seed paper's LMDeploy fork runs. Prefill is the
    engine's normal attention plus a score kernel whose cost was fitted as two terms per layer: host
    time per step (``score_host_step_s``) and bytes per prompt token (``score_bytes_per_token``, at the
    GPU's attention bandwidth): a fixed cost and a cheap linear pass, not a quadratic score matrix, so
    H2O loses most at short prompts and small batches. When prefill ends the prompt's cache
    is cut once to ``budget`` at 64-token block granularity (first and recent blocks, the last one
    partial); decoding then appends every token (``kept_limit`` None) with no extra work. Paged; prefix
    blocks not shared. ``window`` does not apply (which blocks survive does not change the cost).

    ``impl=reference`` (first principles): the paper's algorithm as its reference code runs it, below.

    Kept: the whole prompt while it is prefilled (scores need it), evicted to min(prompt, budget) when
    prefill ends, then min(context, budget): one token evicted per step once full. ``kept_limit`` =
    budget. Bytes per token as ``none`` (model dtype). Prefill attention is eager (the scores are the
    method's input: materialised q x k matrix), plus the column sums and, after the last chunk, the
    selection and gather (``h2o_prefill_extra_work``). Decode: attention over the kept tokens plus
    score accumulation and an argmin eviction every step (``h2o_decode_extra_work``). Not paged: the
    reference keeps per-request contiguous HF tensors and rebuilds them on eviction. A paged port is
    possible (write each new token into the evicted token's slot: attention ignores slot order once
    RoPE is applied) but no serving engine ships one, so kvsim follows the reference and the block
    manager reserves the request's lifetime footprint (the prompt during prefill, then at most the
    budget) at admission. No prefix sharing: which tokens survive depends on each request's own
    attention, so the cache of a shared prefix differs per request.
    """

    budget: int = 256
    window: int = 32
    impl: str = "lmdeploy"

    name = "h2o"
    paper = ("Zhang et al., 'H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language "
             "Models', NeurIPS 2023, arXiv:2306.14048")
    runtime_needs = ("attention scores: lmdeploy, an extra score kernel in prefill and a one-time block cut; "
                     "reference, probabilities at every step (eager attention), an fp32 score accumulator per KV "
                     "head and token and a per-request contiguous cache of budget tokens")
    shares_prefix = False
    IMPLEMENTATIONS = H2O_IMPLEMENTATIONS

    @property
    def paged(self) -> bool:
        return self.impl == "lmdeploy"

    @property
    def prefill_attention(self) -> str:
        return "flash" if self.impl == "lmdeploy" else "eager"

    def validate(self):
        self._require_impl()
        self._require_budget_above_window()

    def kept_tokens(self, prompt_tokens, context_tokens):
        if self.impl == "lmdeploy":
            return block_cut_kept(prompt_tokens, context_tokens, self.budget, LMDEPLOY_BLOCK)
        return evicting_kept(prompt_tokens, context_tokens, self.budget)

    def kept_limit(self, prompt_tokens):
        return None if self.impl == "lmdeploy" else self.budget

    def decode_extra_work(self, model, tp, num_seqs, kept_tokens_sum):
        if self.impl == "lmdeploy":
            return ZERO
        return h2o_decode_extra_work(model, tp, kept_tokens_sum)

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        if self.impl == "lmdeploy":
            return score_pass_work(self.terms(), q_tokens)
        return h2o_prefill_extra_work(model, tp, q_tokens, kv_tokens, last_chunk, self.budget, self.window)

    def prefill_call_work(self, model, tp, chunks):
        return score_step_work(self.terms()) if self.impl == "lmdeploy" else ZERO

    def default_length_ratio(self):
        return length_ratio_from_tail_shares(
            0.110, 0.143,
            "Gao et al., MLSys 2025 (arXiv:2503.24000), Table 9: H2O on Mistral-7B, 1,000 ShareGPT prompts, "
            "up to 1,024 new tokens: 11.0% of prompts at most half as long, 14.3% at least 1.5x as long; "
            "lognormal fitted to those two shares by kvsim. Their setting (App. A.3): 512 tokens = 64 heavy "
            "hitters + 448 recent; they report longer outputs at smaller caches (Fig. 4)")
