"""The interface every compression method implements; the default behaviour is the plain full cache.

A method is a frozen dataclass whose fields are its knobs (with defaults), so adding one is one file
that overrides only what differs. Everything here is a pure function of (model, knobs, sizes): the
block manager asks for memory, the cost model for work, the replica for output-length ratios.

Units: ``*_tokens`` are token counts, ``bytes`` are bytes on ONE GPU (tensor-parallel split applied),
``Work`` is per transformer layer on one GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from kvsim.cost.work import ZERO, Work
from kvsim.errors import ConfigError
from kvsim.specs.model import ModelSpec


@dataclass(frozen=True)
class LengthRatio:
    """Distribution of output length ratio (compressed / full-cache) for one method setting.

    Either empirical ``samples`` (measured by ``kvprof lengths``) or a lognormal with the given mean
    ratio and sigma of log-ratio (documented defaults). ``source`` says where it came from.
    """

    source: str
    mean_ratio: float = 1.0
    sigma: float = 0.0
    samples: tuple[float, ...] = ()


@dataclass(frozen=True)
class Method:
    #: registry name used in ``--method NAME:knob=value``
    name: ClassVar[str] = ""
    #: the paper (authors, venue, year, arXiv id) the method comes from
    paper: ClassVar[str] = ""
    #: what it needs at run time, for ``kvsim methods``
    runtime_needs: ClassVar[str] = "nothing beyond the plain cache"
    #: works with vLLM's paged blocks; when False the real implementation reserves contiguous memory
    paged: ClassVar[bool] = True
    #: "flash" (FlashAttention, no score matrix) or "eager" (materialised q x k scores, O(n^2) traffic)
    prefill_attention: ClassVar[str] = "flash"
    #: blocks of a shared prompt prefix can be reused by another request
    shares_prefix: ClassVar[bool] = True

    # -- knobs ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the knob and value when the knobs make no sense."""

    @classmethod
    def knobs(cls) -> dict[str, object]:
        """Knob name -> default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def spec_string(self) -> str:
        """The canonical ``name:knob=value,...`` form (all knobs, in declaration order)."""
        kv = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}:{kv}" if kv else self.name

    def _fail(self, knob: str, value, why: str):
        raise ConfigError(f"method {self.name}: knob {knob}={value!r}: {why}")

    # -- memory -----------------------------------------------------------------------------
    def bytes_per_token(self, model: ModelSpec, tp: int = 1) -> float:
        """Stored bytes of one kept token (K and V, every layer), metadata (scales, zeros) amortised."""
        return model.kv_bytes_per_token(tensor_parallel_size=tp)

    def extra_bytes_per_seq(self, model: ModelSpec, tp: int = 1) -> float:
        """Bytes a sequence holds beyond kept_tokens x bytes_per_token (e.g. a full-precision tail)."""
        return 0.0

    def kept_tokens(self, prompt_tokens: int, context_tokens: int) -> int:
        """Tokens held in the cache once ``context_tokens`` (prompt + generated) have been processed.

        While the prompt is still being prefilled (context < prompt) every method holds all of it.
        Contract (tested for every method): in decode, kept grows by 0 or 1 per token, by 1 exactly
        while it is below ``kept_limit(prompt_tokens)``.
        """
        return context_tokens

    def kept_limit(self, prompt_tokens: int) -> int | None:
        """Most tokens held during decode for this prompt; None when unbounded."""
        return None

    # -- kernel work (per layer, one GPU) -----------------------------------------------------
    def kv_read_bytes_per_token(self, model: ModelSpec, tp: int = 1) -> float:
        """Bytes decode attention reads per kept token per layer."""
        return self.bytes_per_token(model, tp) / model.num_layers

    def decode_attention_work(self, model: ModelSpec, tp: int, num_seqs: int, kept_tokens_sum: int) -> Work:
        """Decode attention of a batch: each new query attends to its kept tokens.

        FLOPs: QK^T and PV, 2 x 2 x heads x head_dim per (query, key) pair.
        Bytes: every kept K and V read once, plus the query and output vectors.
        """
        heads = model.num_attention_heads / tp
        flops = 4.0 * heads * model.head_dim * kept_tokens_sum
        qo_bytes = 2.0 * num_seqs * heads * model.head_dim * model.dtype_bytes
        return Work(flops, kept_tokens_sum * self.kv_read_bytes_per_token(model, tp) + qo_bytes
                    + num_seqs * self.extra_bytes_per_seq(model, tp) / model.num_layers)

    def decode_extra_work(self, model: ModelSpec, tp: int, num_seqs: int, kept_tokens_sum: int) -> Work:
        """Method's own work in a decode step (score accumulation, eviction, (de)quantization)."""
        return ZERO

    def prefill_attention_work(self, model: ModelSpec, tp: int, q_tokens: int, kv_tokens: int) -> Work:
        """Prefill attention of one chunk of ``q_tokens`` queries over ``kv_tokens`` keys (causal).

        Flash: FLOPs 4 x heads x head_dim x (causal pairs); bytes: Q, O and the KV read once.
        Eager (materialised scores, what H2O and SnapKV need): the same FLOPs plus the score matrix
        (heads x q x kv, fp32) written, read by softmax, written as probabilities and read by PV.
        """
        heads = model.num_attention_heads / tp
        kv_heads = max(1.0, model.num_kv_heads / tp)
        pairs = q_tokens * kv_tokens - q_tokens * (q_tokens - 1) / 2.0
        flops = 4.0 * heads * model.head_dim * pairs
        b = model.dtype_bytes
        bytes_ = 2.0 * q_tokens * heads * model.head_dim * b + 2.0 * kv_tokens * kv_heads * model.head_dim * b
        if self.prefill_attention == "eager":
            bytes_ += 4.0 * heads * q_tokens * kv_tokens * 4.0
        return Work(flops, bytes_)

    def prefill_extra_work(self, model: ModelSpec, tp: int, q_tokens: int, kv_tokens: int, last_chunk: bool) -> Work:
        """Method's own work for a prefill chunk (quantizing new tokens; compression after the last chunk)."""
        return ZERO

    # -- output length --------------------------------------------------------------------------
    def default_length_ratio(self) -> LengthRatio:
        """Used when no profile has a measured length section for this method and setting."""
        return LengthRatio(source="full cache: output length unchanged by definition")
