"""``kvsim methods``: every registered method with its knobs, runtime needs, memory layout and paper."""

from __future__ import annotations

import inspect
from dataclasses import replace

from kvsim.errors import KvsimError
from kvsim.methods import all_methods
from kvsim.methods.base import Method


def _summary(cls: type[Method]) -> str:
    doc = inspect.getdoc(cls) or ""
    first = doc.split("\n\n", 1)[0]
    return " ".join(first.split())


def _knobs(cls: type[Method]) -> str:
    knobs = cls.knobs()
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) if knobs else "(none)"


def format_methods() -> str:
    """Plain-text listing, one block per method, in name order."""
    methods = all_methods()
    lines = [f"{len(methods)} methods. Spec: NAME or NAME:knob=value,... (e.g. h2o:budget=512,window=32); "
             "the knobs below are the defaults.", ""]
    for name, cls in methods.items():
        default = cls()
        lines += [
            f"{name}",
            f"  {_summary(cls)}",
            f"  knobs:          {_knobs(cls)}",
            f"  default spec:   {default.spec_string()}",
            f"  runtime needs:  {cls.runtime_needs}",
            f"  memory:         {_memory(default)}",
            f"  prefill:        {'FlashAttention (no score matrix)' if default.prefill_attention == 'flash' else 'eager (materialised scores)'}",
            f"  prefix sharing: {'yes' if default.shares_prefix else 'no'}",
            f"  output length:  {_length(default)}",
            f"  paper:          {cls.paper}",
        ]
        lines += _implementations(cls, default)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _memory(m: Method) -> str:
    return "paged (vLLM blocks)" if m.paged else "contiguous per request (reserved at admission)"


def _implementations(cls: type[Method], default: Method) -> list[str]:
    """One line per implementation: basis, engine, where its terms come from, and the fitted values."""
    if not cls.IMPLEMENTATIONS:
        return [f"  costs:          {default.implementation().basis}: {default.implementation().source}"]
    out = ["  implementations (impl=..., the first is the default):"]
    for impl in cls.IMPLEMENTATIONS.values():
        m = replace(default, impl=impl.name)
        layout = (f"{'paged' if m.paged else 'contiguous per request'}, "
                  f"{'FlashAttention' if m.prefill_attention == 'flash' else 'eager'} prefill")
        out.append(f"    impl={impl.name} [{impl.basis}] ({layout}) {impl.engine}")
        out.append(f"      source: {impl.source}")
        if impl.terms_key or impl.borrows:
            try:
                terms = impl.terms()
            except KvsimError as e:
                terms = {"unavailable": str(e)}
            out.append("      terms:  " + ", ".join(f"{k}={_num(v)}" for k, v in terms.items()))
    return out


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _length(m: Method) -> str:
    r = m.default_length_ratio()
    if r.sigma == 0.0 and r.mean_ratio == 1.0:
        return "x1.00 by default (" + r.source.split(";")[0] + ")"
    return f"mean x{r.mean_ratio:.2f}, log-sigma {r.sigma:.2f} (lognormal) by default; from {r.source.split(': ')[0]}"


__all__ = ["format_methods"]
