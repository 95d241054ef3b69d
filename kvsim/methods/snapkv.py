"""SnapKV: compress the prompt once after prefill, keeping the tokens the last ``window`` queries attend to."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsim.work import ZERO, Work
from kvsim.methods.base import (
    SCORE_BYTES,
    LengthRatio,
    Method,
    block_copy_work,
    compress_once_kept,
    full_bytes_per_token_layer,
    kv_heads_per_gpu,
    q_heads_per_gpu,
    score_pass_work,
    score_step_work,
)
from kvsim.methods.impl import Implementation

#: FLOPs per score element: softmax (max, subtract, exp, sum, divide) and the sum over the window queries
_SOFTMAX_AND_SUM_FLOPS = 6.0


def window_compression_work(model, tp: int, prompt_tokens: int, budget: int, window: int, kernel_size: int,
                            kept_tokens: float) -> Work:
    """One layer's observation-window compression of a ``prompt_tokens`` prompt (nothing when it fits).

    The last ``window`` queries score every prompt key (QK^T per query head, materialised fp32: written,
    read and written by softmax, read by the sum over the window), the column scores are pooled
    (``kernel_size``), top-(budget - window) is taken per KV head, and the ``kept_tokens`` survivors' K
    and V are gathered into fresh memory (read + write). The window queries come from the last chunk.
    """
    if prompt_tokens <= budget:
        return ZERO
    h, hkv, d, b = q_heads_per_gpu(model, tp), kv_heads_per_gpu(model, tp), model.head_dim, model.dtype_bytes
    w, p = min(window, prompt_tokens), prompt_tokens
    flops = (2.0 * h * d * w * p + _SOFTMAX_AND_SUM_FLOPS * h * w * p + kernel_size * h * p
             + hkv * p * math.log2(max(2, budget - window)))
    bytes_ = (hkv * d * b * p                         # read the prompt's keys
              + 4.0 * SCORE_BYTES * h * w * p         # the window's score matrix, four passes
              + 4.0 * SCORE_BYTES * h * p             # column scores: write, pool read, pooled write, top-k read
              + 2.0 * kept_tokens * full_bytes_per_token_layer(model, tp))  # gather the survivors
    return Work(flops, bytes_)


def pool_topk_work(model, tp: int, prompt_tokens: int, budget: int, window: int, kernel_size: int) -> Work:
    """Pooling the window's column scores (``kernel_size``) and a top-(budget - window) per KV head over
    a ``prompt_tokens`` prompt (one layer): column scores written, read by the pool, written, read by
    top-k (fp32)."""
    h, hkv = q_heads_per_gpu(model, tp), kv_heads_per_gpu(model, tp)
    return Work(kernel_size * h * prompt_tokens + hkv * prompt_tokens * math.log2(max(2, budget - window)),
                4.0 * SCORE_BYTES * h * prompt_tokens)


def composed_compression_work(m: Method, model, tp: int, prompt_tokens: int, kept_tokens: float) -> Work:
    """An observation-window compression built from measured terms (one layer, one sequence): the
    measured score pass over the prompt (LMDeploy's H2O score kernel: bytes per prompt token; its host
    time per step is ``composed_call_work``), pooling and top-k counted from first principles, and a
    block copy of the survivors."""
    if prompt_tokens <= m.budget:
        return ZERO
    return (score_pass_work(m.terms(), prompt_tokens)
            + pool_topk_work(model, tp, prompt_tokens, m.budget, m.window, m.kernel_size)
            + block_copy_work(model, tp, kept_tokens))


def composed_call_work(m: Method, chunks) -> Work:
    """The score hook's fixed host time per layer, in a step where some prompt longer than the budget
    finishes its prefill (the only steps that compress)."""
    if any(last and kv > m.budget for _, kv, last in chunks):
        return score_step_work(m.terms())
    return ZERO


#: SnapKV and PyramidKV run no engine's measured kernels; their costs are built from measured terms
WINDOW_IMPLEMENTATIONS = {
    "composed": Implementation(
        "composed", basis="composed", borrows=("h2o/lmdeploy",),
        engine=("an observation-window compression in a paged serving engine: score kernel over the prompt, "
                "pooling, top-k, and a copy of the survivors into fresh blocks when prefill ends"),
        source=("the score pass from the measured LMDeploy H2O score kernel (h2o/lmdeploy: host time per step, "
                "bytes per prompt token); pooling, top-k and the survivors' copy from first principles")),
    "reference": Implementation(
        "reference", basis="first principles",
        engine="the reference code: FlashAttention for the prompt, the window's scores materialised separately",
        source="FLOPs and bytes of the paper's algorithm (arXiv:2404.14469) through the roofline"),
}


def validate_window_knobs(m: Method) -> None:
    m._require_impl()
    m._require_budget_above_window()
    m._require_int("kernel_size")


@dataclass(frozen=True)
class SnapKV(Method):
    """SnapKV (Li et al., NeurIPS 2024): once the prompt is prefilled, each layer and KV head keeps the
    ``budget - window`` prompt tokens the last ``window`` prompt queries attend to most (scores pooled
    over ``kernel_size`` neighbours) plus the window itself; generated tokens are then appended without
    further eviction.

    Kept: the whole prompt while it is prefilled, then min(prompt, budget) + generated tokens
    (``kept_limit`` None). Bytes per token as ``none``. Prefill attention: FlashAttention for the bulk,
    as the reference (it patches the FlashAttention-2 forward) and kvpress do; only the window's scores
    are materialised, counted explicitly in ``prefill_extra_work`` on the last chunk
    (``window_compression_work``). Decode: plain attention over the kept tokens, no extra work. Paged:
    after the one-time compression the cache is append-only like ``none``; a paged engine gathers the
    survivors into fresh blocks and frees the prompt's blocks (the engine's ``after_compute`` shrink).
    No prefix sharing: the survivors depend on the request's own last ``window`` tokens.

    ``impl=composed`` (default): no engine's SnapKV has been measured, so the compression is built from
    measured terms it shares with LMDeploy's H2O score kernel (host time per step, bytes per prompt
    token: ``composed_compression_work``), plus pooling, top-k and the survivors' copy
    from first principles. Real implementations pay for that window scoring; at the default budget it
    costs a large share of prefill throughput at prompts of 512 tokens and more, where the reference
    model below says it is nearly free. ``impl=reference``: the first-principles model below.
    """

    budget: int = 256
    window: int = 32
    kernel_size: int = 7
    impl: str = "composed"

    name = "snapkv"
    paper = ("Li et al., 'SnapKV: LLM Knows What You are Looking for Before Generation', NeurIPS 2024, "
             "arXiv:2404.14469")
    runtime_needs = ("scores of the last window prompt queries over the prompt (one extra QK^T per layer), "
                     "pooling, top-k and a gather after prefill; FlashAttention for everything else")
    shares_prefix = False
    IMPLEMENTATIONS = WINDOW_IMPLEMENTATIONS

    def validate(self):
        validate_window_knobs(self)

    def kept_tokens(self, prompt_tokens, context_tokens):
        return compress_once_kept(prompt_tokens, context_tokens, self.budget)

    def kept_limit(self, prompt_tokens):
        return None

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        if not last_chunk:
            return ZERO
        if self.impl == "composed":
            return composed_compression_work(self, model, tp, kv_tokens, self.budget)
        return window_compression_work(model, tp, kv_tokens, self.budget, self.window, self.kernel_size, self.budget)

    def prefill_call_work(self, model, tp, chunks):
        return composed_call_work(self, chunks) if self.impl == "composed" else ZERO

    def default_length_ratio(self):
        return LengthRatio(source="no published figure found (Gao et al., MLSys 2025 measure SnapKV's throughput "
                                  "only, Fig. 9); kvprof lengths measures it")
