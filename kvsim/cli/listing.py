"""``kvsim methods``, ``kvsim models`` and ``kvsim hardware``: what kvsim knows (methods with their knobs,
runtime needs, memory layout, implementations and papers; models and GPUs), and where each figure comes
from."""

from __future__ import annotations

import inspect
from dataclasses import replace

from kvsim.errors import KvsimError
from kvsim.methods import all_methods
from kvsim.methods.base import Method
from kvsim.specs import hardware as _hw
from kvsim.specs import model as _model


def register(sub) -> None:
    m = sub.add_parser("methods", help="list compression methods, knobs, defaults and output-length sources")
    m.add_argument("--model", default=None, help="also say which output-length source a replay of this model uses")
    m.add_argument("--lengths", default="auto", metavar="auto|published|trace|PROFILE",
                   help="with --model: the --lengths choice to resolve")
    m.set_defaults(func=cmd_methods)
    mo = sub.add_parser("models", help="list the shipped models (shape, KV bytes per token, Hugging Face source)")
    mo.add_argument("name", nargs="?", help="one model (short name or Hugging Face id): every field and its source")
    mo.set_defaults(func=cmd_models)
    hw = sub.add_parser("hardware", help="list the known GPUs and their datasheet figures")
    hw.add_argument("name", nargs="?", help="one GPU: every figure with its source")
    hw.set_defaults(func=cmd_hardware)


def cmd_methods(args) -> int:
    print(format_methods(model=args.model, lengths=args.lengths), end="")
    return 0


def cmd_models(args) -> int:
    print(format_model(args.name) if args.name else format_models(), end="")
    return 0


def cmd_hardware(args) -> int:
    print(format_hardware_one(args.name) if args.name else format_hardware(), end="")
    return 0


# -- methods ------------------------------------------------------------------------------------------------
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


# -- models and hardware -------------------------------------------------------------------------------
_README = "kvsim/specs/data/README.md"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def _aliases_of(name: str) -> list[str]:
    return sorted(hf for hf, short in _model.HF_MODELS.items() if short == name)


def format_models() -> str:
    rows = []
    for name in _model.known_models():
        m = _model.load_model(name)
        kind = f"MoE {m.num_experts}x, top {m.num_experts_per_tok}" if m.is_moe else "dense"
        rows.append([name, f"{m.num_params / 1e9:.2f}B", kind, m.num_layers, f"{m.num_attention_heads}/{m.num_kv_heads}",
                     m.head_dim, m.dtype, f"{m.max_position_embeddings:,}", f"{m.kv_bytes_per_token():,.0f}",
                     _model.UPSTREAM.get(name, "-") + (" (reconstructed)" if name in _model.RECONSTRUCTED else "")])
    lines = [f"{len(rows)} shipped models (--model NAME, a Hugging Face id of one, or a path to any config.json):", ""]
    lines += _table(["name", "params", "kind", "layers", "heads q/kv", "head_dim", "dtype", "max_model_len",
                     "KV B/token", "source (Hugging Face config.json)"], rows, {1, 3, 5, 7, 8})
    lines += ["", "KV B/token: K and V of every layer for one token in the model dtype, one GPU (tensor_parallel_size 1).",
              f"Each file is the upstream config.json, as checked against public copies ({_README} says how);",
              "`kvsim models NAME` lists the Hugging Face ids that name it."]
    return "\n".join(lines) + "\n"


def format_model(name: str) -> str:
    m = _model.load_model(name)
    short = m.name
    fields = [("name", short), ("source", _model.UPSTREAM.get(short, "a config.json given by path")),
              ("status", "reconstructed (see " + _README + ")" if short in _model.RECONSTRUCTED else
               "verbatim upstream config.json" if short in _model.UPSTREAM else "user file"),
              ("Hugging Face ids", ", ".join(_aliases_of(short)) or "-")]
    fields += [(k, getattr(m, k)) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                                            "intermediate_size", "vocab_size", "tie_word_embeddings", "dtype",
                                            "max_position_embeddings", "num_experts", "num_experts_per_tok",
                                            "moe_intermediate_size", "num_shared_experts", "sliding_window")]
    fields += [("parameters", f"{m.num_params:,}"), ("active parameters", f"{m.active_params:,}"),
               ("weight bytes (TP 1)", f"{m.weight_bytes():,}"), ("KV bytes per token (TP 1)", f"{m.kv_bytes_per_token():,.0f}")]
    w = max(len(k) for k, _ in fields)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in fields) + "\n"


def _aliases_hw(name: str) -> list[str]:
    return sorted(a for a, c in _hw.hardware_aliases().items() if c == name)


def format_hardware() -> str:
    table = _hw.hardware_table()
    rows = []
    for name in _hw.known_hardware():
        h = _hw.load_hardware(name)
        rows.append([name, table[name].get("product", "-"), f"{h.memory_bytes / 2**30:.1f}", f"{h.mem_bw_bytes_per_s / 1e9:,.0f}",
                     f"{h.fp16_flops / 1e12:,.1f}", f"{h.fp8_flops / 1e12:,.1f}" if h.supports_fp8 else "-",
                     f"{h.interconnect_bw_bytes_per_s / 1e9:,.0f}"])
    lines = [f"{len(rows)} GPUs (--hardware NAME):", ""]
    lines += _table(["name", "product", "memory GiB", "HBM/GDDR GB/s", "fp16 TFLOPS", "fp8 TFLOPS", "GPU-GPU GB/s"],
                    rows, {2, 3, 4, 5, 6})
    lines += ["", "Memory: what CUDA reports where a public log has it, else the datasheet's decimal GB.",
              "Dense tensor peaks with FP32 accumulate; GPU-GPU: one direction, per GPU (NVLink, else PCIe).",
              "Every figure has its datasheet source in kvsim/specs/data/hardware.yaml; `kvsim hardware NAME` prints "
              "them (and the aliases)."]
    return "\n".join(lines) + "\n"


def format_hardware_one(name: str) -> str:
    h = _hw.load_hardware(name)
    entry = _hw.hardware_table()[h.name]
    lines = [f"{h.name}: {entry.get('product', '')}", f"aliases: {', '.join(_aliases_hw(h.name)) or '-'}", ""]
    for key in (*_hw.FIGURE_KEYS, *_hw.OPTIONAL_FIGURE_KEYS):
        if key in entry:
            lines.append(f"{key} = {entry[key]}")
            lines.append(f"    source: {h.sources.get(key, '-')}")
    return "\n".join(lines) + "\n"


__all__ = ["format_hardware", "format_hardware_one", "format_methods", "format_model", "format_models", "register"]
