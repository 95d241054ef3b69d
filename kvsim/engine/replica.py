"""One engine replica's step loop, in plain Python (no SimPy): schedule, cost, commit.

The SimPy layer (``sim.py``) calls ``begin()`` at a step's start and ``commit()`` at its end, and waits
the duration in between. A stretch of pure decode steps during which no scheduling decision can change
(no arrival, no completion, no block shortage, nobody admissible) is planned and committed in one go
(``fast-forward``); it computes the same step times, in the same order, as stepping one by one, so the
results are identical (tests/test_fast_forward.py).

Asynchronous scheduling (vLLM's ``--async-scheduling``, its default since 0.14): the engine schedules
step n+1 as soon as step n is launched, so a request that arrives while step n runs is first seen when
step n+2 is scheduled. Such arrivals wait in ``incoming`` and are handed to the scheduler at the
``begin`` whose previous step started after them; when nothing else could run, at once (vLLM then has
no step n+1 in flight and schedules the request as soon as step n ends).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import accumulate
from operator import attrgetter

from kvsim.cost.base import CostModel, StepShape
from kvsim.engine.events import PendingStep, Step, hooks, wants_step_shapes
from kvsim.engine.kv_cache_manager import KVCacheManager
from kvsim.engine.scheduler import Scheduler, StepPlan
from kvsim.engine.sequence import FINISHED, RUNNING, Sequence


class Replica:
    def __init__(self, replica_id: int, scheduler: Scheduler, kv: KVCacheManager, cost: CostModel,
                 observers=(), max_model_len: int = 1 << 62, fast_forward: bool = True,
                 reject_over_budget_prompts: bool = False, async_scheduling: bool = False):
        self.id = replica_id
        self.scheduler = scheduler
        self.kv = kv
        self.method = kv.method
        self.cost = cost
        self.set_observers(observers)
        self.max_model_len = max_model_len
        self.fast_forward = fast_forward
        self.reject_over_budget_prompts = reject_over_budget_prompts
        #: prompt + output tokens of requests assigned here and not finished (the router's load)
        self.outstanding_tokens = 0
        self.num_ff_stretches = 0
        #: id of the lockstep group this replica is a data-parallel rank of (kvsim.engine.sim); None: independent
        self.lockstep_group = None
        self.pending: Step | None = None
        #: KV bytes held by the running sequences and what the full cache would hold for them, integrated
        #: over simulated time (byte-seconds); the current values and when they were last updated
        self.kv_held_byte_s = 0.0
        self.kv_full_byte_s = 0.0
        self._kv_held_now = 0.0
        self._kv_full_now = 0.0
        self.kv_last_s = 0.0
        #: the most KV bytes this replica's sequences held at once, and the most the full cache would have
        self.peak_kv_held_bytes = 0.0
        self.peak_kv_full_bytes = 0.0
        self.async_scheduling = async_scheduling
        #: async scheduling: requests that arrived while a step ran, not yet seen by the scheduler
        self.incoming: list[Sequence] = []
        #: start and end of the last step committed (a stretch's last step)
        self._last_start_s = -float("inf")
        self._last_end_s = -float("inf")
        #: what moves this replica's KV beyond its GPUs (a CPU tier, a P/D side; kvsim.engine.offload and
        #: kvsim.engine.disagg): each gets ``before_schedule(now)`` at every step boundary; () for a plain replica
        self.agents = ()

    def set_observers(self, observers) -> None:
        """Who hears of this replica's steps and rejections (kvsim.engine.events.Observer)."""
        self.observers = list(observers)
        self._on_step = hooks(self.observers, "on_step")
        self._on_reject = hooks(self.observers, "on_reject")
        #: an observer wants every fast-forwarded step's shape (validate's step log)
        self._record_shapes = wants_step_shapes(self.observers)

    # -- arrivals -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> str | None:
        """Queue a request; returns a rejection reason instead when it can never be served here."""
        seq.replica = self.id
        if seq.prompt_tokens + seq.output_tokens > self.max_model_len:
            return "exceeds_max_model_len"
        if not self.kv.can_ever_fit(seq):
            return "kv_capacity"
        if self.reject_over_budget_prompts and seq.prompt_tokens > self.scheduler.max_num_batched_tokens:
            return "prompt_exceeds_max_num_batched_tokens"
        self.outstanding_tokens += seq.prompt_tokens + seq.output_tokens
        if self.async_scheduling and self.pending is not None:
            self.incoming.append(seq)
        else:
            self.scheduler.add(seq)
        return None

    @property
    def busy(self) -> bool:
        return (bool(self.scheduler.running or self.scheduler.waiting or self.incoming)
                or any(a.busy for a in self.agents))

    def _admit_incoming(self, now: float, everyone: bool = False) -> None:
        """Async scheduling: hand over the arrivals the scheduler of this step has seen, i.e. those that
        came before the previous step started (that step's launch is when this one was scheduled), or
        all of them when the engine was idle before ``now`` or ``everyone``."""
        if everyone or self._last_end_s != now:
            cut = float("inf")
        else:
            cut = self._last_start_s
        keep = []
        for s in self.incoming:
            if s.arrival_s <= cut:
                self.scheduler.add(s)
            else:
                keep.append(s)
        self.incoming = keep

    # -- one step or one stretch ----------------------------------------------------------------------
    def begin(self, now: float, horizon_s: float = float("inf")) -> Step | None:
        """Plan the next step (or decode stretch) starting at ``now``; None when there is nothing to run.

        ``horizon_s`` is the next arrival anywhere: a stretch never runs a step that starts at or after it.
        """
        sched = self.scheduler
        if self.incoming:
            self._admit_incoming(now)
        if self.agents:
            for a in self.agents:
                a.before_schedule(now)
        plan = sched.schedule()
        if sched.dropped:
            self._reject_dropped()
        if not plan.scheduled and self.incoming:
            # nothing was runnable when this step would have been scheduled: vLLM had no step in
            # flight and schedules the new requests as soon as the last step ended
            self._admit_incoming(now, everyone=True)
            plan = sched.schedule()
            if sched.dropped:
                self._reject_dropped()
        if not plan.scheduled and self.agents and any(a.unstick() for a in self.agents):
            # nothing could run, and an agent put first a request that can start at once (a received KV that
            # the queue's head, preempted after it landed, was waiting behind): plan again
            plan = sched.schedule()
        if not plan.scheduled:
            return None
        if (self.fast_forward and plan.pure_decode and not plan.preempted and not self.incoming
                and len(plan.scheduled) == len(sched.running) and sched.admission_blocked()):
            self.pending = self._plan_stretch(now, plan, horizon_s)
            return self.pending
        meth = self.method
        keeps_all = self.kv.keeps_all
        num_decode = kept = max_kept = 0
        chunks = []
        for seq, n in plan.scheduled:
            # a received KV's first step recomputes the last prompt token over the received (kept) cache: a decode
            if n == 1 and (seq.num_computed >= seq.prefill_base or seq.kv_received):
                num_decode += 1
                k = seq.num_computed + 1 if keeps_all else meth.kept_tokens(seq.prefill_base, seq.num_computed + 1)
                kept += k
                if k > max_kept:
                    max_kept = k
            else:
                total = seq.num_computed + n
                chunks.append((n, total, total == seq.num_tokens))
        shape = StepShape(num_decode, kept, chunks, max_kept)
        dt = self.cost.step_time_s(shape)
        self.pending = Step(now, now + dt, plan, shape)
        return self.pending

    def _reject_dropped(self) -> None:
        """Preempted sequences the scheduler can never run again leave as rejected requests."""
        for s, reason in self.scheduler.dropped:
            self.outstanding_tokens -= s.prompt_tokens + s.output_tokens
            for f in self._on_reject:
                f(s.req.request_id, s.arrival_s, s.prompt_tokens, s.req.output_tokens, reason, self.id)
        self.scheduler.dropped.clear()

    def _plan_stretch(self, now: float, plan: StepPlan, horizon_s: float) -> Step:
        seqs = [s for s, _ in plan.scheduled]
        kv = self.kv
        B = len(seqs)
        steps_to_finish = min([s.output_tokens - s.generated for s in seqs])
        if kv.keeps_all:
            kept0 = growth = None  # every kept count rises by one per step; built only if memory is short
            S = sum([s.num_computed for s in seqs]) + B
        else:
            meth = self.method
            kept0, growth = [], []
            for s in seqs:
                k0 = meth.kept_tokens(s.prefill_base, s.num_computed + 1)
                lim = meth.kept_limit(s.prefill_base)
                kept0.append(k0)
                growth.append(steps_to_finish if lim is None else max(0, lim - k0))
            S = sum(kept0)
        n_max = steps_to_finish
        if kv.paged and n_max > 1:
            n_max = self._steps_within_memory(seqs, kept0, growth, n_max)
        step_time = self.cost.decode_step_fn(B)
        shapes = None
        if self._record_shapes:
            step_time, shapes = _recording(step_time)
        t = now
        ends = []
        if growth is None or min(growth) >= n_max:
            # the kept-token sum rises by B every step of the stretch, and so does the largest kept count
            M = max([s.num_computed for s in seqs]) + 1 if kept0 is None else max(kept0)
            for _ in range(n_max):
                t += step_time(S, M)
                ends.append(t)
                if t >= horizon_s:
                    break
                S += B
                M += 1
        else:
            # growth[i] = steps after the first during which sequence i's kept count still rises by one.
            # The largest kept count at step j is max(capped: kept0 + growth, growing: kept0 + j), from
            # prefix maxima (capped) and suffix maxima (growing) in growth order
            order = sorted(range(B), key=growth.__getitem__)
            stops = [growth[i] for i in order]
            capped_max = [0] * (B + 1)
            for n, i in enumerate(order):
                capped_max[n + 1] = max(capped_max[n], kept0[i] + growth[i])
            growing_max = [-(1 << 62)] * (B + 1)
            for n in range(B - 1, -1, -1):
                growing_max[n] = max(growing_max[n + 1], kept0[order[n]])
            si = bisect_right(stops, 0)
            D = B - si
            cm, gm = capped_max[si], growing_max[si]
            for j in range(1, n_max + 1):
                t += step_time(S, max(cm, gm + j - 1))
                ends.append(t)
                if t >= horizon_s:
                    break
                S += D
                if si < B and stops[si] <= j:
                    while si < B and stops[si] <= j:
                        si += 1
                    D = B - si
                    cm, gm = capped_max[si], growing_max[si]
        self.num_ff_stretches += 1
        return Step(now, t, plan, None, len(ends), ends, shapes)

    def _steps_within_memory(self, seqs, kept0, growth, n_max: int) -> int:
        """Largest n <= n_max such that steps 1..n-1 find the blocks they need (step 0 already has them).

        ``kept0``/``growth`` None: every sequence keeps all its tokens (kept0 = num_computed + 1)."""
        bs, extra = self.kv.block_size, self.kv.extra_blocks
        free = self.kv.num_free_blocks
        # step 0 holds the blocks of kept0 tokens and a kept count rises by at most one per step, so
        # steps 1..j add at most ceil(j / bs) blocks per sequence: usually plenty are free
        if len(seqs) * -(-(n_max - 1) // bs) <= free:
            return n_max
        if kept0 is None:
            kept0 = [s.num_computed + 1 for s in seqs]
            growth = [n_max] * len(seqs)
        held = [s.blocks for s in seqs]

        def need(j: int) -> int:  # blocks to add for the tokens of steps 1..j
            tot = 0
            for k0, g, h in zip(kept0, growth, held):
                kept = k0 + (j if j < g else g)
                b = -(-kept // bs) + extra - h
                if b > 0:
                    tot += b
            return tot

        if need(n_max - 1) <= free:
            return n_max
        lo, hi = 0, n_max - 1  # need(lo) <= free < need(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if need(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo + 1

    def _account_kv(self, p: Step, t: float, fin: list) -> None:
        """Integrate KV bytes held and full-cache bytes over the step (or stretch) that ends at ``t``.

        One definition, used for ``kv_bytes_saved_fraction`` (time-averaged) and its peak: a running
        sequence holds ``kept_tokens x bytes_per_token + extra_bytes_per_seq`` (what the method stores),
        the full cache would hold ``num_computed x full bytes_per_token`` for the same sequence. During a
        step the running sequences hold what they hold at its end (its blocks are allocated when it is
        scheduled); between steps, what the last step left. Inside a fast-forward stretch every inner step
        is counted at its own end state, in closed form: step j of k (end e_j, e_-1 = start) holds
        kept_end - (g - min(j, g)) tokens of a sequence whose kept count grew g times in the stretch, and
        sum_{j<g} (g - j)(e_j - e_{j-1}) = sum_{i<g} e_i - g start, so it is exact, as stepping."""
        kv = self.kv
        seqs = self.scheduler.running
        start = p.start_s
        keeps_all = kv.keeps_all
        # between the last step and this one (an idle replica holds nothing)
        gap = start - self.kv_last_s
        if gap > 0:
            self.kv_held_byte_s += self._kv_held_now * gap
            self.kv_full_byte_s += self._kv_full_now * gap
        dur = t - start
        if keeps_all:
            full_tok = held_tok = sum(map(_num_computed, seqs))
        else:
            kept = self.method.kept_tokens
            full_tok = held_tok = 0
            for s in seqs:
                full_tok += s.num_computed
                held_tok += kept(s.prefill_base, s.num_computed)
        n = len(seqs)
        held_tok_s = full_tok_s = None
        if p.ff_steps > 1:
            k, ends = p.ff_steps, p.ff_ends
            # the full count rose by one per sequence per inner step: g = k - 1 for every sequence
            w = sum(ends) - ends[-1] - (k - 1) * start
            full_tok_s = full_tok * dur - n * w
            if keeps_all:
                held_tok_s = full_tok_s
            else:
                prefix = [0.0, *accumulate(ends)]
                held_tok_s = held_tok * dur
                kept = self.method.kept_tokens
                for s in seqs:
                    g = kept(s.prefill_base, s.num_computed) - kept(s.prefill_base, s.num_computed - (k - 1))
                    if g > 0:
                        held_tok_s -= prefix[g] - g * start
        else:
            full_tok_s, held_tok_s = full_tok * dur, held_tok * dur
        bpt, extra, full_bpt = kv.bytes_per_token, kv.extra_bytes_per_seq, kv.full_bytes_per_token
        self.kv_held_byte_s += held_tok_s * bpt + n * extra * dur
        self.kv_full_byte_s += full_tok_s * full_bpt
        held, full = held_tok * bpt + n * extra, full_tok * full_bpt
        # kept and computed counts only grow inside a stretch, so its end is its peak, as stepping sees it
        if held > self.peak_kv_held_bytes:
            self.peak_kv_held_bytes = held
        if full > self.peak_kv_full_bytes:
            self.peak_kv_full_bytes = full
        # what stays after this step: the sequences that finished in it leave
        if fin:
            f_full = sum(map(_num_computed, fin))
            f_held = f_full if keeps_all else sum(self.method.kept_tokens(s.prefill_base, s.num_computed) for s in fin)
            held -= f_held * bpt + len(fin) * extra
            full -= f_full * full_bpt
        self._kv_held_now, self._kv_full_now, self.kv_last_s = held, full, t

    def _finish(self, s: Sequence, t: float) -> bool:
        """A sequence generated its last token at ``t``: it leaves (True; the step event lists it as finished),
        or a P/D prefill side hands it on instead (False; kvsim.engine.disagg)."""
        self.kv.free(s)
        s.status = FINISHED
        self.outstanding_tokens -= s.prompt_tokens + s.output_tokens
        return True

    def truncate(self, t_s: float) -> bool:
        """A request arrived here at ``t_s`` during a fast-forward stretch: keep only the steps up to
        the first one that ends at or after ``t_s`` (stepping would plan anew right after it).
        Returns True when the stretch got shorter."""
        p = self.pending
        if p is None or p.ff_steps <= 1 or t_s >= p.end_s:
            return False
        ends = p.ff_ends
        j = bisect_left(ends, t_s)
        if j + 1 >= p.ff_steps:
            return False
        p.ff_steps = j + 1
        del ends[j + 1:]
        p.end_s = ends[j]
        return True

    def commit(self) -> list[Sequence]:
        """Apply the pending step at its end time, tell the observers; returns the sequences that finished."""
        p, self.pending = self.pending, None
        t = p.end_s
        self._last_end_s = t
        self._last_start_s = p.ff_ends[-2] if p.ff_steps > 1 else p.start_s
        kv, sched = self.kv, self.scheduler
        finished = []
        if p.ff_steps:
            k = p.ff_steps
            seqs = [s for s, _ in p.plan.scheduled]
            t1 = p.ff_ends[0]
            p.itl = [t1 - s.last_token_s for s in seqs]
            if p.ff_shapes is not None:
                del p.ff_shapes[k:]  # an arrival cut the stretch short
            # generated blocks are hashed as stepping would have hashed them, step by step
            register = kv.register_computed if kv.hash_generated else None
            paged, grow, blocks_for = kv.paged, kv.grow_to, kv.blocks_for
            keeps_all, bs, extra = kv.keeps_all, kv.block_size, kv.extra_blocks
            for s in seqs:
                s.num_computed += k
                s.generated += k
                s.last_token_s = t
                if paged:
                    # blocks_for, inlined for the full cache
                    target = -(-s.num_computed // bs) + extra if keeps_all else blocks_for(s, s.num_computed)
                    if target > s.blocks and not grow(s, target):
                        raise AssertionError("fast-forward planned more blocks than were free")
                if register is not None and s.hash_keys is not None:
                    register(s)
                if s.generated == s.output_tokens:
                    finished.append(s)
        else:
            itl = []
            after_compute = kv.after_compute
            # after_compute only acts where eviction can shrink a sequence or its blocks are hashed
            shrinks = kv.paged and not kv.keeps_all
            for s, n in p.plan.scheduled:
                s.num_computed += n
                if shrinks or s.hash_keys is not None:
                    after_compute(s)
                if s.num_computed == s.prompt_tokens + s.generated:
                    if s.first_token_s is None:
                        s.first_token_s = t
                    else:
                        itl.append(t - s.last_token_s)
                    s.last_token_s = t
                    s.generated += 1
                    if s.generated == s.output_tokens:
                        finished.append(s)
            p.itl = itl
        p.kv_blocks_used = kv.used_blocks()
        self._account_kv(p, t, finished)
        finished_here, handed_on = finished, None
        if finished:
            done = set(map(id, finished))
            sched.running = [s for s in sched.running if id(s) not in done]
            handed_on = []
            for s in finished:
                if not self._finish(s, t):
                    handed_on.append(s)
            if handed_on:
                finished_here = [s for s in finished if s not in handed_on]
        p.replica = self
        p.finished = finished_here
        p.handed_on = handed_on
        for f in self._on_step:
            f(p)
        return finished


def _recording(step_time):
    """``step_time`` that also writes down each step's (kept-token sum, largest kept count, time)."""
    shapes = []
    add = shapes.append

    def timed(kept: int, max_kept: int = 0) -> float:
        dt = step_time(kept, max_kept)
        add((kept, max_kept, dt))
        return dt

    return timed, shapes


_num_computed = attrgetter("num_computed")

__all__ = ["Replica", "PendingStep", "Step", "RUNNING"]
