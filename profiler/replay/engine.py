"""The real-time serving loop of ``kvprof replay``: kvsim's own scheduler, a real forward pass per step.

Scheduling is not re-implemented: kvsim's run builder (``kvsim.build.make_replica``) makes the engine's
``Replica`` with kvsim's ``Scheduler`` (or ``PrefillFirstScheduler``), ``KVCacheManager`` and
``BlockManager``, with fast-forward off and a cost model that prices nothing (the step's real duration is
measured); its step events (``kvsim.engine.events``) feed the metrics recorder and the step records. So
the token budget, ``max_num_seqs``,
chunked prefill, the per-method block accounting, the newest-first preemption by recompute and the
commit rules (when a sequence samples, finishes, gives back blocks) are kvsim's code, not a copy.
Between ``Replica.begin`` (schedule) and ``Replica.commit`` the engine does the real work:

1. mirror the block counts with physical pages (``kvstore``): preempted sequences release theirs,
   scheduled ones get exactly what kvsim's block manager granted;
2. build the flattened batch (prefill chunks first, then decodes), run the model's full forward pass
   with the method's cache, sample greedily (the token is fed back; EOS does not exist: every request
   generates exactly its trace's output length), wait for the device;
3. commit at the measured wall-clock time: first-token and finish times are real.

Time is wall clock from the start of the run; requests join the waiting queue when their (shifted)
trace arrival time has passed, checked between steps, as vLLM's engine core does with its input queue
(the realised arrival is that enqueue time). When nothing is running or waiting the engine sleeps until
the next arrival. Steps of one busy period tile it: a step starts where the previous one ended, so
every host-side cost (scheduling, batch building, commit) is inside some step's duration.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from kvsim.build import make_replica
from kvsim.engine.events import Observer
from kvsim.engine.sequence import Sequence
from kvsim.metrics.collector import Recorder
from kvsim.metrics.progress import DoneProgress
from kvsim.validate.case import MAX_KV_COLUMN, STEP_COLUMNS as CASE_STEP_COLUMNS
from kvsim.workload.request import Request
from profiler.replay.kvstore import Item, SeqKV

#: steps.csv: the measured-case columns kvsim validate reads, then what this engine adds
STEP_COLUMNS = CASE_STEP_COLUMNS + ["forward_ms", "num_running", "num_waiting", "kv_blocks_used", MAX_KV_COLUMN]


class Measured:
    """The cost model handed to kvsim's Replica: prices nothing. The step's real duration is measured and
    written into the pending step before commit."""

    name = "kvprof-replay (measured)"

    def step_time_s(self, shape) -> float:
        return 0.0

    def decode_step_time_s(self, num_seqs, kept, max_kept=0):  # only called by fast-forward, which is off
        raise AssertionError("kvprof replay runs with fast-forward off")


class StepRecords(Observer):
    """The engine's step log: a :class:`StepRecord` per committed step, from kvsim's step event and the
    forward time the engine measured."""

    def __init__(self, engine: "ReplayEngine"):
        self.engine = engine
        self.records: list[StepRecord] = []

    def on_step(self, ev) -> None:
        sh, r = ev.shape, ev.replica
        self.records.append(StepRecord(
            len(self.records), ev.start_s, ev.end_s, self.engine.last_forward_ms, sh.num_decode_seqs,
            sh.decode_kept_tokens, list(sh.prefill_chunks), len(ev.plan.preempted), len(ev.plan.scheduled),
            len(r.scheduler.waiting), r.kv.num_used_blocks, sh.decode_max_kept))


@dataclass
class StepRecord:
    step: int
    start_s: float
    end_s: float
    forward_ms: float
    num_decode_seqs: int
    decode_kv_tokens: int
    prefill_chunks: list
    num_preempted: int
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    decode_max_kv_tokens: int = 0


@dataclass
class RequestInfo:
    request: Request
    index: int
    intended_s: float
    arrival_s: float | None = None
    first_scheduled_s: float | None = None
    generated: list = field(default_factory=list)
    rejected: str | None = None


def prompt_ids(seed: int, index: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(vocab, (n,), generator=g).tolist()


class ReplayEngine:
    def __init__(self, model, spec, method, cfg, num_blocks: int, store, *, seed: int = 0, requests_out=None,
                 clock=time.perf_counter, sleep=time.sleep, progress=None, check: bool = True):
        self.model = model
        self.store = store
        self.method = method
        self.cfg = cfg
        self.device = model.device
        self.seed = seed
        self.clock, self.sleep = clock, sleep
        self.progress = progress
        self.check = check
        self.rec = Recorder(requests_out, keep_rows=True)
        self.cost = Measured()
        self.step_records = StepRecords(self)
        self.observers = [self.rec, self.step_records] + ([DoneProgress(progress)] if progress is not None else [])
        # one GPU, no prefix caching: the store has no shared pages
        cfg = dataclasses.replace(cfg, tensor_parallel_size=1, enable_prefix_caching=False)
        self.replica = make_replica(0, spec, method, cfg, num_blocks, self.cost, self.observers, fast_forward=False)
        self.kv, self.sched = self.replica.kv, self.replica.scheduler
        self.states: dict[int, SeqKV] = {}
        self.info: dict[str, RequestInfo] = {}
        self.steps: list[StepRecord] = self.step_records.records
        #: the forward time of the step being committed (StepRecords reads it)
        self.last_forward_ms = 0.0
        self._t0 = None

    def now(self) -> float:
        return self.clock() - self._t0

    def warmup(self, prompt_tokens: int = 64, decodes: int = 3) -> None:
        """Run one short sequence through the store before the clock starts (CUDA context, cuBLAS
        handles, allocator pools), as vLLM warms up before serving; its pages are given back."""
        store, bs = self.store, self.cfg.block_size
        blocks = -(-(prompt_tokens + decodes) // bs) + self.kv.extra_blocks
        if store.pages_for_blocks(blocks) > store.pages.num_free:
            return
        st = SeqKV(prompt_ids(self.seed, -1, prompt_tokens, self.model.cfg.vocab_size))
        store.ensure(st, blocks)
        c, n = 0, prompt_tokens
        for _ in range(decodes + 1):
            it = Item(st, c, n, 0, c == 0, c == 0)
            store.begin_step([it])
            lg = self.model.forward(torch.tensor(st.tokens[c:c + n], device=self.device),
                                    torch.arange(c, c + n, device=self.device), store.attend,
                                    torch.tensor([n - 1], device=self.device))
            store.end_step([it])
            st.tokens.append(int(lg[0].argmax()))
            c, n = c + n, 1
        store.release(st)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- arrivals -----------------------------------------------------------------------------------
    def _arrive(self, info: RequestInfo, t: float) -> None:
        r = info.request
        info.arrival_s = t
        req = Request(r.request_id, t, r.prompt_tokens, r.output_tokens, None, r.hash_block_tokens, r.source)
        seq = Sequence(req, info.index, r.output_tokens)
        for o in self.observers:
            o.on_arrival(t)
        reason = self.replica.add(seq)
        if reason:
            info.rejected = reason
            for o in self.observers:
                o.on_reject(r.request_id, t, r.prompt_tokens, r.output_tokens, reason, 0)
            return
        self.states[id(seq)] = SeqKV(prompt_ids(self.seed, info.index, r.prompt_tokens, self.model.cfg.vocab_size))

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> float:
        """Serve ``requests`` (arrival order; times shifted so the first arrives at 0). Returns the
        wall-clock span of the run in seconds."""
        reqs = sorted(requests, key=lambda r: r.arrival_time_s)
        t_first = reqs[0].arrival_time_s if reqs else 0.0
        pending = []
        for i, r in enumerate(reqs):
            if r.request_id in self.info:
                raise ValueError(f"request_id {r.request_id!r} appears twice")
            info = RequestInfo(r, i, r.arrival_time_s - t_first)
            self.info[r.request_id] = info
            pending.append(info)
        self._t0 = self.clock()
        i, n = 0, len(pending)
        prev_end = None
        while i < n or self.replica.busy:
            t = self.now()
            while i < n and pending[i].intended_s <= t:
                self._arrive(pending[i], t)
                i += 1
            if not self.replica.busy:
                prev_end = None
                if i < n:
                    self.sleep(max(0.0, pending[i].intended_s - self.now()))
                continue
            end = self._step(prev_end if prev_end is not None else t)
            if end is None:
                raise RuntimeError(f"engine stalled: {len(self.sched.running)} running, {len(self.sched.waiting)} "
                                   "waiting and nothing can be scheduled")
            prev_end = end
        return self.now()

    def _step(self, start: float) -> float | None:
        t_sched = self.now()
        p = self.replica.begin(start)
        if p is None:
            # nothing scheduled (cannot happen for a request that passed can_ever_fit); keep the
            # physical pages consistent with any preemption the scheduler made before giving up
            for seq in list(self.sched.waiting):
                st = self.states.get(id(seq))
                if st is not None and seq.blocks == 0 and st.pages:
                    self.store.release(st)
            return None
        plan = p.plan
        store, states = self.store, self.states
        for victim in plan.preempted:
            store.release(states[id(victim)])
        pre, dec = [], []
        for seq, n in plan.scheduled:
            st = states[id(seq)]
            store.ensure(st, seq.blocks)
            info = self.info[seq.req.request_id]
            if info.first_scheduled_s is None:
                info.first_scheduled_s = t_sched
            (pre if seq.num_computed < seq.prefill_base else dec).append((seq, st, n))
        items, tokens, positions, rows, samplers = [], [], [], [], []
        row = 0
        for seq, st, n in pre + dec:
            c = seq.num_computed
            prefill = c < seq.prefill_base
            if not prefill:
                assert n == 1 and c == len(st.tokens) - 1, (seq, n, len(st.tokens))
            items.append(Item(st, c, n, row, prefill, prefill and c + n == seq.prefill_base))
            tokens.extend(st.tokens[c:c + n])
            positions.extend(range(c, c + n))
            if c + n == seq.num_tokens:
                rows.append(row + n - 1)
                samplers.append((seq, st))
            row += n
        f0 = self.clock()
        dev = self.device
        tok = torch.tensor(tokens, dtype=torch.long).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True)
        sel = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        store.begin_step(items)
        logits = self.model.forward(tok, pos, store.attend, sel)
        next_ids = logits.argmax(dim=-1).tolist() if rows else []
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        f1 = self.clock()
        t_end = self.now()
        store.end_step(items)
        for (seq, st), tid in zip(samplers, next_ids):
            st.tokens.append(tid)
        p.end_s = t_end
        self.last_forward_ms = (f1 - f0) * 1e3
        finished = self.replica.commit()
        done = {id(s) for s in finished}
        for seq, _ in plan.scheduled:
            st = states[id(seq)]
            if id(seq) in done:
                self.info[seq.req.request_id].generated = st.tokens[seq.prompt_tokens:]
                store.release(st)
                del states[id(seq)]
            else:
                store.trim(st, seq.blocks)
                if self.check:
                    assert len(st.pages) == store.pages_for_blocks(seq.blocks), (seq, len(st.pages))
                    assert len(st.tokens) == seq.num_tokens, (seq, len(st.tokens))
        for seq in finished:
            assert seq.generated == seq.output_tokens
        return t_end
