"""Disaggregated prefill/decode: prefill instances compute prompts, decode instances generate, and the KV cache
moves from one to the other over a link (DistServe, Splitwise, Mooncake; vLLM's disaggregated prefill with a
KV connector).

How a request goes through the cluster (vLLM's P/D with its proxy and ``NixlConnector``, v0.10+):

1. At arrival the prefill router picks a prefill instance and the decode router a decode instance (vLLM's
   proxy and Splitwise's cluster scheduler pick both up front). The request is refused at once, with its
   reason, when either side could never hold it (``kv_capacity`` on the prefill side, ``decode_kv_capacity``
   on the decode side, ``exceeds_max_model_len``).
2. The prefill instance runs it as a one-token request (the proxy sends ``max_tokens=1``): it prefills the
   prompt, samples a token nobody sees, and keeps the prompt's blocks until the transfer has read them
   (``NixlConnector``'s delayed free).
3. The decode instance takes blocks for the cache it will receive at its next step boundary, first come first
   served, waiting while they do not fit (vLLM allocates them in ``schedule()`` before the pull and parks the
   request in ``WAITING_FOR_REMOTE_KVS``). Then the transfer runs (``kvsim.engine.kvlink``: the prefill
   instance's send port and the decode instance's receive port, ``min(tp_p, tp_d)`` lanes of the link).
4. When the KV has landed the request joins the decode instance's queue; its first step recomputes the last
   prompt token over the received cache and samples the first output token (vLLM's scheduler sets
   ``num_computed_tokens = num_tokens - 1`` for a fully received prompt). The prefill instance frees its blocks.

So **TTFT, as the client of vLLM's proxy sees it, includes the transfer**: prefill queue + prefill + waiting for
decode blocks + transfer + decode queue + the decode instance's first step. The prefill instance's own token is
discarded. (DistServe reports TTFT at the end of prefill instead; this is vLLM's convention because the
token the client receives first is the decode instance's.)

**What moves:** the KV the method keeps once the prompt has been prefilled, in its stored format, for every
GPU of the decode instance: ``(kept_tokens(P, P) x bytes_per_token + extra_bytes_per_seq) x tp_d``, with the
method's own ``kept_tokens`` / ``bytes_per_token`` / ``extra_bytes_per_seq`` (an int4 cache moves a quarter of
the bytes, an evicted cache only the kept tokens, a KIVI cache its full-precision residual too).

**Transfer modes** (``kv_transfer_mode``): ``whole``: the decode instance pulls the whole cache once the prefill
is done (vLLM's NIXL pull). ``layerwise``: the decode instance is told when the last prefill step starts, and
each layer's KV leaves as soon as that step has computed it and the decode blocks exist
(``kvsim.engine.kvlink.layerwise_last_byte``), overlapping the transfer with the step; earlier chunks of a
chunked prompt are sent with the last one (their compressed form is only known then for evicting methods).

Simplifications (docs/disaggregation.md): decode instances do not match a received prompt against their own
prefix cache; a decode-side preemption recomputes locally (as vLLM does); transfers on a port are served one at
a time in the order they were asked for.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from kvsim.engine.cluster import make_router
from kvsim.engine.kvlink import LinkLog, Port, book, layerwise_last_byte
from kvsim.engine.replica import PendingStep, Replica
from kvsim.engine.sequence import FINISHED, Sequence
from kvsim.engine.clock import URGENT
from kvsim.engine.sim import Simulation
from kvsim.specs.links import LinkSpec
from kvsim.workload.request import InvalidRecord


@dataclass(slots=True)
class Transfer:
    """One request's KV moving from its prefill instance to its decode instance (all times in seconds)."""

    prefill_id: int
    decode_id: int
    bytes: float
    prefill_seq: Sequence
    decode_seq: Sequence
    #: the decode instance was told (whole: prefill done; layerwise: last prefill step started)
    handoff_s: float = math.nan
    #: the last prefill step (start, length) and when the prompt was complete on the prefill instance
    last_step_start_s: float = math.nan
    last_step_s: float = 0.0
    prefill_done_s: float = math.nan
    #: decode blocks taken, transfer started, last byte sent, data usable on the decode instance
    alloc_s: float = math.nan
    start_s: float = math.nan
    sent_s: float = math.nan
    ready_s: float = math.nan
    #: bytes received (equal to ``bytes`` once it landed; the invariant tests check it)
    received: float = 0.0


