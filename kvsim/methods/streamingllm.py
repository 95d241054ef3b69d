"""StreamingLLM: keep the first ``sink`` tokens (attention sinks) and the last ``window`` tokens."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.methods.base import Method, evicting_kept, length_ratio_from_tail_shares


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
    """

    sink: int = 4
    window: int = 252

    name = "streamingllm"
    paper = ("Xiao et al., 'Efficient Streaming Language Models with Attention Sinks', ICLR 2024, "
             "arXiv:2309.17453")
    runtime_needs = "sliding-window KV eviction with pinned sink blocks (block recycling); no attention scores"
    shares_prefix = False

    def validate(self):
        self._require_int("sink", minimum=0)
        self._require_int("window")

    def kept_tokens(self, prompt_tokens, context_tokens):
        return evicting_kept(prompt_tokens, context_tokens, self.sink + self.window)

    def kept_limit(self, prompt_tokens):
        return self.sink + self.window

    def default_length_ratio(self):
        return length_ratio_from_tail_shares(
            0.173, 0.163,
            "Gao et al., MLSys 2025 (arXiv:2503.24000), Table 9: StreamingLLM on Mistral-7B, 1,000 ShareGPT "
            "prompts, up to 1,024 new tokens: 17.3% of prompts at most half as long, 16.3% at least 1.5x as "
            "long; lognormal fitted to those two shares by kvsim. Their setting (App. A.3): 64 sink + 448 recent "
            "= 512 tokens; they report longer outputs at smaller caches (Fig. 4)")
