"""The interface every compression method implements; the default behaviour is the plain full cache.

A method is a frozen dataclass whose fields are its knobs (with defaults), so adding one is one file
that overrides only what differs. Everything here is a pure function of (model, knobs, sizes): the
block manager asks for memory, the cost model for work, the replica for output-length ratios.

Units: ``*_tokens`` are token counts, ``bytes`` are bytes on ONE GPU (tensor-parallel split applied),
``Work`` is per transformer layer on one GPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

from kvsim.work import ZERO, Work
from kvsim.errors import ConfigError
from kvsim.methods.impl import Implementation
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
    #: "published" (a method's documented default), "measured" (``kvprof lengths``) or "unchanged"
    #: (ratio 1: the full cache, no published figure, or ``--lengths trace``); chosen in engine/output_length
    kind: str = "published"
    #: the model a measured distribution was measured on
    measured_on: str | None = None

    @property
    def log_mu(self) -> float:
        """Mean of the log-ratio: ``mean_ratio`` is the arithmetic mean E[ratio] of the lognormal, so
        log-ratio ~ Normal(ln(mean_ratio) - sigma^2 / 2, sigma) (the convention of engine/output_length)."""
        return math.log(self.mean_ratio) - self.sigma ** 2 / 2.0

    def share_below(self, ratio: float) -> float:
        """P(ratio <= r) under the lognormal (for checking a default against the figures it came from)."""
        if self.sigma == 0.0:
            return 1.0 if self.mean_ratio <= ratio else 0.0
        return NormalDist(self.log_mu, self.sigma).cdf(math.log(ratio))


def length_ratio_from_tail_shares(share_halved: float, share_longer_half: float, source: str) -> LengthRatio:
    """Lognormal output-length ratio fitted to two published tail shares.

    ``share_halved``: fraction of prompts whose compressed output is at most half the full-cache length
    (D >= 50 % in Gao et al., MLSys 2025); ``share_longer_half``: fraction at least 1.5x as long (D <= -50 %).
    Two quantiles fix the two lognormal parameters exactly:
    ln 0.5 = mu + z(share_halved) sigma and ln 1.5 = mu + z(1 - share_longer_half) sigma.
    """
    n = NormalDist()
    z_lo, z_hi = n.inv_cdf(share_halved), n.inv_cdf(1.0 - share_longer_half)
    sigma = (math.log(1.5) - math.log(0.5)) / (z_hi - z_lo)
    mu = math.log(0.5) - z_lo * sigma
    return LengthRatio(source=source, mean_ratio=math.exp(mu + sigma ** 2 / 2.0), sigma=sigma)


# -- measured terms as work (helpers for implementations; kvsim.methods.impl says what the terms are) -----


def dequant_alu_work(model: ModelSpec, tp: int, tokens: float, ops_per_elem: float) -> Work:
    """A dequantising kernel's CUDA-core work over ``tokens`` tokens' K and V (one layer)."""
    return Work(alu_ops=ops_per_elem * tokens * kv_elems_per_token_layer(model, tp))


def score_step_work(terms: dict) -> Work:
    """A prefill score hook's fixed host time per layer per step (launches, a device-to-host sync)."""
    return Work(host_s=terms.get("score_host_step_s", 0.0))


def score_pass_work(terms: dict, tokens: float) -> Work:
    """One sequence's score pass over ``tokens`` prompt tokens (one layer): its host time per sequence
    and the bytes the score kernel moves per token."""
    return Work(bytes=terms.get("score_bytes_per_token", 0.0) * tokens, host_s=terms.get("score_host_seq_s", 0.0))


def block_copy_work(model: ModelSpec, tp: int, tokens: float, bytes_per_token_layer: float | None = None) -> Work:
    """Copying ``tokens`` kept tokens' K and V into fresh blocks (read + write, one layer)."""
    b = full_bytes_per_token_layer(model, tp) if bytes_per_token_layer is None else bytes_per_token_layer
    return Work(bytes=2.0 * tokens * b)


# -- shared sizes and constants (helpers for the method files) ------------------------------------------

#: bytes of one attention score, accumulated score or probability (fp32, as every reference keeps them)
SCORE_BYTES = 4
#: FLOPs to quantize one element: group min and max, subtract the zero point, scale, round
QUANT_FLOPS_PER_ELEM = 5
#: FLOPs to dequantize one integer element inside the attention kernel: x * scale + zero
DEQUANT_FLOPS_PER_ELEM = 2