# -- the two sides ---------------------------------------------------------------------------------------------
class PrefillAgent:
    """A prefill instance's sending side: sequences that hold their blocks until their transfer has read them."""

    def __init__(self, replica: "PrefillReplica"):
        self.replica = replica
        #: id(seq) -> seq: prompts done, blocks held until released
        self.sending: dict[int, Sequence] = {}
        self._releases: list = []
        self._order = 0
        self.wakeups: list = []

    def release_at(self, t: float, seq: Sequence) -> None:
        self._order += 1
        heapq.heappush(self._releases, (t, self._order, seq))
        self.wakeups.append((self.replica.id, t))

    def before_schedule(self, now: float) -> None:
        rel = self._releases
        while rel and rel[0][0] <= now:
            seq = heapq.heappop(rel)[2]
            if self.sending.pop(id(seq), None) is not None:
                self.replica.kv.free(seq)

    @property
    def busy(self) -> bool:
        return bool(self.sending) or bool(self._releases)

    def unstick(self) -> bool:
        return False

    def holders(self) -> list:
        return list(self.sending.values())


class DecodeAgent:
    """A decode instance's receiving side: requests waiting for blocks, transfers in flight."""

    def __init__(self, replica: Replica, cluster: "DisaggCluster"):
        self.replica = replica
        self.cluster = cluster
        self.inbox: deque[Sequence] = deque()
        self._in_flight: list = []
        self._order = 0
        self.wakeups: list = []
        self.recv_port: Port | None = None

    def before_schedule(self, now: float) -> None:
        sched = self.replica.scheduler
        fl = self._in_flight
        if fl and fl[0][0] <= now:
            landed = []
            while fl and fl[0][0] <= now:
                landed.append(heapq.heappop(fl)[2])
            # at the head of the queue, in the order they landed: vLLM keeps requests waiting for remote KV at the
            # front (it prepends them every step); they hold their blocks and need none for their first step
            for seq in reversed(landed):
                seq.kv_pending = False
                sched.add(seq)
                sched.waiting.rotate(1)
        inbox, kv = self.inbox, self.replica.kv
        while inbox:
            seq = inbox[0]
            # the blocks of the received cache, counted as vLLM counts them: up to the prompt's last token
            if not kv.allocate_slots(seq, 1):
                break
            inbox.popleft()
            self._start(seq, now)

    def unstick(self) -> bool:
        """Nothing could be scheduled and nothing runs, with the head of the queue holding no blocks (a request
        preempted after others' KV had landed): the received requests behind it, which hold their blocks and
        can run at once, go first, so the head is never left waiting for blocks only they could free. True when
        the queue changed."""
        sched = self.replica.scheduler
        if sched.running or not sched.waiting or sched.waiting[0].blocks:
            return False
        held = [s for s in sched.waiting if s.kv_received and s.blocks]
        if not held:
            return False
        rest = [s for s in sched.waiting if not (s.kv_received and s.blocks)]
        sched.waiting.clear()
        sched.waiting.extend(held + rest)
        return True

    def _start(self, seq: Sequence, now: float) -> None:
        c = self.cluster
        x = seq.xfer
        x.alloc_s = now
        src = c.prefill[x.prefill_id - c.prefill[0].id]
        ports = [src.send_port, self.recv_port]
        lanes = min(src.tp, c.decode_tp)
        link = c.link
        not_before = None
        if c.mode == "layerwise" and not (x.prefill_done_s <= now):
            rate = link.bandwidth_bytes_per_s * lanes
            not_before = layerwise_last_byte(x.last_step_start_s, x.last_step_s, c.num_layers, x.bytes, rate)
        b = book(ports, now, x.bytes, link, lanes, not_before)
        x.start_s, x.sent_s, x.ready_s = b.start_s, b.sent_s, b.ready_s
        x.received += x.bytes
        seq.kv_pending = True
        self._order += 1
        heapq.heappush(self._in_flight, (b.ready_s, self._order, seq))
        self.wakeups.append((self.replica.id, b.ready_s))
        # the prefill instance frees the prompt's blocks once the decode side has them (NIXL's notification)
        src.agent.release_at(b.ready_s, x.prefill_seq)
        self.wakeups.append((src.id, b.ready_s))

    @property
    def busy(self) -> bool:
        return bool(self.inbox) or bool(self._in_flight)

    def holders(self) -> list:
        return [s for _, _, s in self._in_flight]


