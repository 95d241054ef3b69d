"""SnapKV: compress the prompt once after prefill, keeping the tokens the last ``window`` queries attend to."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsim.cost.work import ZERO, Work
from kvsim.methods.base import (
    SCORE_BYTES,
    LengthRatio,
    Method,
    compress_once_kept,
    full_bytes_per_token_layer,
    kv_heads_per_gpu,
    q_heads_per_gpu,
)

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


def validate_window_knobs(m: Method) -> None:
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
    """

    budget: int = 256
    window: int = 32
    kernel_size: int = 7

    name = "snapkv"
    paper = ("Li et al., 'SnapKV: LLM Knows What You are Looking for Before Generation', NeurIPS 2024, "
             "arXiv:2404.14469")
    runtime_needs = ("scores of the last window prompt queries over the prompt (one extra QK^T per layer), "
                     "pooling, top-k and a gather after prefill; FlashAttention for everything else")
    shares_prefix = False

    def validate(self):
        validate_window_knobs(self)

    def kept_tokens(self, prompt_tokens, context_tokens):
        return compress_once_kept(prompt_tokens, context_tokens, self.budget)

    def kept_limit(self, prompt_tokens):
        return None

    def prefill_extra_work(self, model, tp, q_tokens, kv_tokens, last_chunk):
        if not last_chunk:
            return ZERO
        return window_compression_work(model, tp, kv_tokens, self.budget, self.window, self.kernel_size, self.budget)

    def default_length_ratio(self):
        return LengthRatio(source="no published figure found (Gao et al., MLSys 2025 measure SnapKV's throughput "
                                  "only, Fig. 9); kvprof lengths measures it")
