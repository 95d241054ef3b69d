"""The SimPy layer, deliberately thin: an arrival process routes requests to replicas, and one
process per replica alternates ``begin`` / wait / ``commit``. All decisions live in plain Python
objects (replica, scheduler, block manager, cost model), which are tested without SimPy.

Lockstep groups (a MoE model served with expert parallelism across data-parallel ranks, as vLLM's
``enable_expert_parallel`` with ``data_parallel_size > 1``): every MoE layer is a collective across the
ranks, so they step together. Replicas sharing a ``lockstep_group`` id run in one process: every step all
ranks ``begin`` at the same time (single steps: their fast-forward is off), the step lasts
``max over ranks of (own step time + moe(T_max) - moe(T_rank))`` (``cost.moe_time_s``; ``T_rank`` is the
rank's new tokens, ``T_max`` the group's largest; an idle rank has T = 0 and runs a dummy batch, i.e.
still waits), and every rank commits at that common end. The router picks a group (or a standalone
replica) as it picks replicas, seeing the group's summed load, then the group's rank with the least
outstanding tokens (ties: lowest id). vLLM's DP coordinator balances on waiting/running counts instead.

Ordering at equal times: arrivals are scheduled URGENT, so a step that ends exactly when a request
arrives sees that request when it plans the next step (as vLLM's engine loop would).
"""

from __future__ import annotations

import math
from heapq import heappush

import simpy
from simpy.events import NORMAL, URGENT

from kvsim.engine.output_length import LengthSampler
from kvsim.engine.replica import Replica
from kvsim.engine.sequence import Sequence
from kvsim.metrics.collector import Recorder
from kvsim.workload.request import InvalidRecord


class _Environment(simpy.Environment):
    """SimPy schedules at ``now + delay``, and no delay may land exactly on a given time ``t`` (when ``now``
    has finer bits than ``t``, ``now + d`` can skip ``t``'s value for every d). Events here are placed at
    their absolute time instead (``_At``), so a step ends exactly at the time the replica computed, whether
    it was stepped or fast-forwarded, and clocks never drift between runs."""

    def wait_instead(self, proc: simpy.Process, t: float, priority: int) -> None:
        """``proc`` waits for an event at ``t`` instead of the one it waits for now. What interrupting it
        and having it yield a new event would do, without throwing an exception into it (a stretch is
        cut short on almost every arrival); the old event stays queued, with nobody waiting on it."""
        proc._target.callbacks.remove(proc._resume)
        ev = _At(self, t, priority)
        ev.callbacks.append(proc._resume)
        proc._target = ev


class _At(simpy.Event):
    """An event at the absolute time ``t`` (now if ``t`` is past), made and queued in one go."""

    def __init__(self, env: _Environment, t: float, priority: int):
        self.env = env
        self.callbacks = []
        self._ok = True
        self._value = None
        heappush(env._queue, (t if t > env._now else env._now, priority, next(env._eid), self))


class LockstepGroup:
    """Data-parallel ranks that step together; the router sees it as one unit."""

    def __init__(self, gid, ranks: list[Replica]):
        self.ranks = ranks
        self.gid = gid
        self.id = min(r.id for r in ranks)

    @property
    def outstanding_tokens(self) -> int:
        return sum(r.outstanding_tokens for r in self.ranks)

    def pick(self) -> Replica:
        return min(self.ranks, key=lambda r: (r.outstanding_tokens, r.id))