class PrefillReplica(Replica):
    """A replica that prefills and hands the request on: its sequences are one-token requests whose blocks
    stay until the transfer has read them."""

    cluster: "DisaggCluster"
    agent: PrefillAgent
    send_port: Port
    tp: int

    def begin(self, now: float, horizon_s: float = math.inf) -> PendingStep | None:
        p = super().begin(now, horizon_s)
        if p is not None and self.cluster.mode == "layerwise" and p.plan is not None:
            for seq, n in p.plan.scheduled:
                if seq.num_computed + n == seq.prompt_tokens and seq.xfer is not None and math.isnan(seq.xfer.handoff_s):
                    x = seq.xfer
                    x.last_step_start_s, x.last_step_s = now, p.end_s - now
                    self.cluster.handoff(x, now)
        return p

    def _reject_dropped(self) -> None:
        # a prompt the prefill instance can never run again (kvsim.engine.scheduler) takes its decode side along
        for s, _ in self.scheduler.dropped:
            x = s.xfer
            d = self.cluster.decode[x.decode_id - self.cluster.decode[0].id]
            d.outstanding_tokens -= x.decode_seq.prompt_tokens + x.decode_seq.output_tokens
            if self.cluster.on_drop is not None:
                self.cluster.on_drop(x)
        super()._reject_dropped()

    def _finish(self, s: Sequence, t: float) -> bool:
        s.status = FINISHED
        self.outstanding_tokens -= s.prompt_tokens + s.output_tokens
        x = s.xfer
        x.prefill_done_s = t
        self.agent.sending[id(s)] = s
        dec = x.decode_seq
        # what the prefill side saw of the request goes on its decode-side row
        dec.prefix_hit_tokens = s.prefix_hit_tokens
        dec.cpu_hit_tokens = s.cpu_hit_tokens
        dec.num_preemptions += s.num_preemptions
        dec.kv_offload_bytes += s.kv_offload_bytes
        dec.kv_onload_bytes += s.kv_onload_bytes
        if math.isnan(x.handoff_s):
            x.last_step_start_s, x.last_step_s = t, 0.0
            self.cluster.handoff(x, t)
        return False  # handed on: the decode instance finishes the request


# -- the cluster ------------------------------------------------------------------------------------------------
class DisaggCluster:
    def __init__(self, prefill: list[PrefillReplica], decode: list[Replica], link: LinkSpec, mode: str,
                 num_layers: int, decode_tp: int, transfer_bytes, log: LinkLog | None = None,
                 prefill_router: str = "least-outstanding-tokens", decode_router: str = "least-outstanding-tokens"):
        self.prefill, self.decode = prefill, decode
        self.link, self.mode, self.num_layers, self.decode_tp = link, mode, num_layers, decode_tp
        self.transfer_bytes = transfer_bytes
        self.log = log
        self.prefill_router, self.decode_router = make_router(prefill_router), make_router(decode_router)
        self.transfers: list[Transfer] = []
        #: called with a Transfer whose request the prefill side dropped (the SimPy layer forgets its decode side)
        self.on_drop = None
        for r in prefill:
            r.cluster = self
            r.agent = PrefillAgent(r)
            r.agents = (*r.agents, r.agent)
            r.send_port = Port("pd_send", link, r.tp, log=log)
        self.decode_agents = {}
        for r in decode:
            a = DecodeAgent(r, self)
            a.recv_port = Port("pd_recv", link, decode_tp, log=log)
            r.agents = (*r.agents, a)
            self.decode_agents[r.id] = a

    @property
    def replicas(self) -> list[Replica]:
        return [*self.prefill, *self.decode]

    def handoff(self, x: Transfer, t: float) -> None:
        x.handoff_s = t
        a = self.decode_agents[x.decode_id]
        a.inbox.append(x.decode_seq)
        self.prefill[x.prefill_id - self.prefill[0].id].agent.wakeups.append((x.decode_id, t))

    def holders(self, r: Replica) -> list:
        out = []
        for a in r.agents:
            h = getattr(a, "holders", None)
            if h is not None:
                out.extend(h())
        return out


