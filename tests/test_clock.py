"""The SimPy contract kvsim relies on: kvsim.engine.clock is the one place that touches SimPy's internals,
and pyproject.toml pins simpy to the range checked here (SIMPY_TESTED); a new SimPy release is taken by
widening that range once these pass on it."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import simpy

from kvsim.engine.clock import NORMAL, SIMPY_TESTED, URGENT, Clock

REPO = Path(__file__).resolve().parents[1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2])


def test_installed_simpy_is_in_the_tested_range_and_pyproject_pins_it():
    lo, hi = SIMPY_TESTED
    assert lo <= _version(simpy.__version__) < hi
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("simpy")]
    assert pin.split(";")[0].strip() == f"simpy>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"


def test_events_land_exactly_on_absolute_times():
    """SimPy only takes delays, and ``now + (t - now)`` need not equal t (found: a 45-step stretch woke one
    ulp early)."""
    env = Clock()
    now, t = 0.026336564776119405, 0.12137999928358222
    assert all(now + d != t for d in (t - now, math.nextafter(t - now, 1), math.nextafter(t - now, 0)))
    seen = []

    def proc():
        yield env.at(now)
        yield env.at(t, NORMAL)
        seen.append(env.now)
        yield env.at(0.0)  # in the past: now
        seen.append(env.now)

    env.process(proc())
    env.run()
    assert seen == [t, t]


def test_urgent_events_run_before_normal_ones_at_the_same_time():
    env = Clock()
    order = []

    def waiter(name, priority):
        yield env.at(1.0, priority)
        order.append(name)

    env.process(waiter("normal", NORMAL))
    env.process(waiter("urgent", URGENT))
    env.run()
    assert order == ["urgent", "normal"]


def test_a_waiting_process_can_be_moved_to_another_time():
    """What a fast-forward stretch cut short by an arrival needs: the replica's process waits for the new
    end instead, no exception thrown into it, the old event left with nobody waiting."""
    env = Clock()
    woke = []

    def replica():
        yield env.at(10.0, NORMAL)
        woke.append(env.now)

    def arrival(p):
        yield env.at(2.0)
        env.wait_instead(p, 4.5, NORMAL)

    p = env.process(replica())
    env.process(arrival(p))
    env.run()
    assert woke == [4.5]
