"""What a compression method's KV costs in blocks (mechanism, as vLLM V1's ``kv_cache_manager.py``).

The scheduler asks ``allocate_slots(seq, n)`` before giving a sequence ``n`` new tokens; this class
turns the method's kept-token count into blocks of the pool. A block holds ``block_size`` kept tokens
in the method's storage format, so a method with fewer bytes per token gets more blocks from the same
memory. Methods that cannot use paged blocks reserve their whole lifetime footprint contiguously at
admission, as their reference implementations do.
"""

from __future__ import annotations

from kvsim.engine.block_manager import BlockManager
from kvsim.engine.sequence import Sequence
from kvsim.methods.base import Method
from kvsim.specs.model import ModelSpec


def num_blocks_for_bytes(capacity_bytes: float, block_size: int, method: Method, model: ModelSpec, tp: int) -> int:
    return max(0, int(capacity_bytes // (block_size * method.bytes_per_token(model, tp))))


class KVCacheManager:
    def __init__(self, pool: BlockManager, method: Method, model: ModelSpec, tp: int):
        self.pool = pool
        self.method = method
        #: tokens per block
        self.block_size = pool.block_size
        #: bytes of one kept token, a sequence's fixed extra (e.g. KIVI's full-precision tail), and one
        #: token in the full cache: what KV bytes held / saved are counted in (kvsim.engine.replica)
        self.bytes_per_token = method.bytes_per_token(model, tp)
        self.extra_bytes_per_seq = method.extra_bytes_per_seq(model, tp)
        self.full_bytes_per_token = model.kv_bytes_per_token(tensor_parallel_size=tp)
        block_bytes = self.block_size * self.bytes_per_token
        extra = self.extra_bytes_per_seq
        #: blocks each sequence needs beyond its kept tokens (e.g. KIVI's full-precision tail)
        self.extra_blocks = int(-(-extra // block_bytes)) if extra > 0 else 0
        self.paged = method.paged
        self.prefix_sharing = pool.enable_prefix_caching and method.shares_prefix
        #: the method keeps every token (the full cache): the scheduler and replica skip the method call
        self.keeps_all = type(method).kept_tokens is Method.kept_tokens
        #: give ``seq`` blocks until it holds ``target`` (False, and no change, when too few are free):
        #: the pool's own method, for the replica's fast-forward commit
        self.grow_to = pool.grow
        #: blocks in use now, as a call (the replica's commit reads it every step)
        self.used_blocks = pool.used
        #: blocks of generated tokens are hashed too (block i holds tokens i*bs..: only when every token is kept)
        self.hash_generated = self.prefix_sharing and self.keeps_all
        #: the CPU KV tier (kvsim.engine.offload.CPUTier) prefix hits may load from; None: no tier
        self.tier = None

    # -- capacity (what the scheduler, the replica and the metrics may read) -------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks free now (cached prefix blocks nobody holds count as free: they are evicted on demand)."""
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def set_tier(self, tier) -> None:
        """Attach a CPU KV tier: prefix hits may load from it, and every block newly named by its hash is
        offered to it (kvsim.engine.offload)."""
        self.tier = tier
        self.pool.on_register = tier.on_register

    def check(self, live) -> None:
        """Assert the pool's conservation invariants for the live sequences (tests and --check runs)."""
        self.pool.check(live)
        assert self.pool.num_used <= self.pool.num_blocks

    def blocks_for(self, seq: Sequence, computed_tokens: int) -> int:
        kept = computed_tokens if self.keeps_all else self.method.kept_tokens(seq.prefill_base, computed_tokens)
        return -(-kept // self.block_size) + self.extra_blocks

    def lifetime_blocks(self, prefill_base: int, final_context: int) -> int:
        """Most blocks a sequence ever holds: all of its prompt during prefill, then what the method keeps."""
        kept = max(prefill_base, self.method.kept_tokens(prefill_base, final_context))
        return -(-kept // self.block_size) + self.extra_blocks

    def reservation(self, seq: Sequence) -> int:
        # the last sampled token's KV is never computed
        return self.lifetime_blocks(seq.prefill_base, seq.prompt_tokens + seq.output_tokens - 1)

    def can_ever_fit(self, seq: Sequence) -> bool:
        return self.reservation(seq) <= self.pool.num_blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        if self.paged:
            c = seq.num_computed + num_new_tokens
            kept = c if self.keeps_all else self.method.kept_tokens(seq.prefill_base, c)
            target = -(-kept // self.block_size) + self.extra_blocks
        elif seq.reserved:
            return True
        else:
            target = self.reservation(seq)
        if target <= seq.blocks:
            return True
        if not self.pool.grow(seq, target):
            return False
        seq.reserved = not self.paged
        return True

    def after_compute(self, seq: Sequence) -> None:
        """The step computed the sequence's new tokens: give back what eviction dropped."""
        if self.paged and not self.keeps_all:
            target = self.blocks_for(seq, seq.num_computed)
            if target < seq.blocks:
                self.pool.shrink(seq, target)
        if self.prefix_sharing and seq.hash_keys is not None:
            self.register_computed(seq)

    def register_computed(self, seq: Sequence) -> None:
        """Hash the sequence's full computed blocks: prompt blocks by the trace's prefix hashes, blocks
        holding generated tokens by keys unique to the request (``("gen", request_id, block_index)``,
        chained after the prompt's), as vLLM V1 hashes every full block. A preempted request that
        recomputes prompt + generated tokens then hits its own blocks while they are still cached."""
        full = seq.num_computed // self.block_size
        if full <= len(seq.shared_hashes):
            return
        keys = seq.hash_keys
        if self.hash_generated:
            self._extend_keys(seq, full)
        elif not keys:
            return
        self.pool.register_full_blocks(seq, keys, seq.num_computed)

    def _extend_keys(self, seq: Sequence, n: int) -> None:
        keys = seq.hash_keys
        if len(keys) < n:
            rid = seq.req.request_id
            keys.extend(("gen", rid, i) for i in range(len(keys), n))

    def start(self, seq: Sequence) -> int:
        """A sequence is (re)admitted: reuse cached prefix blocks. Returns the hit tokens."""
        if not self.prefix_sharing or seq.num_computed or not seq.req.prefix_hashes:
            return 0
        if seq.hash_keys is None:
            keys = expand_hashes(seq.req.prefix_hashes, seq.req.hash_block_tokens, self.block_size)
            if self.hash_generated:
                # a partial last prompt block is never matched; past the full prompt blocks a block
                # holds generated tokens too and is named by the request's own keys
                del keys[seq.prompt_tokens // self.block_size:]
            seq.hash_keys = keys
        # vLLM always recomputes at least the last prompt token (after a preemption: of prompt + generated)
        max_blocks = (seq.prefill_base - 1) // self.block_size
        if self.hash_generated:
            self._extend_keys(seq, max_blocks)
        n = self.pool.match_prefix(seq.hash_keys, max_blocks)
        if n:
            self.pool.acquire_prefix(seq, seq.hash_keys, n)
            seq.num_computed = n * self.block_size
        if seq.num_preemptions == 0 and not seq.cpu_hit_tokens:
            seq.prefix_hit_tokens = n * self.block_size
        if self.tier is not None:
            # the blocks after the GPU hits that the CPU tier holds are loaded instead of recomputed
            m = self.tier.lookup(seq.hash_keys, n, max_blocks)
            if m and self.pool.grow(seq, n + m):
                self.pool.register_full_blocks(seq, seq.hash_keys, (n + m) * self.block_size)
                seq.num_computed = (n + m) * self.block_size
                if seq.num_preemptions == 0:
                    # a request can load more than once before it runs (its loaded blocks were evicted from the
                    # GPU while it waited, or its admission failed): it is credited the prompt it did not recompute
                    cpu = max(seq.cpu_hit_tokens, (n + m) * self.block_size - seq.prefix_hit_tokens)
                    self.tier.hit_tokens += cpu - seq.cpu_hit_tokens
                    seq.cpu_hit_tokens = cpu
                self.tier.load(seq, seq.hash_keys, n, m)
                return (n + m) * self.block_size
        return n * self.block_size

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq)


def expand_hashes(hashes, hash_block_tokens: int, block_size: int):
    """Hashes per engine block. A source hash covering several engine blocks (Mooncake: 512 tokens)
    names each of them by (hash, position); a block smaller than the engine's cannot be used."""
    if hash_block_tokens == block_size:
        return list(hashes)
    if hash_block_tokens % block_size == 0:
        k = hash_block_tokens // block_size
        return [(h, j) for h in hashes for j in range(k)]
    if block_size % hash_block_tokens == 0:
        k = block_size // hash_block_tokens
        # an engine block is named by the chained hash of its last source block
        return [hashes[i + k - 1] for i in range(0, len(hashes) - k + 1, k)]
    return []
