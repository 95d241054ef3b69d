"""BlockManager: hand-checked semantics of every operation, then random operation sequences that must
keep the conservation invariants (``check``), never exceed capacity and end with everything free."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.engine.block_manager import BlockManager
from kvsim.engine.sequence import Sequence

from conftest import examples, make_request


def seq(i: int = 0, prompt: int = 16) -> Sequence:
    return Sequence(make_request(i, prompt=prompt), i, 4)


def keys(family: str, n: int) -> list:
    return [(family, i) for i in range(n)]


# -- plain blocks ------------------------------------------------------------------------------------
def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 16)


def test_grow_is_all_or_nothing():
    bm = BlockManager(10, 16)
    a, b = seq(0), seq(1)
    assert bm.grow(a, 3) and a.blocks == 3 and bm.num_free == 7 and bm.num_used == 3
    assert bm.grow(a, 2) and a.blocks == 3 and bm.num_free == 7      # never shrinks
    assert bm.grow(b, 7) and bm.num_free == 0
    assert not bm.grow(a, 4)                                         # one too many: no change at all
    assert a.blocks == 3 and bm.num_free == 0
    bm.check([a, b])


def test_shrink_returns_private_blocks_only():
    bm = BlockManager(10, 4, enable_prefix_caching=True)
    a = seq(0)
    bm.grow(a, 5)
    bm.register_full_blocks(a, keys("x", 2), computed_tokens=8)      # first 2 blocks become shared
    assert a.shared_hashes == keys("x", 2)
    bm.shrink(a, 3)
    assert a.blocks == 3 and bm.num_free == 7
    bm.shrink(a, 0)                                                  # shared blocks are kept
    assert a.blocks == 2 and bm.num_free == 8
    bm.shrink(a, 5)                                                  # a larger target is a no-op
    assert a.blocks == 2
    bm.check([a])


def test_free_returns_everything_and_resets_the_sequence():
    bm = BlockManager(8, 4)
    a = seq(0)
    bm.grow(a, 6)
    a.reserved = True
    bm.free(a)
    assert (a.blocks, a.shared_hashes, a.reserved) == (0, [], False)
    assert bm.num_free == 8
    bm.check([])


# -- prefix caching ----------------------------------------------------------------------------------
def test_register_match_acquire_and_cached_free_blocks():
    bm = BlockManager(10, 4, enable_prefix_caching=True)
    a = seq(0)
    bm.grow(a, 4)
    # 10 computed tokens = 2 full blocks; the hashes list covers 3 blocks
    bm.register_full_blocks(a, keys("p", 3), computed_tokens=10)
    assert a.shared_hashes == keys("p", 2)
    assert bm.match_prefix(keys("p", 3), 3) == 2                     # held by a: still a hit
    assert bm.match_prefix(keys("p", 3), 1) == 1                     # capped by max_blocks
    assert bm.match_prefix(keys("q", 3), 3) == 0
    bm.free(a)
    # freed hashed blocks stay cached and count as free; last block first (evicted first), as vLLM
    assert bm.num_free == 10 and list(bm._cached_free) == [("p", 1), ("p", 0)]
    assert bm.match_prefix(keys("p", 3), 3) == 2
    b = seq(1)
    bm.acquire_prefix(b, keys("p", 3), 2)
    assert b.blocks == 2 and b.shared_hashes == keys("p", 2)
    assert bm.num_free == 8 and len(bm._cached_free) == 0
    # a second holder shares the same physical blocks
    c = seq(2)
    bm.acquire_prefix(c, keys("p", 3), 1)
    assert bm.num_free == 8 and bm._refs[("p", 0)] == 2
    bm.check([b, c])
    bm.free(b)
    assert bm._refs[("p", 0)] == 1 and bm._refs[("p", 1)] == 0
    assert list(bm._cached_free) == [("p", 1)]
    bm.free(c)
    assert list(bm._cached_free) == [("p", 1), ("p", 0)]
    assert bm.num_free == 10
    bm.check([])


def test_register_stops_at_a_block_someone_else_computed():
    bm = BlockManager(10, 4, enable_prefix_caching=True)
    a, b = seq(0), seq(1)
    bm.grow(a, 2)
    bm.grow(b, 3)
    bm.register_full_blocks(a, keys("p", 2), 8)
    # b computed the same prefix concurrently: its duplicate stays private (vLLM keeps it too)
    bm.register_full_blocks(b, keys("p", 3), 12)
    assert b.shared_hashes == []
    assert bm.num_used == 5
    bm.check([a, b])


def test_eviction_is_least_recently_freed_first_and_only_when_plain_blocks_run_out():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a, b = seq(0), seq(1)
    bm.grow(a, 1)
    bm.grow(b, 1)
    bm.register_full_blocks(a, keys("a", 1), 4)
    bm.register_full_blocks(b, keys("b", 1), 4)
    bm.free(b)                                                        # freed first -> evicted first
    bm.free(a)
    assert list(bm._cached_free) == [("b", 0), ("a", 0)]
    c = seq(2)
    assert bm.grow(c, 2)                                             # the 2 plain free blocks
    assert len(bm._cached_free) == 2
    assert bm.grow(c, 3)                                             # evicts b's block
    assert bm.match_prefix(keys("b", 1), 1) == 0
    assert bm.match_prefix(keys("a", 1), 1) == 1
    assert bm.grow(c, 4)                                             # evicts a's block
    assert bm.match_prefix(keys("a", 1), 1) == 0
    assert bm.num_free == 0 and not bm._refs
    assert not bm.grow(c, 5)
    bm.check([c])


def test_a_freed_chain_is_evicted_from_its_tail_so_its_head_stays_matchable():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = seq(0)
    bm.grow(a, 3)
    bm.register_full_blocks(a, keys("p", 3), 12)
    bm.free(a)
    assert list(bm._cached_free) == [("p", 2), ("p", 1), ("p", 0)]
    c = seq(1)
    assert bm.grow(c, 2)                                             # plain block + evicts ("p", 2)
    assert bm.match_prefix(keys("p", 3), 3) == 2
    assert bm.grow(c, 3)                                             # evicts ("p", 1)
    assert bm.match_prefix(keys("p", 3), 3) == 1
    bm.check([c])


def test_acquiring_a_cached_block_protects_it_from_eviction():
    bm = BlockManager(3, 4, enable_prefix_caching=True)
    a = seq(0)
    bm.grow(a, 2)
    bm.register_full_blocks(a, keys("p", 2), 8)
    bm.free(a)
    b = seq(1)
    bm.acquire_prefix(b, keys("p", 2), 1)                             # ("p", 0) in use again
    c = seq(2)
    assert bm.grow(c, 2)                                             # plain block + evicts ("p", 1)
    assert bm.match_prefix(keys("p", 2), 2) == 1
    assert not bm.grow(c, 3)
    bm.check([b, c])


def test_check_detects_a_leak():
    bm = BlockManager(4, 4)
    a = seq(0)
    bm.grow(a, 2)
    a.blocks = 1                                                     # forget one block
    with pytest.raises(AssertionError):
        bm.check([a])


# -- random operation sequences -------------------------------------------------------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.sampled_from("abc"), st.integers(0, 6)),
        st.tuples(st.just("grow"), st.integers(0, 7), st.integers(0, 5)),
        st.tuples(st.just("register"), st.integers(0, 7)),
        st.tuples(st.just("shrink"), st.integers(0, 7), st.integers(0, 4)),
        st.tuples(st.just("free"), st.integers(0, 7)),
    ),
    max_size=60,
)


@settings(max_examples=examples(60), deadline=None)
@given(ops=OPS, num_blocks=st.integers(1, 12), prefix=st.booleans())
def test_random_operations_keep_invariants(ops, num_blocks, prefix):
    bs = 4
    bm = BlockManager(num_blocks, bs, enable_prefix_caching=prefix)
    live: list[tuple[Sequence, list]] = []
    n = 0
    for op in ops:
        if op[0] == "new":
            _, fam, length = op
            s, k = seq(n), keys(fam, length)
            n += 1
            if prefix:
                hit = bm.match_prefix(k, length)
                bm.acquire_prefix(s, k, hit)
                assert s.blocks == hit
            live.append((s, k))
        elif live:
            s, k = live[op[1] % len(live)]
            if op[0] == "grow":
                before_free, before = bm.num_free, s.blocks
                ok = bm.grow(s, s.blocks + op[2])
                assert ok == (op[2] <= before_free)
                assert s.blocks == (before + op[2] if ok else before)
                assert bm.num_free == (before_free - op[2] if ok else before_free)
            elif op[0] == "register" and prefix:
                bm.register_full_blocks(s, k, s.blocks * bs)
                assert len(s.shared_hashes) <= s.blocks
            elif op[0] == "shrink":
                before_free, before = bm.num_free, s.blocks
                bm.shrink(s, s.blocks - op[2])
                assert s.blocks >= len(s.shared_hashes)
                assert bm.num_free - before_free == before - s.blocks
            elif op[0] == "free":
                bm.free(s)
                live.remove((s, k))
        bm.check([s for s, _ in live])
        assert 0 <= bm.num_used <= bm.num_blocks
        assert sum(s.blocks for s, _ in live) >= bm.num_used     # shared blocks counted once in the pool
    for s, _ in live:
        bm.free(s)
    bm.check([])
    assert bm.num_free == bm.num_blocks and bm.num_used == 0
    assert not any(bm._refs.values())


# -- KV cache manager: generated blocks are hashed, a preempted request hits its own blocks --------------
def test_preempted_request_recomputes_from_its_own_cached_prompt_and_generated_blocks():
    from conftest import make_engine

    e = make_engine(num_blocks=8, block_size=4, prefix_caching=True)
    kv = e.kv
    s = Sequence(make_request("A", prompt=10, output=8, prefix_hashes=[11, 12, 13], hash_block_tokens=4), 0, 8)
    assert kv.start(s) == 0
    assert s.hash_keys == [11, 12]                      # the partial third prompt block is never matched
    assert kv.allocate_slots(s, 10)
    s.num_computed = 10
    kv.after_compute(s)
    assert s.shared_hashes == [11, 12]
    s.generated = 1
    for _ in range(4):                                  # decode 4 tokens: 14 computed, 3 full blocks
        assert kv.allocate_slots(s, 1)
        s.num_computed += 1
        kv.after_compute(s)
        s.generated += 1
    assert s.num_computed == 14 and s.blocks == 4
    assert s.shared_hashes == [11, 12, ("gen", "A", 2)]
    e.pool.check([s])
    # preemption by recompute: everything is freed, hashed blocks stay cached, last block first
    kv.free(s)
    s.num_computed, s.prefill_base, s.num_preemptions = 0, s.num_tokens, 1
    assert list(e.pool._cached_free) == [("gen", "A", 2), 12, 11]
    assert e.pool.num_free == 8
    # re-admission: prompt + generated = 15 tokens; (15 - 1) // 4 = 3 blocks may hit, all 3 are cached
    assert kv.start(s) == 12
    assert s.num_computed == 12 and s.blocks == 3 and s.prefix_hit_tokens == 0
    e.pool.check([s])
    # another request with the same prompt hashes hits the prompt blocks only, never A's generated one
    t = Sequence(make_request("B", prompt=16, output=2, prefix_hashes=[11, 12, 99, 98], hash_block_tokens=4), 1, 2)
    assert kv.start(t) == 8 and t.shared_hashes == [11, 12]
    e.pool.check([s, t])
