"""Scheduler plans computed by hand, no SimPy: the token budget split, chunked prefill, the sequence cap,
preemption by recompute (vLLM V1 rules), the prefill-first scheduler, and ``admission_blocked``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.engine.sequence import RUNNING, WAITING, Sequence

from conftest import examples, make_engine, make_request


def put_running(e, rid, prompt: int, generated: int = 0, computed: int | None = None,
                output: int | None = None, prefill_base: int | None = None) -> Sequence:
    """Place a sequence directly in the running list with ``computed`` tokens of KV (default: in decode)
    and ``output`` tokens to generate (default: two more than generated); ``prefill_base`` for a
    sequence that is recomputing after a preemption."""
    output = generated + 2 if output is None else output
    s = Sequence(make_request(rid, prompt=prompt, output=output), e._next_index, output)
    e._next_index += 1
    s.generated = generated
    if prefill_base is not None:
        s.prefill_base = prefill_base
        s.num_preemptions = 1
    s.num_computed = prompt + generated - 1 if computed is None else computed
    assert e.pool.grow(s, e.kv.blocks_for(s, s.num_computed))
    s.status = RUNNING
    e.sched.running.append(s)
    return s


def step(e, now: float = 0.0):
    """One engine step without SimPy; returns the plan as [(request_id, tokens)]."""
    p = e.replica.begin(now)
    if p is None:
        return None, []
    plan = [(s.req.request_id, n) for s, n in p.plan.scheduled]
    e.replica.commit()
    e.check()
    return p, plan


def ids(seqs):
    return [s.req.request_id for s in seqs]


# -- budget split --------------------------------------------------------------------------------------
def test_decodes_first_then_prefill_chunk_in_the_remaining_budget():
    e = make_engine(max_num_batched_tokens=16)
    e.add(make_request("A", prompt=4, output=10), make_request("B", prompt=4, output=10))
    _, plan = step(e)
    assert plan == [("A", 4), ("B", 4)]
    e.add(make_request("C", prompt=20, output=5))
    p, plan = step(e)
    assert plan == [("A", 1), ("B", 1), ("C", 14)] and not p.plan.pure_decode and p.plan.budget_left == 0
    p, plan = step(e)
    assert plan == [("A", 1), ("B", 1), ("C", 6)] and not p.plan.pure_decode and p.plan.budget_left == 8
    p, plan = step(e)
    assert plan == [("A", 1), ("B", 1), ("C", 1)] and p.plan.pure_decode and p.plan.budget_left == 13


def test_long_prompt_is_chunked_over_several_steps():
    e = make_engine(max_num_batched_tokens=16)
    (a,) = e.add(make_request("A", prompt=40, output=2))
    chunks = []
    for expect_computed in (16, 32, 40):
        step(e)
        chunks.append(e.cost.calls[-1].prefill_chunks)
        assert a.num_computed == expect_computed
    assert chunks == [[(16, 16, False)], [(16, 32, False)], [(8, 40, True)]]
    assert a.generated == 1 and a.first_token_s is not None
    assert a.blocks == 10                     # 40 tokens in blocks of 4


def test_max_num_seqs_caps_the_batch():
    e = make_engine(max_num_seqs=2, max_num_batched_tokens=64)
    e.add(*(make_request(i, prompt=4, output=3) for i in range(3)))
    _, plan = step(e)
    assert plan == [("0", 4), ("1", 4)]
    assert ids(e.sched.waiting) == ["2"]
    _, plan = step(e)
    assert plan == [("0", 1), ("1", 1)]       # budget left, but the cap holds
    _, plan = step(e)
    assert plan == [("0", 1), ("1", 1)]       # both finish in this step
    _, plan = step(e)
    assert plan == [("2", 4)]


def test_without_chunking_a_prompt_that_does_not_fit_waits_whole():
    e = make_engine(max_num_batched_tokens=16, chunked=False)
    e.add(make_request("A", prompt=10, output=5), make_request("B", prompt=10, output=5))
    _, plan = step(e)
    assert plan == [("A", 10)]                # B would get 6 tokens with chunking; here it waits
    _, plan = step(e)
    assert plan == [("A", 1), ("B", 10)]


def test_with_chunking_the_same_prompt_gets_a_partial_chunk():
    e = make_engine(max_num_batched_tokens=16, chunked=True)
    e.add(make_request("A", prompt=10, output=5), make_request("B", prompt=10, output=5))
    _, plan = step(e)
    assert plan == [("A", 10), ("B", 6)]


# -- preemption ----------------------------------------------------------------------------------------
def test_preemption_takes_the_newest_running_request_by_recompute():
    # blocks of 4; A (8 prompt + 1 generated) needs a 3rd block for its next token, none is free
    e = make_engine(num_blocks=5, max_num_batched_tokens=5)
    a = put_running(e, "A", prompt=8, generated=1)
    b = put_running(e, "B", prompt=12, generated=1)
    assert (a.blocks, b.blocks, e.pool.num_free) == (2, 3, 0)
    e.add(make_request("W", prompt=4, output=2))
    plan = e.sched.schedule()
    assert [(s.req.request_id, n) for s, n in plan.scheduled] == [("A", 1)]
    assert plan.preempted == [b]
    # B lost its KV, goes to the FRONT of the waiting queue, and will recompute prompt + generated
    assert ids(e.sched.waiting) == ["B", "W"]
    assert (b.status, b.num_computed, b.blocks, b.prefill_base, b.num_preemptions) == (WAITING, 0, 0, 13, 1)
    assert b.generated == 1 and e.sched.num_preemptions == 1
    # vLLM V1: no admissions in a step that preempted, although B's 4-token chunk would fit now
    assert e.pool.num_free == 2 and plan.budget_left == 4
    e.check()
    # the next step readmits B first (a partial chunk of its 13 tokens)
    plan = e.sched.schedule()
    assert [(s.req.request_id, n) for s, n in plan.scheduled] == [("A", 1), ("B", 4)]
    assert not plan.preempted and ids(e.sched.waiting) == ["W"]


def test_preemption_repeats_newest_first_until_the_allocation_fits():
    e = make_engine(num_blocks=5, max_num_batched_tokens=64)
    # A is mid-prefill: 8 of 16 prompt tokens computed; its next chunk needs 2 more blocks
    a = put_running(e, "A", prompt=16, computed=8)
    b = put_running(e, "B", prompt=4, generated=1)
    c = put_running(e, "C", prompt=4, generated=1)
    assert e.pool.num_free == 1 and (a.blocks, b.blocks, c.blocks) == (2, 1, 1)
    e.pool.grow(b, 2)                         # B holds an extra block: freeing C alone is not enough
    assert e.pool.num_free == 0
    plan = e.sched.schedule()
    assert plan.preempted == [c, b]
    assert ids(e.sched.waiting) == ["B", "C"]  # arrival order kept at the front
    assert [(s.req.request_id, n) for s, n in plan.scheduled] == [("A", 8)]
    assert a.blocks == 4 and e.pool.num_free == 1
    e.check()


def test_a_request_that_cannot_grow_preempts_itself_when_it_is_the_newest():
    e = make_engine(num_blocks=4, max_num_batched_tokens=64)
    a = put_running(e, "A", prompt=4, generated=2, computed=5)   # holds 2 blocks, room for 8 tokens
    b = put_running(e, "B", prompt=8, generated=1)               # 2 blocks full, needs a 3rd
    assert e.pool.num_free == 0
    plan = e.sched.schedule()
    assert [(s.req.request_id, n) for s, n in plan.scheduled] == [("A", 1)]
    assert plan.preempted == [b] and a.status == RUNNING and e.sched.running == [a]
    assert b.prefill_base == 9
    e.check()


def test_preempted_request_is_recomputed_and_counted():
    # 3 blocks of 4: A and B both fit their prompts but not their growth
    e = make_engine(num_blocks=3, max_num_batched_tokens=64)
    a, b = e.add(make_request("A", prompt=4, output=6), make_request("B", prompt=4, output=6))
    _, plan = step(e)
    assert plan == [("A", 4), ("B", 4)]
    p, plan = step(e)                          # A takes the last free block, B must preempt itself
    assert plan == [("A", 1)] and p.plan.preempted == [b]
    assert b.num_preemptions == 1 and b.prefill_base == 5 and ids(e.sched.waiting) == ["B"]
    while e.replica.busy:
        step(e)
    assert a.generated == 6 and b.generated == 6
    assert e.pool.num_free == 3 and e.sched.num_preemptions >= 1
    assert [r["num_preemptions"] for r in e.rec.rows] == [0, b.num_preemptions]


# -- prefill-first ---------------------------------------------------------------------------------------
def test_prefill_first_never_mixes_prefill_and_decode():
    e = make_engine(max_num_batched_tokens=16, prefill_first=True)
    e.add(make_request("A", prompt=6, output=4))
    _, plan = step(e)
    assert plan == [("A", 6)]
    e.add(make_request("B", prompt=10, output=3), make_request("C", prompt=10, output=3))
    p, plan = step(e)
    assert plan == [("B", 10)] and not p.plan.pure_decode   # A's decode waits; C does not fit the budget
    _, plan = step(e)
    assert plan == [("C", 10)]
    p, plan = step(e)
    assert plan == [("A", 1), ("B", 1), ("C", 1)] and p.plan.pure_decode


@settings(max_examples=examples(40), deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 8), st.integers(0, 3)), min_size=1, max_size=8),
       num_blocks=st.integers(7, 20), mnbt=st.integers(24, 40))
def test_prefill_first_steps_are_all_prefill_or_all_decode(reqs, num_blocks, mnbt):
    e = make_engine(num_blocks=num_blocks, max_num_batched_tokens=mnbt, prefill_first=True, max_num_seqs=4)
    pending = [make_request(i, prompt=p, output=o) for i, (p, o, _) in enumerate(reqs)]
    delays = [d for _, _, d in reqs]
    t = 0
    while pending or e.replica.busy:
        assert t < 10_000, "stalled"
        while pending and delays[0] <= 0:
            r = pending.pop(0)
            delays.pop(0)
            s = Sequence(r, e._next_index, r.output_tokens)
            e._next_index += 1
            e.replica.add(s)
        if delays:
            delays[0] -= 1
        p = e.replica.begin(float(t))
        t += 1
        if p is None:
            continue
        kinds = {n == 1 and s.num_computed >= s.prefill_base for s, n in p.plan.scheduled}
        assert len(kinds) == 1, p.plan.scheduled
        assert p.plan.pure_decode == kinds.pop()
        e.replica.commit()
        e.check()
    assert e.pool.num_free == e.pool.num_blocks


# -- admission_blocked ------------------------------------------------------------------------------------
def test_admission_blocked_by_hand():
    e = make_engine(num_blocks=6, max_num_seqs=2, max_num_batched_tokens=16)
    assert e.sched.admission_blocked()                         # nobody waiting
    put_running(e, "A", prompt=8, generated=1)                 # 2 blocks
    e.add(make_request("W", prompt=12, output=2))
    assert not e.sched.admission_blocked()                     # 15 budget, 3 blocks of 4 free
    e.pool.grow(e.sched.running[0], 4)                         # only 2 free now, W's 12 tokens need 3
    assert e.sched.admission_blocked()
    e2 = make_engine(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=16)
    put_running(e2, "A", prompt=8, generated=1)
    e2.add(make_request("W", prompt=4, output=2))
    assert e2.sched.admission_blocked()                        # max_num_seqs reached
    e3 = make_engine(num_blocks=64, max_num_batched_tokens=16, chunked=False)
    put_running(e3, "A", prompt=8, generated=1)
    put_running(e3, "B", prompt=8, generated=1)
    e3.add(make_request("W", prompt=15, output=2))
    assert e3.sched.admission_blocked()                        # 15 > 16 - 2 decodes, no chunking
    e4 = make_engine(num_blocks=64, max_num_batched_tokens=16, chunked=True)
    put_running(e4, "A", prompt=8, generated=1)
    put_running(e4, "B", prompt=8, generated=1)
    e4.add(make_request("W", prompt=15, output=2))
    assert not e4.sched.admission_blocked()                    # a 14-token chunk fits
    e5 = make_engine(num_blocks=8, max_num_batched_tokens=16, prefix_caching=True)
    e5.pool.grow(put_running(e5, "A", prompt=8, generated=1), 7)
    e5.add(make_request("W", prompt=16, output=2, prefix_hashes=[1]))
    assert not e5.sched.admission_blocked()                    # a possible prefix hit: conservative


@settings(max_examples=examples(40), deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=8),
       num_blocks=st.integers(8, 24), mnbt=st.integers(8, 40), max_num_seqs=st.integers(1, 5),
       prefill_first=st.booleans(), chunked=st.booleans())
def test_admission_blocked_means_the_next_decode_step_admits_nobody(reqs, num_blocks, mnbt, max_num_seqs,
                                                                    prefill_first, chunked):
    """The fast-forward precondition: after a pure-decode step of every running request with
    ``admission_blocked()`` true and no finish and no arrival, the next step admits nobody."""
    if prefill_first or not chunked:
        mnbt = max(mnbt, 30)
    e = make_engine(num_blocks=num_blocks, max_num_batched_tokens=mnbt, max_num_seqs=max_num_seqs,
                    prefill_first=prefill_first, chunked=chunked)
    for i, (p, o) in enumerate(reqs):
        s = Sequence(make_request(i, prompt=p, output=o), i, o)
        e.replica.add(s)
    for _ in range(2000):
        p = e.replica.begin(0.0)
        if p is None:
            break
        plan = p.plan
        candidate = (plan.pure_decode and not plan.preempted and len(plan.scheduled) == len(e.sched.running)
                     and e.sched.admission_blocked())
        running_before = set(map(id, e.sched.running))
        finished = e.replica.commit()
        e.check()
        if candidate and not finished:
            nxt = e.sched.schedule()
            assert {id(s) for s, _ in nxt.scheduled} <= running_before
            # put the plan back to a committed state: run it
            e.replica.pending = type(p)(0.0, 0.0, nxt)
            e.replica.commit()
            e.check()
    assert not e.replica.busy
    assert e.pool.num_free == e.pool.num_blocks


def test_prefill_first_drops_a_preempted_request_it_can_never_prefill_again():
    """Without chunking a step prefills at most max_num_batched_tokens of one sequence. A request preempted
    after prompt + generated outgrew that would wait forever at the head of the queue (the run stalled);
    as vLLM V0 does, it is dropped instead, and the replica records it as rejected."""
    e = make_engine(num_blocks=4, max_num_batched_tokens=8, prefill_first=True)
    a = put_running(e, "A", prompt=4, generated=2, computed=5)   # 2 blocks, room for its next token
    b = put_running(e, "B", prompt=7, generated=2)               # 8 computed in 2 blocks, needs a 3rd; 9 > 8
    assert e.kv.can_ever_fit(b)                                  # 7 + 4 - 1 tokens: KV is not the problem
    e.replica.outstanding_tokens = (4 + 4) + (7 + 4)
    p = e.replica.begin(0.0)
    assert [(s.req.request_id, n) for s, n in p.plan.scheduled] == [("A", 1)]
    assert p.plan.preempted == [b] and not e.sched.waiting and e.sched.dropped == []
    assert e.sched.running == [a] and b.blocks == 0 and e.sched.num_preemptions == 1
    assert [(r["request_id"], r["reject_reason"]) for r in e.rec.rows] == [("B", "prompt_exceeds_max_num_batched_tokens")]
    assert e.replica.outstanding_tokens == 4 + 4
    e.replica.commit()
    e.check()


def test_chunked_scheduler_keeps_a_long_preempted_request_when_it_can_chunk():
    e = make_engine(num_blocks=4, max_num_batched_tokens=8, chunked=True)
    put_running(e, "A", prompt=4, generated=2, computed=5)
    b = put_running(e, "B", prompt=7, generated=2)
    plan = e.sched.schedule()
    assert plan.preempted == [b] and ids(e.sched.waiting) == ["B"] and e.sched.dropped == []


def test_a_preempted_request_whose_recompute_can_never_fit_is_dropped_kv_capacity():
    """Regression (found by hypothesis): SnapKV keeps budget + generated tokens, so a request fits the pool
    in decode, but recomputing it after preemption prefills prompt + generated tokens at once. When that
    exceeds the whole pool it could never be readmitted and the run stalled. vLLM V0 ignores a request
    whose blocks can never be allocated; kvsim rejects it with kv_capacity, as at arrival."""
    e = make_engine(num_blocks=8, max_num_batched_tokens=64, method="snapkv:budget=8,window=4")
    a = put_running(e, "A", prompt=4, generated=9, output=20)    # 12 tokens kept: 3 full blocks
    b = put_running(e, "B", prompt=24, generated=10, output=20)  # 8 + 9 kept: 5 blocks
    assert (a.blocks, b.blocks, e.pool.num_free) == (3, 5, 0)
    assert e.kv.can_ever_fit(b)                                  # 24 prompt, or 8 + 19 in decode: <= 32
    e.replica.outstanding_tokens = (4 + 20) + (24 + 20)
    p = e.replica.begin(0.0)
    assert [(s.req.request_id, n) for s, n in p.plan.scheduled] == [("A", 1)]
    assert p.plan.preempted == [b] and not e.sched.waiting     # 34 tokens to recompute > 32 in the pool
    assert [(r["request_id"], r["reject_reason"]) for r in e.rec.rows] == [("B", "kv_capacity")]
    assert e.replica.outstanding_tokens == 4 + 20
    e.replica.commit()
    e.check()


def test_last_one_token_chunk_of_a_recompute_is_prefill_not_decode():
    """Regression (found by hypothesis, fast-forward != stepping with SnapKV): a preempted request recomputes
    prompt + generated tokens; when the last chunk of that prefill is a single token it was taken for a
    decode (n == 1, generated > 0). The step was then 'pure decode' and fast-forwarded, which skipped the
    compression at the end of the prefill (blocks not freed, compression work not charged)."""
    e = make_engine(num_blocks=16, max_num_batched_tokens=8, method="snapkv:budget=8,window=4")
    a = put_running(e, "A", prompt=12, generated=3, computed=14, output=6, prefill_base=15)
    assert a.blocks == 4                                           # 14 of 15 recomputed tokens, not compressed yet
    p, plan = step(e)
    assert plan == [("A", 1)] and not p.plan.pure_decode
    assert e.cost.calls[-1].prefill_chunks == [(1, 15, True)] and e.cost.calls[-1].num_decode_seqs == 0
    assert a.generated == 4 and a.blocks == 2                      # compressed to the budget: 8 tokens
    p, plan = step(e)
    assert plan == [("A", 1)] and p.plan.pure_decode
    c = e.cost.calls[-1]
    assert (c.num_decode_seqs, c.decode_kept_tokens, c.prefill_chunks) == (1, 9, [])
