"""The profiler's side of the one method registry.

kvsim's registry (:mod:`kvsim.methods`) defines every method: its knobs, their defaults and validation,
its implementations. kvprof parses every method spec with it, then checks the setting against what its
own torch code runs: one module here per method it can run (as kvsim/methods/ has one per method), each
a :class:`~profiler.methods.base.MethodSupport` that declares the kvprof tools running it (``kernels``,
``replay``, ``lengths``), the kvsim implementation its code computes, any knob values narrower than
kvsim's, and holds the method's kernel benches, physical cache (kvprof replay) and length-measurement
cache logic. Adding a method is one module in kvsim/methods/ and, to profile it, one module here;
tests/test_profiler_methods.py checks these declarations against kvsim's registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from kvsim.errors import ConfigError
from profiler.methods.base import MethodSupport

#: the kvprof tools a method module can serve
TOOLS = MethodSupport.tools

_SUPPORT: dict[str, MethodSupport] = {}


def all_supported() -> dict[str, MethodSupport]:
    """Method name -> its support, for every module in this package (found, not listed)."""
    if not _SUPPORT:
        found: dict[str, MethodSupport] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base":
                continue
            mod = importlib.import_module(f"{__name__}.{info.name}")
            for obj in vars(mod).values():
                if (isinstance(obj, type) and issubclass(obj, MethodSupport) and obj.name
                        and obj.__module__ == mod.__name__):
                    if obj.name in found:
                        raise ImportError(f"profiler support for {obj.name!r} defined twice")
                    found[obj.name] = obj()
        _SUPPORT.update(dict(sorted(found.items())))
    return dict(_SUPPORT)


def supported(tool: str) -> list[str]:
    """The methods ``tool`` runs, in name order."""
    return [n for n, s in all_supported().items() if tool in s.tools]


def support(name: str, tool: str | None = None) -> MethodSupport:
    sup = all_supported().get(name)
    if sup is None or (tool is not None and tool not in sup.tools):
        runs = supported(tool) if tool else list(all_supported())
        what = f"kvprof {tool}" if tool else "kvprof"
        raise ConfigError(f"{what} cannot run method {name!r} (kvsim models it; the profiler has no torch code "
                          f"for it); it runs: {', '.join(runs)}")
    return sup


def declared() -> dict[str, dict]:
    """What the profiler declares it runs: {method: {"impl", "tools", "knob_values", "knob_rules"}}."""
    return {n: {"impl": s.impl, "tools": list(s.tools), "knob_values": {k: list(v) for k, v in s.knob_values.items()},
                "knob_rules": list(s.knob_rules)} for n, s in all_supported().items()}


def implementation(name: str) -> str | None:
    """The kvsim implementation the profiler's code for ``name`` computes (None: no impl knob)."""
    return support(name).impl


def parse(spec, tool: str, named_impl: bool | None = None):
    """A method spec (text, mapping or Method) parsed by kvsim's registry and checked against what ``tool``
    runs. A spec that names no ``impl`` gets the profiler's; one that names another is refused (kvprof
    would not run what kvsim is asked to cost). ``named_impl``: for a Method, whether its impl was asked
    for (default: yes)."""
    import dataclasses

    from kvsim.methods import Method, parse_method

    text = spec.spec_string() if isinstance(spec, Method) else str(spec)
    m = parse_method(spec)
    sup = support(m.name, tool)
    why = sup.check(m)
    if why:
        raise ConfigError(f"kvprof {tool}: method {m.name}: {why}")
    have = getattr(m, "impl", None)
    if sup.impl is None or have == sup.impl:
        return m
    if isinstance(spec, Method):
        named = named_impl is not False
    else:
        named = "impl=" in text or (isinstance(spec, dict) and "impl" in spec)
    if named:
        raise ConfigError(f"kvprof {tool} runs {m.name} as impl={sup.impl} (the paper's algorithm in torch); the "
                          f"spec asks for impl={have}")
    return dataclasses.replace(m, impl=sup.impl)


def parse_list(text: str, tool: str) -> list:
    """Comma-separated specs (kvsim's list syntax), each checked as :func:`parse` does."""
    from kvsim.methods import split_method_list

    return [parse(s, tool) for s in split_method_list(text)]


__all__ = ["TOOLS", "MethodSupport", "all_supported", "declared", "implementation", "parse", "parse_list",
           "support", "supported"]
