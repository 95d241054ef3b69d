"""StreamingLLM: keep the first ``sink`` tokens (attention sinks) and the last ``window`` tokens."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.work import ZERO, Work
from kvsim.methods.base import (
    LMDEPLOY_BLOCK,
    Method,
    block_copy_work,
    block_cut_kept,
    evicting_kept,
    length_ratio_from_tail_shares,
)
from kvsim.methods.impl import Implementation

STREAMING_IMPLEMENTATIONS = {
    "lmdeploy": Implementation(
        "lmdeploy", basis="measured", terms_key="streamingllm/lmdeploy",
        engine=("LMDeploy 0.6 PyTorch engine as forked by Gao et al. (MLSys 2025): no score kernel; after prefill "
                "the cache is cut once to sink + window tokens (sink blocks plus recent blocks, 64-token granularity) "
                "with a block copy, then grows again during decoding; paged"),
        source=("cut_host_seq_s fitted on the seed paper's StreamingLLM prefill throughput, Llama-2-7B and 13B "
                "(../shared/reference/seed-lmdeploy; kvsim fit-methods, leave-one-model-out checked); the block "
                "copy's bytes and the decode side follow from the kept tokens")),
    "sliding": Implementation(
        "sliding", basis="first principles",
        engine=("attention sinks plus a ring buffer over the window in a paged engine (vLLM-style sliding-window "
                "block recycling): the cache never exceeds sink + window"),
        source="the paper's algorithm (arXiv:2309.17453); eviction is index arithmetic, counted as no work"),
}


@dataclass(frozen=True)
class StreamingLLM(Method):
    """StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a sliding window, no scores needed.

    Kept: the whole prompt while it is prefilled, then min(context, sink + window): the sink tokens and
    the most recent ``window`` tokens. ``kept_limit`` = sink + window. Bytes per token as ``none``.
    Prefill uses FlashAttention (no scores); eviction is a ring buffer over the window (index
    arithmetic, counted as zero work). The reference re-applies RoPE to the cached keys at their cache
    positions every step; a serving implementation stores post-RoPE keys and skips that (zero extra
    work here; a measured ``extra.decode.streamingllm`` table would capture it). Paged: the sink blocks
    stay and the window's oldest block is freed as the window slides (vLLM's sliding-window block
    recycling), so memory follows the kept count to within one block. No prefix sharing: only the sinks
    would be common to two requests; the window moves with each request's own context.
    ``sink`` = 0 is plain window attention (the paper's failing baseline).

    ``impl=lmdeploy`` (default; measured) is what the seed paper's LMDeploy fork runs: the prompt's
    cache is cut once, when prefill ends, to sink + window tokens at 64-token block granularity (sink
    blocks and recent blocks, copied into place), and decoding appends every token without further
    eviction (``kept_limit`` None); the copy's bytes plus a fitted host time per sequence
    (``cut_host_seq_s``) are its prefill cost. ``impl=sliding`` (first principles) is the ring buffer
    described above.
    """

    sink: int = 4
    window: int = 252
    impl: str = "lmdeploy"

    name = "streamingllm"
    paper = ("Xiao et al., 'Efficient Streaming Language Models with Attention Sinks', ICLR 2024, "
             "arXiv:2309.17453")
    runtime_needs = ("no attention scores; lmdeploy: a block copy when prefill ends; sliding: window eviction with "
                     "pinned sink blocks (block recycling)")
    shares_prefix = False

    IMPLEMENTATIONS = STREAMING_IMPLEMENTATIONS

    def validate(self):
        self._require_impl()
        self._require_int("sink", minimum=0)
        self._require_int("window")

    def kept_tokens(self, prompt_tokens, context_tokens):
        if self.impl == "lmdeploy":
            return block_cut_kept(prompt_tokens, context_tokens, self.sink + self.window, LMDEPLOY_BLOCK)
        return evicting_kept(prompt_tokens, context_tokens, self.sink + self.window)

    def kept_limit(self, prompt_tokens):
        return None if self.impl == "lmdeploy" else self.sink + self.window

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        if self.impl != "lmdeploy" or not last_chunk or kv_tokens <= self.sink + self.window:
            return ZERO
        kept = block_cut_kept(kv_tokens, kv_tokens, self.sink + self.window, LMDEPLOY_BLOCK)
        return block_copy_work(model, tp, kept) + Work(host_s=self.terms()["cut_host_seq_s"])

    def default_length_ratio(self):
        return length_ratio_from_tail_shares(
            0.173, 0.163,
            "Gao et al., MLSys 2025 (arXiv:2503.24000), Table 9: StreamingLLM on Mistral-7B, 1,000 ShareGPT "
            "prompts, up to 1,024 new tokens: 17.3% of prompts at most half as long, 16.3% at least 1.5x as "
            "long; lognormal fitted to those two shares by kvsim. Their setting (App. A.3): 64 sink + 448 recent "
            "= 512 tokens; they report longer outputs at smaller caches (Fig. 4)")
