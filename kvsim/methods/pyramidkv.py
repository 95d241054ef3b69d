"""PyramidKV: SnapKV-style selection with per-layer budgets shrinking from the bottom layer to the top."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.methods.base import LengthRatio
from kvsim.methods.snapkv import SnapKV, validate_window_knobs


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024): observation-window selection as SnapKV, but layer l keeps an
    arithmetically decreasing share; the top layer's prompt budget is (budget - window) / beta, the
    bottom's 2 (budget - window) minus that, so the layer average is the SnapKV budget
    (``layer_budgets`` reproduces the reference's integer arithmetic).

    Kept (the per-layer average, integer): as SnapKV, min(prompt, budget) + generated. Same runtime needs,
    work, prefill path and prefix rule as SnapKV (``window_compression_work`` with the average kept count
    per layer). Paged, with one caveat: layers hold different counts, so a paged port needs per-layer
    block tables; with vLLM's shared block table every layer would hold the bottom layer's count.
    The reference's integer step ((max - min) // (layers - 1), anchored at the bottom) makes its real
    average exceed ``budget`` by ((max - min) mod (layers - 1)) / 2 tokens (11.5 for the defaults and 32
    layers); kvsim keeps the paper's average, the budget.
    """

    beta: int = 20

    name = "pyramidkv"
    paper = ("Cai et al., 'PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling', "
             "arXiv:2406.02069, 2024")
    runtime_needs = ("as snapkv (window scores, pooling, top-k, gather after prefill), with a different budget "
                     "per layer: per-layer cache lengths (per-layer block tables in paged memory)")

    def validate(self):
        validate_window_knobs(self)
        self._require_int("beta")

    def layer_budgets(self, num_layers: int, prompt_tokens: int) -> list[int]:
        """Tokens each layer keeps of a ``prompt_tokens`` prompt, bottom layer first, as the reference
        ``PyramidKVCluster.update_kv``: no compression below the budget, SnapKV's uniform budget below
        2 (budget - window), the pyramid above."""
        b, w, L = self.budget, self.window, num_layers
        if prompt_tokens < b:
            return [prompt_tokens] * L
        if prompt_tokens < 2 * (b - w) or L == 1:
            return [b] * L
        lo = (b - w) // self.beta
        hi = 2 * (b - w) - lo
        if hi >= prompt_tokens - w:
            hi = prompt_tokens - w
            lo = 2 * (b - w) - hi
        step = (hi - lo) // (L - 1)
        return [hi - layer * step + w for layer in range(L)]

    def default_length_ratio(self):
        return LengthRatio(source="no published figure found (Gao et al., MLSys 2025 do not evaluate PyramidKV); "
                                  "kvprof lengths measures it")
