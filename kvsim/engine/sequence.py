"""Per-request engine state, in vLLM V1's terms: ``num_tokens`` (prompt + generated so far) and
``num_computed`` (tokens whose KV is in the cache). A step gives a request ``num_tokens - num_computed``
new tokens at most; when it catches up, the request samples one more token."""

from __future__ import annotations

from kvsim.workload.request import Request

WAITING, RUNNING, FINISHED = 0, 1, 2


class Sequence:
    __slots__ = (
        "req", "index", "prompt_tokens", "output_tokens", "generated", "num_computed", "prefill_base",
        "blocks", "shared_hashes", "reserved", "arrival_s", "first_token_s", "last_token_s",
        "num_preemptions", "prefix_hit_tokens", "status", "hash_keys", "replica",
        # KV moved beyond the GPU (kvsim.engine.disagg, kvsim.engine.offload); untouched by co-located runs
        "kv_received", "kv_pending", "xfer", "kv_offload_bytes", "kv_onload_bytes", "cpu_hit_tokens",
    )

    def __init__(self, req: Request, index: int, output_tokens: int):
        self.req = req
        #: arrival order, the tie-breaker everywhere (newest = largest)
        self.index = index
        self.prompt_tokens = req.prompt_tokens
        #: output length this run generates (the trace's, times the method's sampled length ratio)
        self.output_tokens = output_tokens
        self.generated = 0
        self.num_computed = 0
        #: tokens that were prompt for the current (re)admission: the prompt, or prompt + generated
        #: after a preemption by recompute; methods treat it as the prompt
        self.prefill_base = req.prompt_tokens
        # -- the KV cache manager's state of this sequence (kvsim.engine.kv_cache_manager and block_manager
        # write it, nothing else does: tests/test_layers.py; it lives here, not in a table of the manager,
        # because the scheduler's and the replica's hot loops read ``blocks`` for every sequence of a step)
        #: KV blocks held (shared prefix blocks included)
        self.blocks = 0
        self.shared_hashes: list = []
        #: non-paged method: the contiguous reservation has been made
        self.reserved = False
        #: prefix-cache keys of the sequence's blocks (None until it is first admitted with prefix caching)
        self.hash_keys = None
        self.arrival_s = req.arrival_time_s
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.status = WAITING
        self.replica = -1
        #: the prompt's KV came from a prefill instance: the first step here recomputes the last prompt
        #: token to sample the first output token, a decode over the received cache (vLLM's P/D)
        self.kv_received = False
        #: holds blocks while a transfer into them is in flight (not in the scheduler's queues meanwhile)
        self.kv_pending = False
        #: the P/D transfer record (kvsim.engine.disagg.Transfer), shared by the prefill- and decode-side sequences
        self.xfer = None
        self.kv_offload_bytes = 0.0
        self.kv_onload_bytes = 0.0
        self.cpu_hit_tokens = 0

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def in_decode(self) -> bool:
        # not the last one-token chunk of a recompute (num_computed < prefill_base): that ends a prefill
        return self.num_computed >= self.prefill_base and self.num_computed + 1 == self.num_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.req.request_id!r}, computed={self.num_computed}/{self.num_tokens}, "
                f"gen={self.generated}/{self.output_tokens}, blocks={self.blocks})")
