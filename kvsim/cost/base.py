"""The cost-model interface: the time of one engine step, given what the batch does.

A step is described by a :class:`StepShape` (new tokens, decode sequences and the KV tokens their
queries attend to, prefill chunks). Implementations are pure: no SimPy, no state that changes between
calls, so they can be tested against hand counts and real timings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial


@dataclass(slots=True)
class StepShape:
    #: decode sequences (one new token each) and the sum over them of kept KV tokens attended
    #: (the new token included)
    num_decode_seqs: int = 0
    decode_kept_tokens: int = 0
    #: prefill chunks: (new tokens, KV tokens attended including the chunk, chunk completes the prompt)
    prefill_chunks: list = field(default_factory=list)
    #: the largest kept-token count among the decodes (0: unknown; the batch is costed as uniform)
    decode_max_kept: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_decode_seqs + sum(c[0] for c in self.prefill_chunks)

    @property
    def num_logit_tokens(self) -> int:
        """Rows that go through the LM head: one per sequence that samples a token this step."""
        return self.num_decode_seqs + sum(1 for c in self.prefill_chunks if c[2])


class CostModel(ABC):
    #: shown in summary.json as ``cost_model``: ``roofline`` or ``profile NAME``
    name: str = "abstract"

    @abstractmethod
    def step_time_s(self, shape: StepShape) -> float:
        """Wall time of one engine step on one replica (all its tensor-parallel GPUs together)."""

    def decode_step_time_s(self, num_seqs: int, kept_tokens_sum: int, max_kept: int = 0) -> float:
        """A pure decode step; the replica's fast-forward calls this once per step, so it is the hot
        path. Must return exactly ``step_time_s(StepShape(num_seqs, kept_tokens_sum, [], max_kept))``."""
        return self.step_time_s(StepShape(num_seqs, kept_tokens_sum, [], max_kept))

    def decode_step_fn(self, num_seqs: int):
        """``decode_step_time_s`` for one batch size, as a function of the kept-token sum and the
        largest kept count, ``fn(kept_tokens_sum, max_kept=0)``. A fast-forward stretch keeps its
        batch, so a model can return something cheaper to call per step; it must give exactly
        ``decode_step_time_s(num_seqs, kept_tokens_sum, max_kept)``."""
        return partial(self.decode_step_time_s, num_seqs)

    def moe_time_s(self, num_tokens: int) -> float:
        """The MoE part (all layers, expert exchange included) of ``step_time_s`` for a step of
        ``num_tokens`` new tokens; 0 for a dense model. With expert parallelism a rank's own step is
        costed as if every rank of its group carried the same count:
        ``moe_time_s(T) == moe_group_time_s(ep * T, T)``."""
        return 0.0

    def moe_group_time_s(self, gathered_tokens: int, largest_share: int) -> float:
        """One expert-parallel rank's MoE blocks (all layers) in a step where the group's ranks carry
        ``gathered_tokens`` tokens in all and the largest of them ``largest_share``. vLLM 0.19's default
        ``allgather_reducescatter`` backend all-gathers every rank's tokens (and router logits) before
        each MoE layer, runs the rank's local experts over the whole gathered batch, and reduce-scatters
        the outputs, so the expert compute follows the group's total and the exchange its largest share
        (kvsim.engine.sim, lockstep groups). 0 for a dense model."""
        return 0.0

    def breakdown(self, shape: StepShape) -> dict[str, float]:
        """Seconds per operation group for one step (for reports); optional."""
        return {"total": self.step_time_s(shape)}
