"""The uncompressed cache: every token kept in the model dtype (fp16/bf16)."""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.methods.base import Method


@dataclass(frozen=True)
class NoCompression(Method):
    """Full KV cache, the baseline every method is compared against (vLLM ``kv_cache_dtype=auto``)."""

    name = "none"
    paper = "baseline: vLLM PagedAttention (Kwon et al., SOSP 2023, arXiv:2309.06180)"