class DisaggSimulation(Simulation):
    """The SimPy layer for a P/D cluster: arrivals go to a prefill and a decode instance; each instance runs the
    usual replica process (kvsim.engine.sim), transfers wake the instance they land on."""

    def __init__(self, cluster: DisaggCluster, observers, lengths, check_invariants: bool = False):
        super().__init__(cluster.replicas, None, observers, lengths, check_invariants)
        self.cluster = cluster
        self._single = False
        cluster.on_drop = lambda x: self.live.pop(id(x.decode_seq), None)

    def _arrivals(self, source):
        c = self.cluster
        it = iter(source)
        nxt = next(it, None)
        index = 0
        last_t = 0.0
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
                yield self.env.at(t, URGENT)
            for f in on_arrival:
                f(item.arrival_time_s)
            out = self.lengths.output_tokens(item.output_tokens, item.prompt_tokens, item.max_tokens)
            dseq = Sequence(item, index, out)
            pseq = Sequence(item, index, 1)
            index += 1
            p = c.prefill_router.pick(c.prefill, t)
            d = c.decode_router.pick(c.decode, t)
            reason, where = self._refusal(p, d, dseq), d.id
            if reason is None:
                reason, where = p.add(pseq), p.id
            if reason:
                for f in on_reject:
                    f(item.request_id, item.arrival_time_s, item.prompt_tokens, item.output_tokens, reason, where)
            else:
                self._accept(p, d, pseq, dseq, t)
        self.next_arrival_s = math.inf

    def _refusal(self, p: Replica, d: Replica, dseq: Sequence) -> str | None:
        if dseq.prompt_tokens + dseq.output_tokens > d.max_model_len:
            return "exceeds_max_model_len"
        if not d.kv.can_ever_fit(dseq):
            return "decode_kv_capacity"
        return None

    def _accept(self, p: Replica, d: Replica, pseq: Sequence, dseq: Sequence, t: float) -> None:
        c = self.cluster
        P = dseq.prompt_tokens
        dseq.replica = d.id
        dseq.kv_received = True
        dseq.num_computed = max(0, P - 1)
        x = Transfer(p.id, d.id, c.transfer_bytes(P), pseq, dseq)
        pseq.xfer = dseq.xfer = x
        c.transfers.append(x)
        d.outstanding_tokens += dseq.prompt_tokens + dseq.output_tokens
        if self.check_invariants:
            self.live[id(pseq)] = pseq
            self.live[id(dseq)] = dseq
        self._nudge(p, t)

    def _check(self, r: Replica, finished) -> None:
        for s in finished:
            self.live.pop(id(s), None)
        live = [s for s in self.live.values() if s.replica == r.id]
        held = {id(s) for s in live}
        live += [s for s in self.cluster.holders(r) if id(s) not in held]
        r.kv.check(live)


def transfer_bytes_fn(method, model, tp_d: int):
    """Bytes that move for a prompt of P tokens: what the method keeps once the prompt is prefilled, in its
    stored format, on every GPU of the decode instance."""
    bpt = method.bytes_per_token(model, tp_d)
    extra = method.extra_bytes_per_seq(model, tp_d)

    def f(prompt_tokens: int) -> float:
        return (method.kept_tokens(prompt_tokens, prompt_tokens) * bpt + extra) * tp_d

    return f


__all__ = ["DisaggCluster", "DisaggSimulation", "PrefillReplica", "Transfer", "transfer_bytes_fn"]
