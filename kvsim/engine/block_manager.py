"""Paged KV memory: which blocks a sequence holds (the mechanism; who runs is the scheduler's call).

Mirrors vLLM V1's ``BlockPool`` / ``KVCacheManager``: a fixed pool of equal blocks; with prefix caching,
full blocks are known by the chained hash of their tokens, freed hashed blocks stay cached (and count
as free) until evicted in least-recently-freed order (a freed sequence's blocks enter that order last
block first). Individual block ids are not tracked, only counts
and hashes, which is all the scheduler and the metrics need.

Invariants (tests/test_block_manager.py): ``0 <= num_free <= num_blocks``; the sum of blocks held by
live sequences plus free blocks equals ``num_blocks``; everything is free after all sequences finish.
"""

from __future__ import annotations

from collections import OrderedDict

from kvsim.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free_plain = num_blocks
        #: hash -> None for cached blocks nobody holds, least recently freed first (evicted first)
        self._cached_free: OrderedDict = OrderedDict()
        #: hash -> number of sequences holding that block (0 while it sits in _cached_free)
        self._refs: dict = {}
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0
        #: called as (seq, block index, hash) for each block newly named by its hash (the CPU KV tier stores
        #: it, kvsim.engine.offload); None: nobody listens
        self.on_register = None

    @property
    def num_free(self) -> int:
        return self._free_plain + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def used(self) -> int:
        """``num_used`` as a plain call (the replica reads it once per committed step)."""
        return self.num_blocks - self._free_plain - len(self._cached_free)

    def _take(self, n: int) -> None:
        plain = min(n, self._free_plain)
        self._free_plain -= plain
        for _ in range(n - plain):
            h, _ = self._cached_free.popitem(last=False)
            del self._refs[h]

    def grow(self, seq: Sequence, target_blocks: int) -> bool:
        """Give ``seq`` blocks until it holds ``target_blocks``; False (and no change) if too few are free."""
        n = target_blocks - seq.blocks
        if n <= 0:
            return True
        if n <= self._free_plain:
            self._free_plain -= n
        elif n > self._free_plain + len(self._cached_free):
            return False
        else:
            self._take(n)
        seq.blocks = target_blocks
        return True

    def shrink(self, seq: Sequence, target_blocks: int) -> None:
        """Return blocks the sequence no longer needs (eviction made its KV smaller). Private first."""
        n = seq.blocks - max(target_blocks, len(seq.shared_hashes))
        if n > 0:
            self._free_plain += n
            seq.blocks -= n

    def free(self, seq: Sequence) -> None:
        """Release everything ``seq`` holds (finish or preemption). Its hashed blocks join the cached-free
        queue last block first, as vLLM's ``free_blocks(reversed(blocks))``: the head of the chain, the part
        other requests (and the request itself after a preemption) can match, is evicted last."""
        private = seq.blocks - len(seq.shared_hashes)
        self._free_plain += private
        for h in reversed(seq.shared_hashes):
            r = self._refs[h] - 1
            self._refs[h] = r
            if r == 0:
                self._cached_free[h] = None
        seq.shared_hashes = []
        seq.blocks = 0
        seq.reserved = False

    # -- prefix caching ------------------------------------------------------------------------------
    def match_prefix(self, hash_keys, max_blocks: int) -> int:
        """Leading blocks of ``hash_keys`` present in the cache (held by someone or cached-free)."""
        n = 0
        refs = self._refs
        for h in hash_keys[:max_blocks]:
            if h not in refs:
                break
            n += 1
        return n

    def acquire_prefix(self, seq: Sequence, hash_keys, n: int) -> None:
        """``seq`` starts by holding the first ``n`` cached blocks (caller checked match_prefix)."""
        for h in hash_keys[:n]:
            r = self._refs[h]
            if r == 0:
                del self._cached_free[h]
            self._refs[h] = r + 1
        seq.shared_hashes = list(hash_keys[:n])
        seq.blocks = n

    def register_full_blocks(self, seq: Sequence, hash_keys, computed_tokens: int) -> None:
        """Name the sequence's newly computed full blocks by their hash (``hash_keys[i]`` names block i:
        prompt blocks, then the request's own keys for blocks holding generated tokens), so later requests,
        or this one after a preemption, can hit."""
        full = min(computed_tokens // self.block_size, len(hash_keys))
        held = len(seq.shared_hashes)
        for i in range(held, full):
            h = hash_keys[i]
            if h in self._refs:
                # computed twice concurrently (vLLM keeps the duplicate private too)
                break
            self._refs[h] = 1
            seq.shared_hashes.append(h)
            if self.on_register is not None:
                self.on_register(seq, i, h)

    def check(self, live) -> None:
        """Assert the conservation invariants (used by tests and --check runs)."""
        held = sum(s.blocks for s in live)
        shared_refs = {}
        for s in live:
            for h in s.shared_hashes:
                shared_refs[h] = shared_refs.get(h, 0) + 1
        distinct_shared = len(shared_refs)
        duplicate = sum(c - 1 for c in shared_refs.values())
        assert 0 <= self.num_free <= self.num_blocks, (self.num_free, self.num_blocks)
        assert held - duplicate + self.num_free == self.num_blocks, (held, duplicate, self.num_free, self.num_blocks)
        for h, c in shared_refs.items():
            assert self._refs[h] == c, (h, self._refs[h], c)
        assert distinct_shared + len(self._cached_free) == len(self._refs)
