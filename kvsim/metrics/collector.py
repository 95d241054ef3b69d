"""Everything a replay measures, streamed: per-request rows go to ``requests.csv`` as they finish,
latencies into bounded-memory percentile accumulators, engine state into ``timeline.csv``. The
:class:`Recorder` is an observer of the run (kvsim.engine.events): it learns everything from the
arrivals, rejections and step events the engine emits."""

from __future__ import annotations

import csv
import io
from collections import Counter
from itertools import pairwise

from kvsim.engine.events import Observer, Step
from kvsim.engine.sequence import Sequence
from kvsim.metrics.quantiles import Quantiles
from kvsim.metrics.slo import SLO

REQUEST_COLUMNS = [
    "request_id", "replica", "status", "reject_reason", "arrival_time_s", "prompt_tokens",
    "trace_output_tokens", "output_tokens", "output_length_ratio", "first_token_time_s", "finish_time_s",
    "ttft_ms", "tpot_ms", "e2el_ms", "num_preemptions", "prefix_hit_tokens",
]
TIMELINE_COLUMNS = ["time_s", "replica", "batch_size", "num_waiting", "kv_blocks_used", "kv_blocks_total"]


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(round(x, 9))
    return str(x)


class Recorder(Observer):
    def __init__(self, requests_out: io.TextIOBase | None = None, timeline_out: io.TextIOBase | None = None,
                 slo: SLO | None = None, timeline_interval_s: float = 1.0, keep_rows: bool = False,
                 extra_columns: tuple = (), extra_values=None):
        #: columns after REQUEST_COLUMNS and the function giving a completed sequence's values for them (runs
        #: that move KV beyond the GPU add theirs, kvsim.metrics.transfer.TRANSFER_COLUMNS); none by default
        self.columns = REQUEST_COLUMNS + list(extra_columns)
        self._extra_values = extra_values if extra_columns else None
        self._extra_none = [None] * len(extra_columns)
        self._req_writer = csv.writer(requests_out, lineterminator="\n") if requests_out else None
        if self._req_writer:
            self._req_writer.writerow(self.columns)
        self._tl_writer = csv.writer(timeline_out, lineterminator="\n") if timeline_out else None
        if self._tl_writer:
            self._tl_writer.writerow(TIMELINE_COLUMNS)
        self.timeline_interval_s = timeline_interval_s
        self._tl_last: dict[int, float] = {}
        self.slo = slo or SLO()
        self.ttft = Quantiles()
        self.tpot = Quantiles()
        self.e2el = Quantiles()
        self.itl = Quantiles()
        self.num_arrivals = 0
        self.completed = 0
        self.rejected = Counter()
        self.good = 0
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.trace_output_tokens = 0
        self.first_arrival_s: float | None = None
        self.last_arrival_s = 0.0
        self.last_finish_s = 0.0
        self.num_steps = 0
        self.num_preemptions = 0
        self.peak_batch_size = 0
        self.peak_kv_blocks = 0
        self.batch_size_sum = 0.0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.length_ratio_sum = 0.0
        #: per-request rows kept in memory (API use and tests); None unless asked for
        self.rows: list | None = [] if keep_rows else None

    # -- arrivals and rejections -------------------------------------------------------------------
    def on_arrival(self, arrival_time_s: float | None) -> None:
        self.num_arrivals += 1
        if arrival_time_s is not None:
            if self.first_arrival_s is None:
                self.first_arrival_s = arrival_time_s
            self.last_arrival_s = arrival_time_s

    def on_reject(self, request_id: str, arrival_time_s, prompt_tokens, output_tokens, reason: str, replica: int = -1) -> None:
        self.rejected[reason] += 1
        row = [request_id, replica, "rejected", reason, arrival_time_s, prompt_tokens, output_tokens,
               None, None, None, None, None, None, None, 0, 0]
        self._row(row + self._extra_none if self._extra_values else row)

    # -- engine events ----------------------------------------------------------------------------------
    def on_step(self, ev: Step) -> None:
        """A committed step or fast-forward stretch: its inter-token gaps, its batch, the KV blocks in use
        at its end, the requests it finished, and a timeline row every ``timeline_interval_s`` (and when
        the replica goes idle)."""
        batch = len(ev.plan.scheduled)
        itl = self.itl
        itl.add_many(ev.itl)
        k = ev.ff_steps
        if k > 1:
            # what stepping records: differences of consecutive end times; a batch of B gets B samples each
            itl.add_many([b - a for a, b in pairwise(ev.ff_ends)], batch)
        else:
            k = 1
        # step() and kv_used(), inlined: this runs once per committed step
        self.num_steps += k
        self.batch_size_sum += batch * k
        if batch > self.peak_batch_size:
            self.peak_batch_size = batch
        used = ev.kv_blocks_used
        if used > self.peak_kv_blocks:
            self.peak_kv_blocks = used
        t = ev.end_s
        finished = ev.finished
        if finished:
            for s in finished:
                self.finish(s, t)
        r = ev.replica
        last = self._tl_last.get(r.id)
        if last is None or t - last >= self.timeline_interval_s or (
                (finished or ev.handed_on) and not r.scheduler.running and not r.scheduler.waiting):
            self._tl_last[r.id] = t
            if self._tl_writer:
                sched, kv = r.scheduler, r.kv
                self._tl_writer.writerow([_fmt(t), r.id, len(sched.running), len(sched.waiting), kv.num_used_blocks,
                                          kv.num_blocks])

    def step(self, num_steps: int, batch_size: int) -> None:
        self.num_steps += num_steps
        self.batch_size_sum += batch_size * num_steps
        if batch_size > self.peak_batch_size:
            self.peak_batch_size = batch_size

    def kv_used(self, blocks: int) -> None:
        if blocks > self.peak_kv_blocks:
            self.peak_kv_blocks = blocks

    def finish(self, seq: Sequence, t: float) -> None:
        ttft_s = seq.first_token_s - seq.arrival_s
        e2el_s = t - seq.arrival_s
        tpot_s = (t - seq.first_token_s) / (seq.output_tokens - 1) if seq.output_tokens > 1 else 0.0
        self.completed += 1
        self.ttft.add(ttft_s)
        self.e2el.add(e2el_s)
        if seq.output_tokens > 1:
            self.tpot.add(tpot_s)
        if self.slo.met(ttft_s * 1e3, tpot_s * 1e3, e2el_s * 1e3):
            self.good += 1
        self.output_tokens += seq.generated
        self.prompt_tokens += seq.prompt_tokens
        self.trace_output_tokens += seq.req.output_tokens
        self.length_ratio_sum += seq.output_tokens / seq.req.output_tokens
        self.num_preemptions += seq.num_preemptions
        self.prefix_hit_tokens += seq.prefix_hit_tokens
        if seq.req.prefix_hashes:
            self.prefix_query_tokens += seq.prompt_tokens
        if t > self.last_finish_s:
            self.last_finish_s = t
        if self._req_writer is None and self.rows is None:
            return  # no requests.csv and no rows kept: the row would be thrown away
        row = [seq.req.request_id, seq.replica, "completed", None, seq.arrival_s, seq.prompt_tokens,
               seq.req.output_tokens, seq.generated, seq.output_tokens / seq.req.output_tokens,
               seq.first_token_s, t, ttft_s * 1e3, tpot_s * 1e3, e2el_s * 1e3,
               seq.num_preemptions, seq.prefix_hit_tokens]
        self._row(row + self._extra_values(seq) if self._extra_values else row)

    def _row(self, values: list) -> None:
        if self._req_writer:
            self._req_writer.writerow([_fmt(v) for v in values])
        if self.rows is not None:
            self.rows.append(dict(zip(self.columns, values)))
