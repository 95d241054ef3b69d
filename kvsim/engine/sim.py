"""The SimPy layer, deliberately thin: an arrival process routes requests to replicas, and one
process per replica alternates ``begin`` / wait / ``commit``. All decisions live in plain Python
objects (replica, scheduler, block manager, cost model), which are tested without SimPy.

Lockstep groups (a MoE model served with expert parallelism across data-parallel ranks, as vLLM's
``enable_expert_parallel`` with ``data_parallel_size > 1``): every MoE layer is a collective across the
ranks, so they step together. Replicas sharing a ``lockstep_group`` id run in one process: every step all
ranks ``begin`` at the same time (single steps: their fast-forward is off), the step lasts
``max over ranks of (own step time - moe(T_rank) + moe_group(N, S))`` and every rank commits at that
common end. ``moe(T) = cost.moe_time_s(T)`` is the MoE part of a rank's own step (costed as if every rank
carried its T new tokens); ``moe_group(N, S) = cost.moe_group_time_s(N, S)`` is what vLLM 0.19 runs: with
its default ``allgather_reducescatter`` backend each rank's experts process the tokens all-gathered from
every rank, N in all, and the exchange is sized by the largest share S. The ranks' counts are as vLLM
sizes them (``kvsim.engine.cluster.dp_token_counts``): when every rank's count fits a CUDA graph (at most
the largest capture size, 256 for max_num_seqs 128) all are padded to the largest one's graph size;
otherwise (a prefill chunk above it) the step runs eager and each rank keeps its own count. An idle rank
runs vLLM's dummy batch (1 token, padded like the others): a whole forward no longer than a busy rank's,
so only the group's MoE time is charged for it (a bound only). The router picks a group (or a standalone
replica) as it picks replicas, seeing the group's summed load; the group then picks its rank as vLLM's
DP front end does (``kvsim.engine.cluster.VllmDPBalancer``: lowest 4 x waiting + running).

Ordering at equal times: arrivals are scheduled URGENT, so a step that ends exactly when a request
arrives sees that request when it plans the next step (as vLLM's engine loop would).
"""

from __future__ import annotations

import math

from kvsim.engine.clock import NORMAL, URGENT, Clock, EmptySchedule, Event
from kvsim.engine.cluster import VllmDPBalancer, cudagraph_capture_sizes, dp_token_counts
from kvsim.engine.events import hooks
from kvsim.engine.output_length import LengthSampler
from kvsim.engine.replica import Replica
from kvsim.engine.sequence import Sequence
from kvsim.workload.request import InvalidRecord


class LockstepGroup:
    """Data-parallel ranks that step together; the router sees it as one unit."""

    def __init__(self, gid, ranks: list[Replica]):
        self.ranks = ranks
        self.gid = gid
        self.id = min(r.id for r in ranks)
        self.balancer = VllmDPBalancer()
        self._capture_sizes = None

    @property
    def capture_sizes(self) -> list[int]:
        """vLLM's default CUDA-graph capture sizes for the ranks' scheduler limits (CUDA graphs on)."""
        if self._capture_sizes is None:
            s = self.ranks[0].scheduler
            self._capture_sizes = cudagraph_capture_sizes(s.max_num_seqs, s.max_num_batched_tokens)
        return self._capture_sizes

    def moe_tokens(self, tokens: list[int]) -> tuple[int, int]:
        """(N, S): the tokens the ranks' forwards carry in all and the largest, given each rank's new
        tokens (0: idle, running vLLM's 1-token dummy batch)."""
        counts = dp_token_counts([t if t > 0 else 1 for t in tokens], self.capture_sizes)
        return sum(counts), max(counts)

    @property
    def outstanding_tokens(self) -> int:
        return sum(r.outstanding_tokens for r in self.ranks)

    def pick(self, now: float) -> Replica:
        return self.balancer.pick(self.ranks, now)


