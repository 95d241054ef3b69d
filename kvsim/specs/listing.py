"""``kvsim models`` and ``kvsim hardware``: what kvsim knows, and where each figure comes from."""

from __future__ import annotations

from kvsim.specs import hardware as _hw
from kvsim.specs import model as _model

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
    return sorted(a for a, c in _hw._aliases().items() if c == name)


def format_hardware() -> str:
    table = _hw._table()
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
    entry = _hw._table()[h.name]
    lines = [f"{h.name}: {entry.get('product', '')}", f"aliases: {', '.join(_aliases_hw(h.name)) or '-'}", ""]
    for key in (*_hw.FIGURE_KEYS, *_hw.OPTIONAL_FIGURE_KEYS):
        if key in entry:
            lines.append(f"{key} = {entry[key]}")
            lines.append(f"    source: {h.sources.get(key, '-')}")
    return "\n".join(lines) + "\n"


__all__ = ["format_hardware", "format_hardware_one", "format_model", "format_models"]
