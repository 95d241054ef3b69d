"""What a run tells the things that watch it: one step event per committed step (or fast-forwarded
decode stretch), plus arrivals and rejections. Metrics (``kvsim.metrics.collector.Recorder``),
``kvsim validate``'s step log, ``kvprof replay``'s step records and progress bars are all observers; the
engine calls them and knows nothing else about them.

A step event is the replica's :class:`Step` itself, handed over when the step is committed: its start and
end, the scheduler's plan, the batch shape the cost model priced, and what the commit left behind (the
sequences that finished, the first inter-token gaps, the KV blocks in use at the step's end). A stretch
of ``ff_steps`` decode steps is one event; its inner steps' end times are ``ff_ends`` and, for observers
that ask (``wants_step_shapes``), their shapes are ``ff_shapes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Step:
    """One planned step, or a fast-forward stretch of decode steps; an event once committed."""

    start_s: float
    end_s: float
    #: the scheduler's plan (kvsim.engine.scheduler.StepPlan): who ran, with how many tokens, who was preempted
    plan: object = None
    #: the batch shape the cost model priced (kvsim.cost.base.StepShape); None for a stretch
    shape: object = None
    #: fast-forward stretch: number of decode steps and each step's end time (summed in step order,
    #: as stepping would advance the clock)
    ff_steps: int = 0
    ff_ends: list = field(default_factory=list)
    #: a stretch's steps as (kept-token sum, largest kept count, step time), when an observer asked
    ff_shapes: list | None = None
    # -- filled in by the commit (not set before it: a planned step carries none of these) --------------
    #: the replica that ran it (kvsim.engine.replica.Replica)
    replica: object = field(init=False)
    #: sequences that finished at ``end_s`` and leave the engine
    finished: list = field(init=False)
    #: sequences whose last token was computed at ``end_s`` but that go on elsewhere (a P/D prefill
    #: instance hands them to a decode instance, kvsim.engine.disagg); None or empty otherwise
    handed_on: list | None = field(init=False)
    #: inter-token gaps the step's first token of each decoding sequence closed (a stretch's later steps
    #: add ``len(plan.scheduled)`` gaps of each ``ff_ends`` difference)
    itl: list = field(init=False)
    #: KV blocks in use at the step's end, before the finished sequences give theirs back
    kv_blocks_used: int = field(init=False)

    @property
    def num_steps(self) -> int:
        return self.ff_steps or 1


#: the old name: a step is planned ("pending") before it becomes an event
PendingStep = Step


class Observer:
    """Watches a run. Every hook is optional; the engine calls only the ones a subclass overrides."""

    #: set True to receive each fast-forwarded step's shape in ``Step.ff_shapes`` (costs a little per step)
    wants_step_shapes = False

    def on_arrival(self, arrival_time_s: float | None) -> None:
        """A request (or an invalid trace record) arrived."""

    def on_reject(self, request_id: str, arrival_time_s, prompt_tokens, output_tokens, reason: str,
                  replica: int = -1) -> None:
        """A request will never be served: ``reason`` says why."""

    def on_step(self, step: Step) -> None:
        """A step (or stretch) was committed at ``step.end_s``; the replica's state is the one after it."""

    def on_end(self, now_s: float) -> None:
        """The run is over (every replica idle)."""


def hooks(observers, name: str) -> list:
    """The bound ``name`` hooks of the observers that override it, in order (what the hot path loops over)."""
    base = getattr(Observer, name)
    return [getattr(o, name) for o in observers if getattr(type(o), name, base) is not base]


def wants_step_shapes(observers) -> bool:
    return any(getattr(o, "wants_step_shapes", False) for o in observers)


__all__ = ["Observer", "PendingStep", "Step", "hooks", "wants_step_shapes"]