class Simulation:
    """Drives replicas through simulated time. ``observers`` (kvsim.engine.events.Observer) hear every
    arrival and rejection here, and every step from the replicas (which the run builder gave the same
    observers)."""

    def __init__(self, replicas: list[Replica], router, observers, lengths: LengthSampler,
                 check_invariants: bool = False):
        self.env = Clock()
        self.replicas = replicas
        self.router = router
        self.observers = list(observers)
        self._on_arrival = hooks(self.observers, "on_arrival")
        self._on_reject = hooks(self.observers, "on_reject")
        self.lengths = lengths
        self.check_invariants = check_invariants
        self.next_arrival_s = math.inf
        self._wake: dict = {r.id: None for r in replicas}
        self.num_events = 0
        self.live: dict[int, Sequence] = {}
        self._single = len(replicas) == 1
        self._procs: dict = {}
        #: replicas by id: a transfer started by one replica's agent may land on another (kvsim.engine.disagg)
        self._by_id = {r.id: r for r in replicas}
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

    def _arrivals(self, source):
        it = iter(source)
        nxt = next(it, None)
        index = 0
        last_t = 0.0
        at = self.env.at
        on_arrival, on_reject = self._on_arrival, self._on_reject
        while nxt is not None:
            item, nxt = nxt, next(it, None)
            if isinstance(item, InvalidRecord):
                for f in on_arrival:
                    f(item.arrival_time_s)
                for f in on_reject:
                    f(f"line-{item.line}", item.arrival_time_s, None, None, f"invalid_{item.code}")
                continue
            t = max(item.arrival_time_s, last_t)
            last_t = t
            if t > self.env.now:
                self.next_arrival_s = t
                self.num_events += 1
                yield at(t, URGENT)
            self.next_arrival_s = self._peek_time(nxt, t)
            for f in on_arrival:
                f(item.arrival_time_s)
            seq = Sequence(item, index, self.lengths.output_tokens(item.output_tokens, item.prompt_tokens,
                                                                   item.max_tokens))
            index += 1
            r = self.router.pick(self._units, t)
            if isinstance(r, LockstepGroup):
                r = r.pick(t)
            reason = r.add(seq)
            if reason:
                for f in on_reject:
                    f(item.request_id, item.arrival_time_s, item.prompt_tokens, item.output_tokens, reason, r.id)
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
        self.next_arrival_s = math.inf

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
            if r.agents:
                self._wakeups(r)
            if p is None:
                ev = self._wake[r.id] = Event(env)
                yield ev
                self._wake[r.id] = None
                continue
            self.num_events += 1
            # a request routed here mid-stretch may cut it short and move this wait (_arrivals)
            yield env.at(p.end_s, NORMAL)
            finished = r.commit()
            if r.agents:
                self._wakeups(r)
            if self.check_invariants:
                self._check(r, finished)

    # -- KV moved beyond the GPU (kvsim.engine.offload, kvsim.engine.disagg) ---------------------------------
    def _wakeups(self, r: Replica) -> None:
        """Transfers r's agents started land at known times: the replica they land on plans anew at its first
        step boundary at or after each (as an arrival makes it), whether or not its decode steps are
        fast-forwarded."""
        for a in r.agents:
            if a.wakeups:
                todo, a.wakeups = a.wakeups, []
                for rid, t in todo:
                    self._poke(self._by_id[rid], t, own=rid == r.id)

    def _poke(self, r: Replica, t: float, own: bool = False) -> None:
        if own and r.pending is not None:
            r.truncate(t)  # its process is the one running: the step it just planned is cut before it waits
        if t <= self.env.now and not own:
            self._nudge(r, t)
            return
        # later, or r's own process about to wait: an event at t (now at the earliest) does it
        ev = self.env.at(t)
        ev.callbacks.append(lambda _e: self._nudge(r, t))

    def _nudge(self, r: Replica, t: float) -> None:
        """What an arrival routed to r at ``t`` does to its process: wake it, or cut its stretch at ``t``."""
        ev = self._wake[self._wake_key[r.id]]
        if ev is not None and not ev.triggered:
            ev.succeed()
        elif r.truncate(t):
            self.num_events += 1
            self.env.wait_instead(self._procs[r.id], r.pending.end_s, NORMAL)

    def _check(self, r: Replica, finished) -> None:
        for s in finished:
            self.live.pop(id(s), None)
        r.kv.check([s for s in self.live.values() if s.replica == r.id])

    def _group(self, g: LockstepGroup):
        env = self.env
        key = ("group", g.gid)
        ranks = g.ranks
        while True:
            now = env.now
            pend = [(r, r.begin(now)) for r in ranks]
            active = [(r, p) for r, p in pend if p is not None]
            if not active:
                ev = self._wake[key] = Event(env)
                yield ev
                self._wake[key] = None
                continue
            self.num_events += 1
            tokens = [sum(n for _, n in p.plan.scheduled) if p is not None else 0 for _, p in pend]
            moe_group = ranks[0].cost.moe_group_time_s(*g.moe_tokens(tokens))
            # an idle rank runs vLLM's dummy batch, a whole forward never longer than a busy rank's, so
            # the group's MoE time, its MoE part, stands for it (a bound only)
            end = now + moe_group if len(active) < len(ranks) else now
            for (r, p), t in zip(pend, tokens):
                if p is None:
                    continue
                # the rank's own end, its own MoE part replaced by the group's
                d = moe_group - r.cost.moe_time_s(t)
                e = p.end_s + d if d else p.end_s
                if e > end:
                    end = e
            for _, p in active:
                p.end_s = end
            yield env.at(end, NORMAL)
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
            except EmptySchedule:
                stuck = {r.id: (len(r.scheduler.running), len(r.scheduler.waiting)) for r in self.replicas if r.busy}
                raise RuntimeError(f"simulation stalled with work left (replica: (running, waiting)) {stuck}") from None
        for o in self.observers:
            on_end = getattr(o, "on_end", None)
            if on_end is not None:
                on_end(env.now)
        return env.now
