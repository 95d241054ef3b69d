"""Who runs in the next step (the policy; which blocks they get is KVCacheManager's business).

``ChunkedScheduler`` mirrors the vLLM V1 scheduler (``vllm/v1/core/sched/scheduler.py``, v0.19):
one token budget per step (``max_num_batched_tokens``); running requests first, in admission order,
each taking the tokens it still needs (one for a decode, the rest of its prompt for a partial prefill)
capped by the remaining budget; when KV blocks run out, the most recently admitted running request is
preempted (recompute: it loses its KV and goes back to the front of the waiting queue), repeatedly,
until the allocation fits or the request itself was the one preempted; then, if nothing was preempted
this step, waiting requests in FCFS order while budget, ``max_num_seqs`` and blocks allow, the last one
possibly with a partial chunk (chunked prefill). Without chunked prefill a prompt that does not fit in
the remaining budget waits for a later step. A preempted request that can never be scheduled again (its
prompt + generated tokens exceed what one step may prefill, or what the whole pool holds) is dropped as
vLLM V0 ignores it, and the replica records it as rejected.

``PrefillFirstScheduler`` mirrors vLLM V0 without chunked prefill: a step either prefills whole
prompts of waiting requests (up to the budget) or decodes every running request, never both.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from kvsim.engine.kv_cache_manager import KVCacheManager
from kvsim.engine.sequence import FINISHED, RUNNING, WAITING, Sequence


@dataclass(slots=True)
class StepPlan:
    #: (sequence, new tokens this step), in scheduling order
    scheduled: list = field(default_factory=list)
    preempted: list = field(default_factory=list)
    #: every scheduled sequence is a decode (one token past its prefill_base)
    pure_decode: bool = True
    #: budget left after scheduling
    budget_left: int = 0


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        #: (sequence, reason): preempted sequences that can never run again (see _preempt); the replica
        #: rejects them
        self.dropped: list[tuple[Sequence, str]] = []

    @property
    def max_prefill_tokens(self) -> float:
        """Most tokens one sequence can prefill in one step."""
        return math.inf if self.enable_chunked_prefill else self.max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed = 0
        seq.kv_received = False  # a received KV is gone too: the recompute is a local prefill
        seq.prefill_base = seq.num_tokens
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # a request that can never be scheduled again would wait at the head of the queue forever; vLLM V0
        # ignores (drops) such a request, and so does kvsim, with the reason it would get at arrival:
        # without chunked prefill, prompt + generated no longer fits one step; or the recompute prefill
        # needs more blocks than the pool has (a method that keeps fewer tokens than the context in decode)
        if seq.num_tokens > self.max_prefill_tokens:
            reason = "prompt_exceeds_max_num_batched_tokens"
        elif not self.kv.can_ever_fit(seq):
            reason = "kv_capacity"
        else:
            seq.status = WAITING
            self.waiting.appendleft(seq)
            return
        seq.status = FINISHED
        self.dropped.append((seq, reason))

    def _admit(self, seq: Sequence, budget: int, plan: StepPlan) -> int:
        """Try to start ``seq`` with at most ``budget`` tokens; returns tokens scheduled (0 = could not)."""
        kv = self.kv
        if seq.num_computed == 0:
            kv.start(seq)
            if seq.kv_pending:
                return -1  # prefix blocks loading from the CPU tier: it waits for them (kvsim.engine.offload)
        need = seq.num_tokens - seq.num_computed
        if need > budget and not self.enable_chunked_prefill:
            self._undo_start(seq)
            return 0
        n = min(need, budget)
        if not kv.allocate_slots(seq, n):
            self._undo_start(seq)
            return 0
        plan.scheduled.append((seq, n))
        if not (n == 1 and seq.num_computed >= seq.prefill_base):
            plan.pure_decode = False
        return n

    def _undo_start(self, seq: Sequence) -> None:
        if seq.blocks:
            self.kv.free(seq)
        seq.num_computed = 0

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        running = self.running
        kv = self.kv
        # full-cache fast path: a sequence needs a new block only when it crosses a block boundary
        fast = kv.paged and kv.keeps_all
        bs, extra = kv.block_size, kv.extra_blocks
        append = plan.scheduled.append
        pure_decode = True
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            computed = seq.num_computed
            n = seq.prompt_tokens + seq.generated - computed
            if n > budget:
                n = budget
            has_room = fast and -(-(computed + n) // bs) + extra <= seq.blocks
            while not has_room and not kv.allocate_slots(seq, n):
                victim = running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    n = 0
                    break
            if n == 0:
                break
            append((seq, n))
            # a decode computes one token past the (re)prefilled prefill_base; the last chunk of a
            # recompute may also be one token, but it ends a prefill (methods compress there)
            if n != 1 or computed < seq.prefill_base:
                pure_decode = False
            budget -= n
            i += 1
        plan.pure_decode = pure_decode
        if not plan.preempted:
            budget = self._admit_waiting(plan, budget, whole_prompts=False)
        plan.budget_left = budget
        return plan

    def _admit_waiting(self, plan: StepPlan, budget: int, whole_prompts: bool) -> int:
        """Admit waiting requests in FCFS order while budget, max_num_seqs and blocks allow; returns
        the budget left. ``whole_prompts``: a request whose remaining prompt exceeds the budget waits."""
        waiting, running = self.waiting, self.running
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if whole_prompts and seq.num_tokens - seq.num_computed > budget:
                break
            n = self._admit(seq, budget, plan)
            if n < 0:
                waiting.popleft()  # holds its blocks outside the queues until its load lands; the next one may go
                continue
            if n == 0:
                break
            waiting.popleft()
            seq.status = RUNNING
            running.append(seq)
            budget -= n
        return budget

    def admission_blocked(self) -> bool:
        """True when a waiting request cannot be admitted until a running one finishes or frees blocks.

        The replica only fast-forwards decode steps when this holds, so skipping the scheduler for
        them cannot change a decision (free blocks only shrink during pure decode).
        """
        if not self.waiting:
            return True
        if len(self.running) >= self.max_num_seqs:
            return True
        if self.max_num_batched_tokens - len(self.running) <= 0:
            return True
        seq = self.waiting[0]
        # same test _admit makes, without side effects; a possible prefix hit only makes admission
        # easier, so be conservative and treat a hashed request as admissible
        if self.kv.prefix_sharing and seq.num_computed == 0 and seq.req.prefix_hashes:
            return False
        budget = self.max_num_batched_tokens - len(self.running)
        need = seq.num_tokens - seq.num_computed
        if need > budget and not self.enable_chunked_prefill:
            return True
        n = min(need, budget)
        target = self.kv.blocks_for(seq, seq.num_computed + n) if self.kv.paged else self.kv.reservation(seq)
        return target - seq.blocks > self.kv.num_free_blocks


class PrefillFirstScheduler(Scheduler):
    @property
    def max_prefill_tokens(self) -> float:
        return self.max_num_batched_tokens

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self._admit_waiting(plan, self.max_num_batched_tokens, whole_prompts=True)
        running = self.running
        if plan.scheduled:
            plan.pure_decode = False
            plan.budget_left = budget
            return plan
        kv = self.kv
        i = 0
        while i < len(running):
            seq = running[i]
            while not kv.allocate_slots(seq, 1):
                victim = running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            else:
                plan.scheduled.append((seq, 1))
                i += 1
                continue
            break
        plan.budget_left = budget - len(plan.scheduled)
        return plan

    def admission_blocked(self) -> bool:
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return True
        seq = self.waiting[0]
        if self.kv.prefix_sharing and seq.num_computed == 0 and seq.req.prefix_hashes:
            return False
        need = seq.num_tokens - seq.num_computed
        if need > self.max_num_batched_tokens:
            return True
        target = self.kv.blocks_for(seq, seq.num_computed + need) if self.kv.paged else self.kv.reservation(seq)
        return target - seq.blocks > self.kv.num_free_blocks
