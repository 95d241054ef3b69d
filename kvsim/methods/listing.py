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


def format_methods(model: str | None = None, lengths: str = "auto") -> str:
    """Plain-text listing, one block per method, in name order, then the measured output lengths. With
    ``model``: the output-length source a replay of that model uses for each method's default setting."""
    from kvsim.engine.output_length import choose_length_ratio

    methods = all_methods()
    lines = [f"{len(methods)} methods. Spec: NAME or NAME:knob=value,... (e.g. h2o:budget=512,window=32); "
             "the knobs below are the defaults.", ""]
    mspec = None
    if model is not None:
        from kvsim.specs.model import load_model

        mspec = load_model(model)
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
        ]
        if mspec is not None:
            r = choose_length_ratio(mspec.name, default, None, lengths)
            lines.append(f"  for {mspec.name}: {_describe(r)}")
        lines.append(f"  paper:          {cls.paper}")
        lines += _implementations(cls, default)
        lines.append("")
    lines += _measured_section()
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
        return "x1.00, published default (" + r.source.split(";")[0] + ")"
    return (f"published default: mean x{r.mean_ratio:.2f}, log-sigma {r.sigma:.2f} (lognormal), "
            f"from {r.source.split(': ')[0]}")


def _describe(r) -> str:
    import numpy as np

    if r.kind == "measured":
        x = np.asarray(r.samples)
        return (f"measured on {r.measured_on}: mean x{x.mean():.2f}, p99 x{np.percentile(x, 99):.2f}, "
                f"max x{x.max():.2f} ({r.source})")
    if r.kind == "unchanged":
        return f"unchanged, x1.00 ({r.source.split(';')[0]})"
    return f"published default, mean x{r.mean_ratio:.2f} (lognormal, log-sigma {r.sigma:.2f})"


def _measured_section() -> list[str]:
    """The committed kvprof lengths measurements and when a replay applies them."""
    import numpy as np

    from kvsim.cost.profiled import length_profiles

    import os

    from kvsim.engine.output_length import model_key

    out = []
    for path, prof in length_profiles():
        rel = os.path.relpath(path)
        shown = rel if not rel.startswith("..") else str(path)
        out.append(f"Measured output lengths, {path.name} (kvprof lengths on {prof.model}); a replay applies them to "
                   f"{model_key(prof.model)} (same family and size) or, asked with --lengths {shown}, to any model:")
        for spec, entry in sorted((prof.lengths or {}).items()):
            x = np.asarray(entry.get("ratios") or [1.0])
            out.append(f"  {spec:<48} n {len(x):>4}  mean x{x.mean():.2f}  p99 x{np.percentile(x, 99):.2f}  "
                       f"max x{x.max():.2f}  over x2: {int((x > 2).sum())}  over x5: {int((x > 5).sum())}")
        out += ["  (the tail comes from a 135M model's repetition loops against short full-cache answers: "
                "docs/lengths.md)", ""]
    out.append("Every compressed length is cut at the request's max_tokens (when the trace has it) and at "
               "max_model_len - prompt; summary.json counts the cut ones (num_output_length_capped).")
    return out


__all__ = ["format_methods"]
