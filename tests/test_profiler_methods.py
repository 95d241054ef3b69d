"""One method registry for the simulator and the profiler: kvprof parses every method with kvsim's
registry, and what it declares it runs (profiler.methods, one module per method) agrees with that
registry; the profiler's runners hold no method-specific branches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

from kvsim.errors import ConfigError  # noqa: E402
from kvsim.methods import all_methods, parse_method  # noqa: E402
from profiler.methods import TOOLS, MethodSupport, all_supported, declared, parse, parse_list, supported  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_every_declared_method_knob_and_implementation_is_kvsims():
    registry = all_methods()
    for name, d in declared().items():
        assert name in registry, f"profiler.methods.{name}: kvsim has no method {name!r}"
        cls = registry[name]
        if d["impl"] is None:
            assert "impl" not in cls.knobs(), f"{name}: kvsim has implementations; say which one the profiler runs"
        else:
            assert d["impl"] in cls.IMPLEMENTATIONS, f"{name}: impl={d['impl']!r} is not one of kvsim's"
        assert set(d["tools"]) <= set(TOOLS) and d["tools"], name
        for knob, values in d["knob_values"].items():
            assert knob in cls.knobs(), f"{name}: {knob!r} is not a kvsim knob"
            for v in values:  # every value the profiler says it runs is one kvsim accepts
                parse_method({"name": name, knob: v})


def test_each_tool_has_the_code_it_declares():
    for name, sup in all_supported().items():
        if "replay" in sup.tools:
            assert sup.store is not None, f"{name}: declared for kvprof replay without a store"
        if "lengths" in sup.tools and name != "none":
            assert type(sup).exact_context is not MethodSupport.exact_context, name
            assert type(sup).after_step is not MethodSupport.after_step, name
    assert supported("kernels") == supported("replay") == supported("lengths") == sorted(all_supported())


def test_parsing_uses_kvsims_defaults_and_fills_the_profilers_implementation():
    for name in supported("kernels"):
        m = parse(name, "kernels")
        default = all_methods()[name]()
        assert m.algorithm_spec() == default.algorithm_spec()  # kvsim's knob defaults, not a copy
        assert getattr(m, "impl", None) == all_supported()[name].impl
    assert [m.name for m in parse_list("none,kivi:bits=4,h2o:budget=64,window=16", "replay")] == ["none", "kivi", "h2o"]


def test_what_the_profiler_cannot_run_is_refused_by_name():
    with pytest.raises(ConfigError, match="cannot run method 'gear'.*it runs: .*kivi"):
        parse("gear", "kernels")
    with pytest.raises(ConfigError, match="runs kivi as impl=reference.*asks for impl=lmdeploy"):
        parse("kivi:impl=lmdeploy", "replay")
    with pytest.raises(ConfigError, match="bits"):  # kvsim's own validation: KIVI's kernels pack 2 or 4 bits
        parse("kivi:bits=8", "kernels")
    with pytest.raises(ConfigError, match="kernel_size=6: must be odd"):
        parse("snapkv:kernel_size=6", "lengths")
    with pytest.raises(ConfigError, match="unknown knob"):
        parse("h2o:budjet=3", "lengths")


def test_the_runners_have_no_method_specific_branches():
    """Adding a method is a module in kvsim/methods/ and one in profiler/methods/: the kernel grid, the
    replay engine and stores and the length measurement dispatch through the registry, never on a name
    (``none``, the full-cache reference of kvprof lengths, aside)."""
    names = "|".join(sorted(n for n in all_methods() if n != "none"))
    pat = re.compile(rf"""(\.name\s*(==|!=|in)\s*\(?["']({names})["'])|["']({names})["']\s*:""")
    offenders = []
    for p in (REPO / "profiler").rglob("*.py"):
        if "methods" in p.relative_to(REPO / "profiler").parts[:1]:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pat.search(line):
                offenders.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
