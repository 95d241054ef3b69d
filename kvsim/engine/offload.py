"""A CPU KV tier, as vLLM's native ``OffloadingConnector`` runs it (``--kv-offloading-size GIB``; vLLM 0.11+,
``vllm/v1/kv_offload`` and ``vllm/distributed/kv_transfer/kv_connector/v1/offloading_connector.py``).

Mechanism, one tier per instance (its size covers all of the instance's GPUs, as vLLM's ``cpu_bytes_to_use``):

- **Store.** Every newly computed full prompt block that the GPU prefix cache names by its hash is copied to
  host memory, device to host over the GPU's host link, submitted at the start of the next step (vLLM defers
  stores one step so they never hold up the step that produced the KV). A block already in the tier is only
  touched. When the tier is full the least recently used block whose copy is complete and that no load is
  reading is evicted (vLLM's default LRU policy); when none can go, the block is not stored. Only prompt
  blocks are stored (vLLM's ``offload_prompt_only``): a generated block's hash is unique to its request.
- **Load.** When a request is admitted, the GPU prefix cache is matched first; the blocks right after the GPU
  hits that the tier holds (consecutive, complete copies) are loaded back host to device instead of being
  recomputed. The request takes GPU blocks for them at once and waits, holding them, outside the running batch
  (vLLM's ``WAITING_FOR_REMOTE_KVS``) until the copy has landed; the blocks then join the GPU prefix cache under
  their hashes and the request goes back to the head of the queue, where its admission hits them. A block a
  load reads is protected from eviction until it is done.
- **Bytes.** A block moves ``block_size x bytes_per_token x tp`` bytes: the method's stored format, so an fp8
  cache moves half of a bf16 one. Methods that do not share prefixes (evicting or per-request compressed
  caches) never name blocks by hash, so the tier holds nothing for them.
- **Time.** Each direction of the host link is a port (``kvsim.engine.kvlink``) of ``tp`` lanes: transfers in
  one direction queue behind each other, the two directions run side by side.

Simplifications (docs/disaggregation.md): a block whose store has not completed is a miss (vLLM makes the
request retry until it is); the CPU block is the GPU block (vLLM may group several, ``block_size_factor``).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from kvsim.engine.kvlink import LinkLog, Port, book
from kvsim.engine.sequence import WAITING
from kvsim.specs.links import LinkSpec

GIB = 1 << 30


class CPUTier:
    def __init__(self, capacity_bytes: float, block_bytes: float, link: LinkSpec, lanes: int,
                 log: LinkLog | None = None, replica_id: int = 0):
        self.block_bytes = float(block_bytes)
        self.num_blocks = int(capacity_bytes // block_bytes) if block_bytes > 0 else 0
        self.link = link
        self.lanes = lanes
        self.d2h = Port("offload_d2h", link, lanes, log=log)
        self.h2d = Port("offload_h2d", link, lanes, log=log)
        #: hash -> time its stored copy is complete, least recently used first
        self._lru: OrderedDict = OrderedDict()
        #: hash -> time the load reading it ends (protected from eviction until then)
        self._reading: dict = {}
        #: hashes given a place in the tier, copied out at the next step boundary
        self._to_store: list = []
        #: (ready time, order, sequence): loads in flight
        self._loads: list = []
        self._order = 0
        self.now = 0.0
        self.scheduler = None
        #: (replica id, time) at which something this tier started lands (the SimPy layer wakes the replica then)
        self.wakeups: list = []
        self.replica_id = replica_id
        # totals
        self.stored_blocks = self.loaded_blocks = self.evicted_blocks = self.skipped_stores = 0
        self.stored_bytes = self.loaded_bytes = 0.0
        self.hit_tokens = 0

    # -- the replica's step boundary -----------------------------------------------------------------
    def before_schedule(self, now: float) -> None:
        self.now = now
        if self._to_store:
            self._copy_out(now)
        loads = self._loads
        if loads and loads[0][0] <= now:
            ready = []
            while loads and loads[0][0] <= now:
                ready.append(heapq.heappop(loads)[2])
            # the loaded blocks join the GPU prefix cache (named by their hashes, as vLLM caches them) and the
            # request goes back to the head of the queue, where it was, in admission order; it hits them there.
            # It does not keep holding them while it waits: a request ahead of it (a preempted one) could then
            # wait for blocks that only it could free
            waiting, kv = self.scheduler.waiting, self.scheduler.kv
            for seq in reversed(ready):
                seq.kv_pending = False
                kv.free(seq)
                seq.num_computed = 0
                seq.status = WAITING
                waiting.appendleft(seq)

    @property
    def busy(self) -> bool:
        return bool(self._loads)

    def unstick(self) -> bool:
        return False  # loaded requests hold nothing while they wait (see before_schedule)

    def holders(self) -> list:
        """Sequences holding blocks while their load is in flight (for the conservation checks)."""
        return [s for _, _, s in self._loads]

    # -- store ----------------------------------------------------------------------------------------
    def on_register(self, seq, index: int, h) -> None:
        """The GPU prefix cache named block ``index`` of ``seq`` by ``h`` (kvsim.engine.block_manager): a prompt
        block is given a place in the tier now (vLLM's ``prepare_store``) and copied at the next step boundary."""
        if index < seq.prompt_tokens // self._block_size:
            self._store(h, seq, self.now)

    def _store(self, h, seq, now: float) -> None:
        lru = self._lru
        if h in lru:
            lru.move_to_end(h)
            return
        if self.num_blocks <= 0:
            self.skipped_stores += 1
            return
        if len(lru) >= self.num_blocks and not self._evict_one(now):
            self.skipped_stores += 1
            return
        lru[h] = math.inf  # not loadable (nor evictable) until its copy is complete
        self._to_store.append(h)
        self.stored_blocks += 1
        self.stored_bytes += self.block_bytes
        seq.kv_offload_bytes += self.block_bytes

    def _copy_out(self, now: float) -> None:
        for h in self._to_store:
            b = book([self.d2h], now, self.block_bytes, self.link, self.lanes)
            if h in self._lru:
                self._lru[h] = b.ready_s
        self._to_store = []

    def _evict_one(self, now: float) -> bool:
        reading = self._reading
        for h, ready in self._lru.items():
            if ready <= now and reading.get(h, -1.0) <= now:
                del self._lru[h]
                reading.pop(h, None)
                self.evicted_blocks += 1
                return True
        return False

    # -- load -----------------------------------------------------------------------------------------
    def lookup(self, keys, start: int, max_blocks: int) -> int:
        """Blocks ``keys[start:]`` (up to ``max_blocks`` in all) whose complete copies the tier holds, in a row."""
        lru, now = self._lru, self.now
        m = 0
        for h in keys[start:max_blocks]:
            ready = lru.get(h)
            if ready is None or ready > now:
                break
            m += 1
        return m

    def load(self, seq, keys, start: int, m: int) -> None:
        """``seq`` took GPU blocks for ``keys[start:start+m]``: copy them in; it runs once they have landed."""
        now = self.now
        nbytes = m * self.block_bytes
        b = book([self.h2d], now, nbytes, self.link, self.lanes)
        for h in keys[start:start + m]:
            self._lru.move_to_end(h)
            if self._reading.get(h, -1.0) < b.sent_s:
                self._reading[h] = b.sent_s
        self.loaded_blocks += m
        self.loaded_bytes += nbytes
        seq.kv_onload_bytes += nbytes
        seq.kv_pending = True
        self._order += 1
        heapq.heappush(self._loads, (b.ready_s, self._order, seq))
        self.wakeups.append((self.replica_id, b.ready_s))

    _block_size = 16

    def bind(self, scheduler, block_size: int) -> None:
        self.scheduler = scheduler
        self._block_size = block_size

    def summary(self) -> dict:
        return {"cpu_blocks": self.num_blocks, "stored_blocks": self.stored_blocks, "loaded_blocks": self.loaded_blocks,
                "evicted_blocks": self.evicted_blocks, "skipped_stores": self.skipped_stores,
                "stored_bytes": self.stored_bytes, "loaded_bytes": self.loaded_bytes, "hit_tokens": self.hit_tokens}


def cpu_block_bytes(method, model, tp: int, block_size: int) -> float:
    """Bytes one block holds on the whole instance, in the method's stored format."""
    return block_size * method.bytes_per_token(model, tp) * tp


def attach_tier(replica, tier: CPUTier) -> CPUTier:
    """Give ``replica`` its CPU tier: admissions look it up, newly hashed prompt blocks are stored in it, and it
    moves loaded requests back into the queue at the replica's step boundaries."""
    kv = replica.kv
    kv.set_tier(tier)
    tier.bind(replica.scheduler, kv.block_size)
    replica.agents = (*replica.agents, tier)
    return tier


def make_tier(transfer, spec, tp: int, log: LinkLog | None, replica_id: int) -> CPUTier:
    from kvsim.specs.links import host_link, load_link

    link = load_link(transfer.kv_offload_link) if transfer.kv_offload_link else host_link(spec.hardware.name)
    if transfer.kv_offload_latency_us is not None:
        link = link.with_latency(transfer.kv_offload_latency_us * 1e-6)
    bb = cpu_block_bytes(spec.method, spec.model, tp, spec.config.block_size)
    return CPUTier(transfer.kv_offloading_size * GIB, bb, link, tp, log, replica_id)


__all__ = ["CPUTier", "attach_tier", "cpu_block_bytes", "make_tier"]