def kv_heads_per_gpu(model: ModelSpec, tp: int = 1) -> int:
    """KV heads one GPU holds: the rule of ``ModelSpec.kv_bytes_per_token`` (split across TP ranks, at least one)."""
    return max(1, model.num_kv_heads // tp) if tp > 1 else model.num_kv_heads


def q_heads_per_gpu(model: ModelSpec, tp: int = 1) -> float:
    """Query heads one GPU computes (as ``Method.decode_attention_work`` counts them)."""
    return model.num_attention_heads / tp


def kv_elems_per_token_layer(model: ModelSpec, tp: int = 1) -> int:
    """K and V elements of one token in one layer on one GPU: 2 x KV heads x head_dim."""
    return 2 * kv_heads_per_gpu(model, tp) * model.head_dim


def full_bytes_per_token_layer(model: ModelSpec, tp: int = 1) -> float:
    """Bytes of one token's K and V in one layer in the model dtype (what ``none`` stores)."""
    return kv_elems_per_token_layer(model, tp) * model.dtype_bytes


def evicting_kept(prompt_tokens: int, context_tokens: int, limit: int) -> int:
    """Kept tokens of a method that evicts down to ``limit`` once prefill ends and then holds at most
    ``limit`` (H2O, StreamingLLM): all of the prompt while it is prefilled, then min(context, limit)."""
    if context_tokens < prompt_tokens:
        return context_tokens
    return min(context_tokens, limit)


def block_cut_kept(prompt_tokens: int, context_tokens: int, budget: int, block: int) -> int:
    """Kept tokens of an engine that cuts the prompt's cache once after prefill to whole blocks of
    ``block`` tokens (the first blocks and the most recent ones, the last possibly partial) fitting in
    ``budget``, then appends every generated token (LMDeploy's H2O and StreamingLLM in the seed paper's
    fork): all of the prompt while it is prefilled, then cut + generated."""
    if context_tokens < prompt_tokens:
        return context_tokens
    if prompt_tokens <= budget:
        return context_tokens
    tail = prompt_tokens % block or block
    cut = (max(1, budget // block) - 1) * block + tail
    return min(prompt_tokens, cut) + (context_tokens - prompt_tokens)


#: LMDeploy's KV block (the seed paper's runs: block size 64), the granularity its cut works at
LMDEPLOY_BLOCK = 64


def compress_once_kept(prompt_tokens: int, context_tokens: int, budget: int) -> int:
    """Kept tokens of a method that compresses the prompt once when prefill ends and then only appends
    (SnapKV, PyramidKV): all of the prompt while it is prefilled, then min(prompt, budget) + generated."""
    if context_tokens < prompt_tokens:
        return context_tokens
    return min(prompt_tokens, budget) + (context_tokens - prompt_tokens)


#: the implementation of methods that have only one: the engine's own kernels for the plain cache
BASELINE = Implementation(
    "baseline", engine="the engine's own attention kernels on the plain cache", basis="first principles",
    source="FLOPs and bytes of each kernel through the roofline, or a measured kernel profile")


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
    #: whose kernels the costs describe, by ``impl`` knob value (the first one is the default); a method
    #: without an ``impl`` knob has the one implementation ``BASELINE`` (module ``kvsim.methods.impl``)
    IMPLEMENTATIONS: ClassVar[dict[str, Implementation]] = {}

    # -- knobs ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the knob and value when the knobs make no sense."""

    def implementation(self) -> Implementation:
        """The implementation whose costs this instance uses (its ``impl`` knob)."""
        impl = getattr(self, "impl", None)
        if impl is None:
            return BASELINE
        return self.IMPLEMENTATIONS[impl]

    def terms(self) -> dict[str, float]:
        """The implementation's measured (or borrowed) cost terms."""
        return self.implementation().terms()

    def resolve(self, hardware) -> "Method":
        """This method as it runs on ``hardware`` (an implementation that depends on the GPU, such as
        fp8 with or without fp8 tensor cores, picks its concrete variant here); the cost model calls it
        once. Default: unchanged."""
        return self

    def _require_impl(self) -> None:
        self._require_choice("impl", tuple(self.IMPLEMENTATIONS))

    @classmethod
    def knobs(cls) -> dict[str, object]:
        """Knob name -> default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def spec_string(self) -> str:
        """The canonical ``name:knob=value,...`` form (all knobs, in declaration order)."""
        kv = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}:{kv}" if kv else self.name

    def algorithm_spec(self) -> str:
        """``spec_string()`` without the ``impl`` knob: the algorithm's setting, which is what decides
        the tokens kept and so the answers (measured output lengths are keyed by it)."""
        kv = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.name != "impl")
        return f"{self.name}:{kv}" if kv else self.name

    def _fail(self, knob: str, value, why: str):
        raise ConfigError(f"method {self.name}: knob {knob}={value!r}: {why}")

    def _require_int(self, knob: str, minimum: int = 1) -> int:
        """The knob's value, failing unless it is an integer >= ``minimum``."""
        v = getattr(self, knob)
        if isinstance(v, bool) or not isinstance(v, int):
            self._fail(knob, v, "must be an integer")
        if v < minimum:
            self._fail(knob, v, "must be positive" if minimum == 1 else f"must be at least {minimum}")
        return v

    def _require_ratio(self, knob: str) -> float:
        """The knob's value, failing unless it is a number in [0, 1)."""
        v = getattr(self, knob)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            self._fail(knob, v, "must be a fraction in [0, 1)")
        return float(v)

    def _require_choice(self, knob: str, choices) -> None:
        v = getattr(self, knob)
        if isinstance(v, bool) or v not in choices:
            self._fail(knob, v, f"not a supported value; supported: {', '.join(map(str, choices))}")

    def _require_budget_above_window(self, budget: str = "budget", window: str = "window") -> None:
        b, w = self._require_int(budget), self._require_int(window)
        if b <= w:
            self._fail(budget, b, f"budget below the window: it includes the {window}={w} most recent tokens, "
                                  f"so it must be larger than {w}")

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

    def prefill_call_work(self, model: ModelSpec, tp: int, chunks) -> Work:
        """Method's own work once per layer in a step that prefills ``chunks`` ((new tokens, KV tokens,
        completes the prompt) each), beyond the per-chunk work: a hook's fixed host time (launching its
        kernels, a device-to-host sync)."""
        return ZERO

    # -- output length --------------------------------------------------------------------------
    def default_length_ratio(self) -> LengthRatio:
        """Used when no profile has a measured length section for this method and setting."""
        return LengthRatio(source="full cache: output length unchanged by definition")
