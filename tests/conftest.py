"""Shared factories for the engine tests: requests, a tiny model, a hand-computable cost model, and a
single replica (scheduler + KV cache manager + block manager) built without SimPy.

The fake cost model uses dyadic constants (powers of two), so every step time and every clock value a
small scenario reaches is exactly representable: the tests can write the expected event log as exact
fractions and compare with ``==``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import pytest

from kvsim.config import EngineConfig
from kvsim.cost.base import CostModel, StepShape
from kvsim.build import make_replica
from kvsim.engine.block_manager import BlockManager
from kvsim.engine.cluster import make_router
from kvsim.engine.kv_cache_manager import KVCacheManager
from kvsim.engine.output_length import LengthSampler
from kvsim.engine.replica import Replica
from kvsim.engine.scheduler import Scheduler
from kvsim.engine.sequence import Sequence
from kvsim.engine.sim import Simulation
from kvsim.methods import parse_method
from kvsim.methods.base import LengthRatio
from kvsim.metrics.collector import Recorder
from kvsim.specs.model import ModelSpec
from kvsim.workload.request import Request


def examples(n: int) -> int:
    """Hypothesis example count: ``n`` by default (the suite stays fast), scaled by the environment variable
    KVSIM_HYPOTHESIS_SCALE for a longer bug hunt (e.g. KVSIM_HYPOTHESIS_SCALE=30)."""
    return max(1, int(n * float(os.environ.get("KVSIM_HYPOTHESIS_SCALE", "1"))))


#: a small dense model: 2 layers, GQA 4/2 heads of 16, bf16 -> 2 x 2 x 2 x 16 x 2 = 256 KV bytes per token
TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=256, dtype="bfloat16", max_position_embeddings=4096)


def make_request(rid, arrival: float = 0.0, prompt: int = 16, output: int = 4, prefix_hashes=None,
                 hash_block_tokens: int = 16) -> Request:
    return Request(str(rid), float(arrival), prompt, output,
                   tuple(prefix_hashes) if prefix_hashes is not None else None, hash_block_tokens)


class FakeCost(CostModel):
    """step_time = A + B x (new tokens) + C x (decode KV tokens attended), exactly, in float.

    With A = 1/64 s, B = 1/1024 s and C = 1/16384 s, every sum of a few hundred step times is exact.
    """

    name = "fake"
    A = 2.0 ** -6
    B = 2.0 ** -10
    C = 2.0 ** -14

    def __init__(self):
        self.calls: list[StepShape] = []

    def step_time_s(self, shape: StepShape) -> float:
        self.calls.append(StepShape(shape.num_decode_seqs, shape.decode_kept_tokens, list(shape.prefill_chunks),
                                    shape.decode_max_kept))
        return self.A + self.B * shape.num_tokens + self.C * shape.decode_kept_tokens

    # the exact same value as rationals, for hand-computed expectations
    @classmethod
    def exact(cls, num_tokens: int, decode_kept: int = 0) -> Fraction:
        return Fraction(1, 64) + Fraction(num_tokens, 1024) + Fraction(decode_kept, 16384)


@dataclass
class Engine:
    """One replica and its parts, no SimPy."""

    pool: BlockManager
    kv: KVCacheManager
    sched: Scheduler
    replica: Replica
    rec: Recorder
    cost: CostModel

    def add(self, *reqs: Request) -> list[Sequence]:
        seqs = []
        for r in reqs:
            s = Sequence(r, self._next_index, r.output_tokens)
            self._next_index += 1
            reason = self.replica.add(s)
            assert reason is None, reason
            seqs.append(s)
        return seqs

    _next_index: int = 0

    def live(self) -> list[Sequence]:
        return list(self.sched.running) + list(self.sched.waiting)

    def check(self) -> None:
        self.pool.check(self.live())
        assert 0 <= self.pool.num_used <= self.pool.num_blocks


def make_engine(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                chunked: bool = True, prefill_first: bool = False, method="none", prefix_caching: bool = False,
                cost: CostModel | None = None, fast_forward: bool = False, max_model_len: int = 4096,
                replica_id: int = 0, recorder: Recorder | None = None) -> Engine:
    """One replica as the run builder makes it (kvsim.build.make_replica), with these options."""
    cfg = EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       enable_chunked_prefill=chunked, scheduler="prefill-first" if prefill_first else "chunked",
                       enable_prefix_caching=prefix_caching, max_model_len=max_model_len)
    rec = recorder or Recorder(keep_rows=True)
    cost = cost or FakeCost()
    rep = make_replica(replica_id, TINY, parse_method(method), cfg, num_blocks, cost, [rec], fast_forward)
    return Engine(rep.kv.pool, rep.kv, rep.scheduler, rep, rec, cost)


def run_sim(engines: list[Engine], requests, router: str = "round-robin", check_invariants: bool = True):
    """Run the SimPy layer over hand-built replicas (e.g. with FakeCost); returns (sim, end time)."""
    rec = engines[0].rec
    sim = Simulation([e.replica for e in engines], make_router(router), [rec],
                     LengthSampler(LengthRatio(source="test"), 0), check_invariants)
    end = sim.run(list(requests))
    return sim, end


def small_config(**kw) -> EngineConfig:
    base = dict(num_gpu_blocks_override=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                max_model_len=1024, enable_prefix_caching=False)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture
def tiny_model() -> ModelSpec:
    return TINY


@pytest.fixture
def fake_cost() -> FakeCost:
    return FakeCost()