class Simulation:
    def __init__(self, replicas: list[Replica], router, recorder: Recorder, lengths: LengthSampler,
                 progress=None, check_invariants: bool = False):
        self.env = _Environment()
        self.replicas = replicas
        self.router = router
        self.rec = recorder
        self.lengths = lengths
        self.progress = progress
        self.check_invariants = check_invariants
        self.next_arrival_s = math.inf
        self._wake: dict[int, simpy.Event | None] = {r.id: None for r in replicas}
        self.num_events = 0
        self.live: dict[int, Sequence] = {}
        self._single = len(replicas) == 1
        self._procs: dict[int, simpy.Process] = {}
        # lockstep groups (replica.lockstep_group not None); the router's units: groups and standalone replicas
        groups: dict = {}
        self._units: list = []
        for r in replicas:
            gid = getattr(r, "lockstep_group", None)
            if gid is None:
                self._units.append(r)
            elif gid not in groups:
                groups[gid] = LockstepGroup(gid, [r])
                self._units.append(groups[gid])
            else:
                groups[gid].ranks.append(r)
        self.groups: list[LockstepGroup] = list(groups.values())
        #: the wake-up slot of each replica's process (a group's ranks share their group's)
        self._wake_key: dict[int, object] = {r.id: r.id for r in replicas}
        for g in self.groups:
            for r in g.ranks:
                if r.fast_forward:
                    raise ValueError(f"replica {r.id} of lockstep group {g.gid!r} must have fast_forward=False")
                self._wake_key[r.id] = ("group", g.gid)
            self._wake[("group", g.gid)] = None
        if not self.groups:
            self._units = replicas

    def _at(self, t: float, priority: int = URGENT) -> simpy.Event:
        return _At(self.env, t, priority)

    def _arrivals(self, source):
        it = iter(source)
        nxt = next(it, None)
        index = 0
        last_t = 0.0
        rec = self.rec
        while nxt is not None:
            item, nxt = nxt, next(it, None)
            if isinstance(item, InvalidRecord):
                rec.arrival(item.arrival_time_s)
                rec.reject(f"line-{item.line}", item.arrival_time_s, None, None, f"invalid_{item.code}")
                continue
            t = max(item.arrival_time_s, last_t)
            last_t = t
            if t > self.env.now:
                self.next_arrival_s = t
                self.num_events += 1
                yield self._at(t)
            self.next_arrival_s = self._peek_time(nxt, t)
            rec.arrival(item.arrival_time_s)
            seq = Sequence(item, index, self.lengths.output_tokens(item.output_tokens))
            index += 1
            r = self.router.pick(self._units)
            if isinstance(r, LockstepGroup):
                r = r.pick()
            reason = r.add(seq)
            if reason:
                rec.reject(item.request_id, item.arrival_time_s, item.prompt_tokens, item.output_tokens, reason, r.id)
            else:
                if self.check_invariants:
                    self.live[id(seq)] = seq
                ev = self._wake[self._wake_key[r.id]]
                if ev is not None and not ev.triggered:
                    ev.succeed()
                elif not self._single and r.truncate(t):
                    # the stretch was cut at the first step that ends at or after this arrival
                    self.num_events += 1
                    self.env.wait_instead(self._procs[r.id], r.pending.end_s, NORMAL)
            if self.progress is not None and index % 1024 == 0:
                self.progress.update(1024)
        self.next_arrival_s = math.inf
        if self.progress is not None:
            self.progress.update(index % 1024)

    def _peek_time(self, nxt, floor: float) -> float:
        # the next item that will be an arrival (invalid records are rejected without waiting)
        if nxt is None:
            return math.inf
        if isinstance(nxt, InvalidRecord):
            return floor
        return max(nxt.arrival_time_s, floor)

    def _replica(self, r: Replica):
        env = self.env
        while True:
            # one replica: stretches stop at the next arrival; several: at the next arrival routed
            # to this replica, which interrupts the stretch (see _arrivals)
            p = r.begin(env.now, self.next_arrival_s if self._single else math.inf)
            if p is None:
                ev = self._wake[r.id] = env.event()
                yield ev
                self._wake[r.id] = None
                continue
            self.num_events += 1
            # a request routed here mid-stretch may cut it short and move this wait (_arrivals)
            yield self._at(p.end_s, NORMAL)
            finished = r.commit()
            if self.check_invariants:
                self._check(r, finished)

    def _check(self, r: Replica, finished) -> None:
        for s in finished:
            self.live.pop(id(s), None)
        live = [s for s in self.live.values() if s.replica == r.id]
        r.kv.pool.check(live)
        assert r.kv.pool.num_used <= r.kv.pool.num_blocks

    def _group(self, g: LockstepGroup):
        env = self.env
        key = ("group", g.gid)
        ranks = g.ranks
        while True:
            now = env.now
            pend = [(r, r.begin(now)) for r in ranks]
            active = [(r, p) for r, p in pend if p is not None]
            if not active:
                ev = self._wake[key] = env.event()
                yield ev
                self._wake[key] = None
                continue
            self.num_events += 1
            tokens = {r.id: sum(n for _, n in p.plan.scheduled) for r, p in active}
            t_max = max(tokens.values())
            moe = ranks[0].cost.moe_time_s
            moe_max = moe(t_max)
            # an idle rank (T = 0, own step 0) runs a dummy batch through the MoE layers: moe(T_max)
            end = now + moe_max if len(active) < len(ranks) else now
            for r, p in active:
                pad = moe_max - moe(tokens[r.id])
                e = p.end_s + pad if pad else p.end_s  # the rank's own end, padded to T_max's MoE time
                if e > end:
                    end = e
            for _, p in active:
                p.end_s = end
            yield self._at(end, NORMAL)
            for r, _ in active:
                finished = r.commit()
                if self.check_invariants:
                    self._check(r, finished)

    def run(self, source) -> float:
        env = self.env
        arrivals = env.process(self._arrivals(source))
        grouped = {r.id for g in self.groups for r in g.ranks}
        for r in self.replicas:
            if r.id not in grouped:
                self._procs[r.id] = env.process(self._replica(r))
        for g in self.groups:
            proc = env.process(self._group(g))
            for r in g.ranks:
                self._procs[r.id] = proc
        env.run(until=arrivals)
        # drain: every replica runs until idle
        while any(r.busy or r.pending for r in self.replicas):
            try:
                env.step()
            except simpy.core.EmptySchedule:
                stuck = {r.id: (len(r.scheduler.running), len(r.scheduler.waiting)) for r in self.replicas if r.busy}
                raise RuntimeError(f"simulation stalled with work left (replica: (running, waiting)) {stuck}") from None
        return env.now
