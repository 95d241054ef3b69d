"""Import LLMServingSim's per-layer vLLM profiles (``profiler/perf/`` of casys-kaist/LLMServingSim).

Source layout (``DIR`` is the ``perf/`` folder)::

    <HW>/<org>/<model>/<variant>/meta.yaml
    <HW>/<org>/<model>/<variant>/tp<N>/dense.csv          layer, tokens, time_us
    <HW>/<org>/<model>/<variant>/tp<N>/per_sequence.csv   layer, sequences, time_us
    <HW>/<org>/<model>/<variant>/tp<N>/attention.csv      prefill_chunk, kv_prefill, n_decode, kv_decode, time_us
    <HW>/<org>/<model>/<variant>/tp1/moe.csv              tokens, activated_experts, time_us (MoE models)

Each time is the CUDA kernel time of one call of one vLLM module (eager mode, one GPU), the mean of
3 timed forwards: the only statistic the source gives. Microseconds converted to seconds.

Mapping:

    linear.qkv          qkv_proj                                           axis num_tokens
    linear.o            o_proj
    linear.mlp          gate_up_proj + act_fn + down_proj                  (dense models)
    linear.moe          moe.csv at the expected number of distinct experts E(1-(1-k/E)^T) (MoE, TP 1)
    linear.moe_by_experts   moe.csv as it is                               axes num_tokens, activated_experts
    linear.other        2 x layernorm + rotary_emb [+ 2 x qk_norm]   (rows are one call, two calls per layer)
    linear.lm_head      per_sequence lm_head (LogitsProcessor incl. the vocab GEMM)   axis num_tokens
    step.embedding      embedding                                          axis num_tokens (per step)
    step.final_norm     final_layernorm                                    axis num_tokens (per step)
    step.sampler        per_sequence sampler (greedy)                      axis batch_size (per step)
    attention.prefill.flash   pure-prefill rows (n_decode = 0): chunk_tokens = prefill_chunk,
                              kv_tokens = prefill_chunk + kv_prefill
    attention.decode.none     pure-decode rows (prefill_chunk = 0): batch_size = n_decode,
                              kv_tokens = kv_decode + 1 (the new token included)
    attention.mixed.flash     mixed rows (one prefill chunk and n_decode decodes in one call), on the
                              power-of-two grid: chunk_tokens = prefill_chunk, history_tokens =
                              kv_prefill (from 0), batch_size = n_decode, kv_tokens = kv_decode + 1
    decode_skew_alpha         skew.csv: least-squares alpha of t_skew - t_mean = alpha (t_max - t_mean),
                              pure rows -> "decode", mixed rows -> "mixed" (not a table)

``skew_fit.csv`` (per-bucket alphas) is not read. TP is emulated on one GPU by the source, so
there is no communication in any file and ``comm.all_reduce`` is always absent. See ``docs/reference-data.md``.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import yaml

from profiler.importers import (
    SCHEMA,
    SCHEMA_VERSION,
    SourceDataError,
    file_record,
    num,
    resample_rows,
    sha256_of,
    table_1d,
    table_2d,
    table_nd,
)

REPO = "https://github.com/casys-kaist/LLMServingSim"
COMMIT = "5daddb21a545658d5150b535712d0494584b5278"
LICENCE = "MIT (LICENSE, Copyright (c) 2024, CASYS Lab at KAIST)"
US = 1e-6


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


#: kvsim hardware name -> source hardware folder
HARDWARE = {"rtx-pro-6000": "RTXPRO6000", "rtx-4090": "RTX4090"}
#: kvsim model -> source <org>/<model> folder
MODELS = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B-Instruct-2507",
}
#: layer -> (table, multiplier): dense.csv rows that sum into each table
DENSE_MAP = {
    "qkv_proj": ("linear.qkv", 1),
    "o_proj": ("linear.o", 1),
    "gate_up_proj": ("linear.mlp", 1),
    "act_fn": ("linear.mlp", 1),
    "down_proj": ("linear.mlp", 1),
    "layernorm": ("linear.other", 2),
    "qk_norm": ("linear.other", 2),
    "rotary_emb": ("linear.other", 1),
    "embedding": ("step.embedding", 1),
    "final_layernorm": ("step.final_norm", 1),
}
PERSEQ_MAP = {"lm_head": ("linear.lm_head", "num_tokens"), "sampler": ("step.sampler", "batch_size")}
REQUIRED_DENSE = {"qkv_proj", "o_proj", "layernorm", "rotary_emb"}

#: sha256 of the files this importer knows -> path in the source repository at COMMIT
KNOWN = {
    "9c99dc484f44f965e7cdb95767706973588b1462a20332ee6430767433732deb": "profiler/perf/RTX4090/meta-llama/Llama-3.1-8B/bf16/meta.yaml",
    "60f0669b5e85467b18d0ca241a826c4376c530b22b74b7b20748a1955cf61949": "profiler/perf/RTX4090/meta-llama/Llama-3.1-8B/bf16/tp1/attention.csv",
    "4f5b0623f1fa27033752cc54807a4089c39205c7132a0bb196520249d9d9140a": "profiler/perf/RTX4090/meta-llama/Llama-3.1-8B/bf16/tp1/dense.csv",
    "acbc8294d6749cb3ed8eaccb9ab561e62cacf9fbc06e6901c89646d750d94647": "profiler/perf/RTX4090/meta-llama/Llama-3.1-8B/bf16/tp1/per_sequence.csv",
    "01c964ad3e8ce9604773e7c0b3ae815c22545385d789842a920d8f33b1ce8b98": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/meta.yaml",
    "dd802390245b2c215a491b78c390482fbc6e49afc760182d7ce15fddff369175": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp1/attention.csv",
    "6f23be95325a16544319b78c477d71bec8996fdc826ae55140c36f36e17973c4": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp1/dense.csv",
    "af9abb35ef5eb7c98e1856fa5fe5090008d8b98f1b6278b6d081577451d9c618": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp1/per_sequence.csv",
    "d6231d664ba021c5b21f157adc815cc8afe7f52b3eb6e4f855a54386b448627d": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp2/attention.csv",
    "5f1c12baadd49a4f82cd3a9648724d2fc4fea954eb8d9c2e650afe03e3c3d53b": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp2/dense.csv",
    "d1581678297ef0fe2d649608ed33805fb76a4d96c7766972e8b3f3bbee02a2c1": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp2/per_sequence.csv",
    "b072508a080674c8991a7777e5c6ec6991d46a2e16bf75ebafd1d5013b74b1eb": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/meta.yaml",
    "7198bb9b565dab1fa56ecb82ed40e7b138917482ec25fd601e84392201fd32ee": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp1/attention.csv",
    "96d32cda00c850488fa4e215807c4015b471ccf9d4217d38e8cd8a5e13d338d3": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp1/dense.csv",
    "bca39f32ce77d4e3afb0ebb595d38b4813c4f239619dabadc8ca932575974b0e": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp1/per_sequence.csv",
    "2c4d98649967da9c79535421c7e71663daeff80e9049608072d0237befd522a7": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp2/attention.csv",
    "4f3cf699af9eace4f570d83a5d36879e6db6bc6486e04feb1fa8c524e32e11a7": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp2/dense.csv",
    "99c417c98e382c911d280a07cbb5902f39af886bd264584faa48f37cfb743974": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp2/per_sequence.csv",
    "e755433ea63a19e9d4a4919f04da412807aa520972dc97df3dfb8908b6a70f96": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/meta.yaml",
    "eea3376edc5329da5ceb9220a138895bf94ab063116a22919228f68a2d6015cc": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp1/attention.csv",
    "90c13de3060552a314ed4819dcdbf82f843e292332054765abe8a0472d91ca96": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp1/dense.csv",
    "aa6e29a17412a62234a6610d7a699f72e5938f09386374b635925c5db29045f6": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp1/moe.csv",
    "6221393b77135bdaa41e7abe9993a528b49ceb34f2475423c5236f970c711bcc": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp1/per_sequence.csv",
    "0b0fb7a5436cb4bffba5e89397cf747064b1566e0053db4584c70d766d243b10": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp2/attention.csv",
    "710f04261d67ec53639095cec91751c9a9dc1aa6f5b335c9decaee4802407633": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp2/dense.csv",
    "ed094edb86909d5ceaf9c9a0c14c1711508ffb6211f92196a0536dc6c65de097": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp2/per_sequence.csv",
    "d7ee78f69aba661ad3f69ee5ebbc589e68f35690fb15e17d8cd84e5ac6fd29a0": "profiler/perf/RTX4090/meta-llama/Llama-3.1-8B/bf16/tp1/skew.csv",
    "7cf6ec2e063655b6ab4079c928849d0ec9a9559bab0b643c98584196cca471a2": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp1/skew.csv",
    "29c90e6c474c1e037906b9e1ecc2e0ce3e566864115707e773b637ac9ac6ebba": "profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16/tp2/skew.csv",
    "0307d051862e6a84d4ca3d44dcc8ff4eda172060e8289e2e3af96585ec48a2d8": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp1/skew.csv",
    "3e48068965831aa6dd3afeb48546081eb04f86e7a3c3d4d754812d02677c5817": "profiler/perf/RTXPRO6000/Qwen/Qwen3-32B/bf16/tp2/skew.csv",
    "30500a2b8ea5b7124938dafe0529d846945a75a539b0b4f01f24c4ff42635fbb": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp1/skew.csv",
    "af6b46855538a46fa743620afdfefc62c62a0ccf7da60b9aea30ba67adac12b1": "profiler/perf/RTXPRO6000/Qwen/Qwen3-30B-A3B-Instruct-2507/bf16/tp2/skew.csv",
}


def _perf(root: Path) -> Path:
    if not root.exists():
        raise SourceDataError(f"directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise SourceDataError(f"{str(root)!r} is not a directory")
    for cand in (root, root / "perf", root / "profiler" / "perf"):
        if any(cand.glob("*/*/*/*/meta.yaml")):
            return cand
    raise SourceDataError(
        f"{str(root)!r} does not look like LLMServingSim's perf directory: expected "
        f"'<HW>/<org>/<model>/<variant>/meta.yaml' under it (or under perf/ or profiler/perf/)"
    )


def _read_csv(path: Path, cols) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise SourceDataError(f"missing source file {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SourceDataError(f"{path}: no data rows")
    missing = [c for c in cols if c not in rows[0]]
    if missing:
        raise SourceDataError(f"{path}: missing column(s) {missing}")
    return [(i + 2, r) for i, r in enumerate(rows)]


def available(root: Path) -> list[tuple[str, str, int, str]]:
    perf = _perf(root)
    inv_hw = {v: k for k, v in HARDWARE.items()}
    inv_m = {v: k for k, v in MODELS.items()}
    out = []
    for meta in sorted(perf.glob("*/*/*/*/meta.yaml")):
        var = meta.parent
        hw_dir, folder = var.parts[-4], "/".join(var.parts[-3:-1])
        for tpd in sorted(var.glob("tp*")):
            if not (tpd / "dense.csv").is_file():
                continue
            tp = int(tpd.name[2:])
            what = "linear + attention" + (" + moe" if (tpd / "moe.csv").is_file() else "")
            out.append((inv_hw.get(hw_dir, hw_dir), inv_m.get(folder, folder), tp, f"{what} [{var.name}]"))
    return out


def expected_experts(tokens: int, num_experts: int, top_k: int) -> float:
    """Expected number of distinct experts that receive at least one of ``tokens`` tokens when each
    token picks ``top_k`` distinct experts uniformly at random: E (1 - (1 - k/E)^T)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def build_profile(root: Path, model: str, hardware: str, tp: int = 1, *, source_model: str | None = None,
                  variant: str = "bf16") -> dict:
    perf = _perf(root)
    hw = hardware.lower()
    hw_dirs = sorted(p.name for p in perf.iterdir() if p.is_dir())
    if hw not in HARDWARE:
        raise SourceDataError(f"unknown hardware {hardware!r} for LLMServingSim; known: {', '.join(sorted(HARDWARE))} "
                              f"(hardware folders under {perf}: {', '.join(hw_dirs)})")
    hw_dir = HARDWARE[hw]
    if hw_dir not in hw_dirs:
        raise SourceDataError(f"no LLMServingSim profile for {hw!r}: {perf / hw_dir} does not exist; "
                              f"hardware folders: {', '.join(hw_dirs)}")
    if source_model:
        folder = source_model
    elif model in MODELS:
        folder = MODELS[model]
    else:
        raise SourceDataError(f"unknown model {model!r} for LLMServingSim; known: {', '.join(sorted(MODELS))} "
                              f"(or name the source folder with --source-model <org>/<name>)")
    mdir = perf / hw_dir / folder
    if not mdir.is_dir():
        have = sorted(p.parent.relative_to(perf / hw_dir).as_posix() for p in (perf / hw_dir).glob("*/*/*/meta.yaml"))
        raise SourceDataError(f"no {mdir}; models profiled on {hw_dir}: {', '.join(sorted(set(have))) or 'none'}")
    var = mdir / variant
    meta_path = var / "meta.yaml"
    if not meta_path.is_file():
        have = sorted(p.parent.name for p in mdir.glob("*/meta.yaml"))
        raise SourceDataError(f"no {meta_path}; variants: {', '.join(have) or 'none'}")
    try:
        meta = yaml.safe_load(meta_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SourceDataError(f"{meta_path}: not valid YAML: {e}") from None
    tdir = var / f"tp{tp}"
    if not (tdir / "dense.csv").is_file():
        have = sorted(p.name for p in var.glob("tp*") if (p / "dense.csv").is_file())
        raise SourceDataError(f"no {tdir / 'dense.csv'}; TP folders: {', '.join(have) or 'none'}")
    files = [_rec(meta_path, perf)]
    notes: list[str] = []
    tables: dict[str, dict] = {}
    mapping: dict[str, list[str]] = defaultdict(list)

    # ---- model shape -------------------------------------------------------------------------------
    spec = None
    try:
        from kvsim.specs.model import load_model

        spec = load_model(model)
    except Exception:
        pass
    if spec is not None:
        ov = (meta.get("engine_effective") or {}).get("hf_overrides") or {}
        last_tp = max(meta.get("tp_degrees") or [1])
        exp = {"num_attention_heads": spec.num_attention_heads // last_tp,
               "num_key_value_heads": max(1, spec.num_kv_heads // last_tp),
               "intermediate_size": spec.intermediate_size // last_tp,
               "vocab_size": spec.vocab_size // last_tp}
        bad = {k: (ov.get(k), v) for k, v in exp.items() if k in ov and ov[k] != v}
        if bad:
            raise SourceDataError(f"{meta_path}: hf_overrides do not match kvsim's {model!r} split {last_tp} ways "
                                  f"(source value, expected): {bad}")
        checked = sorted(k for k in exp if k in ov)
        notes.append(f"shape checked: meta.yaml hf_overrides (the shapes of TP {last_tp}, the last TP profiled) "
                     f"match kvsim's {model!r} config divided by {last_tp} for {', '.join(checked) or 'nothing'}")
    else:
        notes.append(f"kvsim has no model config {model!r}: shapes not cross-checked")
    src_model = str(meta.get("model", ""))
    if src_model and src_model != folder:
        raise SourceDataError(f"{meta_path}: model {src_model!r} does not match folder {folder!r}")

    # ---- dense (token-parallel) layers -------------------------------------------------------------
    dense_path = tdir / "dense.csv"
    rows = _read_csv(dense_path, ["layer", "tokens", "time_us"])
    per_layer: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line, r in rows:
        per_layer[r["layer"]][int(num(r["tokens"], dense_path, line, "tokens"))].append(
            num(r["time_us"], dense_path, line, "time_us") * US)
    missing = REQUIRED_DENSE - set(per_layer)
    if missing:
        raise SourceDataError(f"{dense_path}: no rows for layer(s) {sorted(missing)}")
    unknown = set(per_layer) - set(DENSE_MAP)
    if unknown:
        raise SourceDataError(f"{dense_path}: unknown layer(s) {sorted(unknown)}; this importer maps {sorted(DENSE_MAP)}")
    sums: dict[str, dict[int, float]] = {}
    tokens_by_table: dict[str, set] = {}
    for layer, pts in per_layer.items():
        t, mult = DENSE_MAP[layer]
        if any(len(v) > 1 for v in pts.values()):
            raise SourceDataError(f"{dense_path}: layer {layer!r} has repeated token counts")
        keys = set(pts)
        if t in tokens_by_table and tokens_by_table[t] != keys:
            raise SourceDataError(f"{dense_path}: layers of {t} are measured at different token counts")
        tokens_by_table[t] = keys
        acc = sums.setdefault(t, defaultdict(float))
        for n, v in pts.items():
            acc[n] += mult * v[0]
        mapping[t].append(f"{mult} x dense.csv:{layer}" if mult != 1 else f"dense.csv:{layer}")
    has_mlp = "linear.mlp" in sums
    if has_mlp and set(per_layer) & {"gate_up_proj", "act_fn", "down_proj"} != {"gate_up_proj", "act_fn", "down_proj"}:
        raise SourceDataError(f"{dense_path}: MLP layers incomplete (need gate_up_proj, act_fn, down_proj)")
    for t in ("linear.qkv", "linear.o", "linear.mlp", "linear.other", "step.embedding", "step.final_norm"):
        if t in sums:
            tables[t] = table_1d("num_tokens", sums[t])
    files.append(_rec(dense_path, perf))

    # ---- MoE block ---------------------------------------------------------------------------------
    moe_path = tdir / "moe.csv"
    is_moe = (spec is not None and spec.is_moe) or moe_path.is_file() or (not has_mlp)
    if moe_path.is_file():
        mrows = _read_csv(moe_path, ["tokens", "activated_experts", "time_us"])
        grid: dict[tuple[int, int], float] = {}
        for line, r in mrows:
            key = (int(num(r["tokens"], moe_path, line, "tokens")), int(num(r["activated_experts"], moe_path, line, "activated_experts")))
            if key in grid:
                raise SourceDataError(f"{moe_path}:{line}: repeated (tokens, activated_experts) {key}")
            grid[key] = num(r["time_us"], moe_path, line, "time_us") * US
        tables["linear.moe_by_experts"] = table_2d("num_tokens", "activated_experts", grid)
        mapping["linear.moe_by_experts"].append("moe.csv:time_us")
        if spec is None or not spec.is_moe:
            notes.append("linear.moe not derived: kvsim's model config (num_experts, top_k) is needed for the routing model")
        else:
            E, k = spec.num_experts, spec.num_experts_per_tok
            moe_pts = {}
            for T in sorted({t for t, _ in grid}):
                cols = sorted(a for t, a in grid if t == T)
                want = min(float(E), expected_experts(T, E, k))
                lo = max((a for a in cols if a <= want + 1e-9), default=None)
                hi = min((a for a in cols if a >= want - 1e-9), default=None)
                if lo is None or hi is None:
                    continue
                if lo == hi:
                    moe_pts[T] = grid[(T, lo)]
                else:  # time is close to affine in the number of active experts: interpolate linearly in it
                    w = (want - lo) / (hi - lo)
                    moe_pts[T] = grid[(T, lo)] + w * (grid[(T, hi)] - grid[(T, lo)])
            tables["linear.moe"] = table_1d("num_tokens", moe_pts)
            mapping["linear.moe"].append("moe.csv:time_us at activated_experts = E(1-(1-k/E)^T), linear in activated_experts")
            notes.append(
                f"linear.moe: the source times the whole sparse-MoE block (router gate + fused experts, "
                f"{E} experts on one GPU, k={k}) with routing forced to a given number of distinct experts. "
                f"At each token count T the table takes the expected number of distinct experts under "
                f"uniform random top-{k} routing, E(1-(1-k/E)^T), interpolated linearly between the two "
                f"measured expert counts around it. Real routing is skewed (fewer distinct experts, so this is "
                f"an upper-side estimate for small T); linear.moe_by_experts keeps the raw grid for a "
                f"different routing model."
            )
        files.append(_rec(moe_path, perf))
    elif is_moe:
        notes.append(f"MoE model without {moe_path.name} for TP {tp} (the source measures MoE at TP 1 only): "
                     f"linear.moe absent (roofline fallback); TP-1 times would overstate a TP-{tp} rank")

    # ---- per-sequence layers -------------------------------------------------------------------------
    ps_path = tdir / "per_sequence.csv"
    if ps_path.is_file():
        prow = _read_csv(ps_path, ["layer", "sequences", "time_us"])
        pts: dict[str, dict[int, float]] = defaultdict(dict)
        for line, r in prow:
            if r["layer"] not in PERSEQ_MAP:
                raise SourceDataError(f"{ps_path}:{line}: unknown layer {r['layer']!r}; known {sorted(PERSEQ_MAP)}")
            n = int(num(r["sequences"], ps_path, line, "sequences"))
            if n in pts[r["layer"]]:
                raise SourceDataError(f"{ps_path}:{line}: repeated ({r['layer']}, {n})")
            pts[r["layer"]][n] = num(r["time_us"], ps_path, line, "time_us") * US
        for layer, (t, axis) in PERSEQ_MAP.items():
            if layer in pts:
                tables[t] = table_1d(axis, pts[layer])
                mapping[t].append(f"per_sequence.csv:{layer}")
        files.append(_rec(ps_path, perf))
    else:
        notes.append("no per_sequence.csv: linear.lm_head and step.sampler absent")

    # ---- attention ------------------------------------------------------------------------------------
    at_path = tdir / "attention.csv"
    if at_path.is_file():
        arows = _read_csv(at_path, ["prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"])
        pre: dict[int, dict[int, float]] = defaultdict(dict)
        dec: dict[tuple[int, int], float] = {}
        mix: dict[tuple[int, int, int, int], float] = {}
        mixed = 0
        for line, r in arows:
            c, h, b, kv = (int(num(r[k], at_path, line, k)) for k in ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode"))
            t = num(r["time_us"], at_path, line, "time_us") * US
            if b == 0 and c > 0:
                if (c + h) in pre[c]:
                    raise SourceDataError(f"{at_path}:{line}: repeated prefill shape ({c}, {h})")
                pre[c][c + h] = t
            elif c == 0 and b > 0:
                if (b, kv + 1) in dec:
                    raise SourceDataError(f"{at_path}:{line}: repeated decode shape ({b}, {kv})")
                dec[(b, kv + 1)] = t
            else:
                mixed += 1
                if _pow2(c) and _pow2(b) and _pow2(kv) and (h == 0 or _pow2(h)):
                    if (c, h, b, kv + 1) in mix:
                        raise SourceDataError(f"{at_path}:{line}: repeated mixed shape ({c}, {h}, {b}, {kv})")
                    mix[(c, h, b, kv + 1)] = t
        cells, counts = resample_rows(pre)
        tables["attention.prefill.flash"] = table_2d("chunk_tokens", "kv_tokens", cells)
        tables["attention.decode.none"] = table_2d("batch_size", "kv_tokens", dec)
        mapping["attention.prefill.flash"].append("attention.csv:time_us of rows n_decode = 0")
        mapping["attention.decode.none"].append("attention.csv:time_us of rows prefill_chunk = 0")
        dec_missing = sum(1 for row in tables["attention.decode.none"]["time_s"] for v in row if v is None)
        mix_note = "no mixed rows"
        if mix:
            tables["attention.mixed.flash"] = table_nd(("chunk_tokens", "history_tokens", "batch_size", "kv_tokens"), mix)
            mapping["attention.mixed.flash"].append("attention.csv:time_us of rows prefill_chunk > 0 and n_decode > 0")
            grid = tables["attention.mixed.flash"]["axes"]
            cells_total = math.prod(len(v) for v in grid.values())
            mix_note = (f"attention.mixed.flash from the {len(mix)} mixed rows on the power-of-two grid "
                        f"({cells_total - len(mix)} null cells; {mixed - len(mix)} rows of the source's x1.5 grid "
                        f"left out, they do not fill a grid): history_tokens = kv_prefill, kv_tokens = kv_decode + 1")
        notes.append(
            f"attention: one call of vLLM's Attention module for one layer (the KV-cache write of the new "
            f"tokens and the attention kernel; backend: vLLM's default for this GPU, not recorded). Prefill "
            f"table from {sum(len(v) for v in pre.values())} pure-prefill rows, kv_tokens = prefill_chunk + "
            f"kv_prefill: {counts['measured_cells']} cells measured, {counts['interpolated_cells']} interpolated "
            f"(log-log along kv_tokens between two measured points of the same chunk row, never extrapolated: "
            f"rows are measured at row-specific totals chunk + history), null where kv_tokens < chunk_tokens or "
            f"beyond the row's largest history. Decode table from {len(dec)} pure-decode rows "
            f"({dec_missing} null cells), kv_tokens = kv_decode + 1. {mix_note}."
        )
        files.append(_rec(at_path, perf))
    else:
        notes.append("no attention.csv: attention tables absent")

    # ---- heterogeneous decode batches ---------------------------------------------------------------
    skew_alpha = None
    sk_path = tdir / "skew.csv"
    if sk_path.is_file():
        skew_alpha, skew_rows = skew_alphas(sk_path)
        mapping["decode_skew_alpha"].append("skew.csv: sum(dtm dts) / sum(dtm^2) per regime (pure -> decode, mixed)")
        notes.append(
            f"decode_skew_alpha from skew.csv ({skew_rows['pure']} pure-decode and {skew_rows['mixed']} mixed "
            f"batches whose decodes have two context lengths): for each regime, the least-squares alpha of "
            f"t_skew - t_mean = alpha (t_max - t_mean) over all rows (dtm = t_max - t_mean, dts = t_skew - "
            f"t_mean, alpha = sum(dtm dts) / sum(dtm^2)), the pooled form of the source's per-bucket "
            f"skew_fit.csv; rows with t_max <= t_mean add nothing")
        files.append(_rec(sk_path, perf))

    gpu = meta.get("gpu")
    notes.append("comm.all_reduce absent: the source emulates TP on one GPU (shapes divided by TP) and measures no "
                 "communication" if tp > 1 else "TP 1: no all-reduce, comm.all_reduce absent")
    if tp > 1:
        notes.append(f"TP {tp}: each row is one rank's compute (heads, MLP width, vocab divided by {tp}); "
                     f"layernorm, qk_norm, final_layernorm and sampler rows are copies of the TP-1 ones")
    notes.append("step_overhead_s absent: the source times GPU kernels only (no CPU, scheduling or launch gaps; "
                 "profiled in eager mode while serving runs use CUDA graphs)")
    notes.append("step.sampler is vLLM's Sampler with greedy sampling (temperature 0) of one token per sequence")

    prof = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": f"{hw}-{model}-tp{tp}-llmservingsim",
        "model": model,
        "hardware": hw,
        "tensor_parallel_size": tp,
        "dtype": "bfloat16" if variant.startswith("bf16") else variant,
        "provenance": {
            "source": "imported: llmservingsim",
            "importer": "kvprof import llmservingsim",
            "source_repo": REPO,
            "source_commit": COMMIT,
            "source_model": folder,
            "source_hardware": hw_dir,
            "source_variant": variant,
            "device": gpu,
            "vllm": meta.get("vllm_version"),
            "cuda": meta.get("cuda_version"),
            "date": str(meta.get("profiled_at")) if meta.get("profiled_at") else None,
            "licence": LICENCE,
            "files": files,
            "statistic": f"mean over {meta.get('measurement_iterations', 3)} timed forwards after 1 warm-up "
                         f"(per-call CUDA kernel time from vLLM's layerwise profiler): the only statistic the "
                         f"source gives; no median is available",
            "units": "source microseconds converted to seconds (x 1e-6), rounded to 6 significant digits",
            "mapping": dict(mapping),
            "notes": notes,
            "command": None,
        },
        "tables": tables,
    }
    if skew_alpha:
        prof["decode_skew_alpha"] = skew_alpha
    return prof


def skew_alphas(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Least-squares alpha per regime of ``skew.csv`` (pure -> ``decode``, mixed -> ``mixed``), and the
    row counts. A skewed batch costs ``t_mean + alpha (t_max - t_mean)``; pooling sums the way the
    source fits each bucket of ``skew_fit.csv``, so large gaps (where the correction matters) weigh most."""
    rows = _read_csv(path, ["regime", "t_mean_us", "t_max_us", "t_skew_us"])
    acc = {"pure": [0.0, 0.0], "mixed": [0.0, 0.0]}
    counts = {"pure": 0, "mixed": 0}
    for line, r in rows:
        reg = r["regime"]
        if reg not in acc:
            raise SourceDataError(f"{path}:{line}: regime {reg!r} is neither 'pure' nor 'mixed'")
        tm, tx, ts = (num(r[k], path, line, k) for k in ("t_mean_us", "t_max_us", "t_skew_us"))
        counts[reg] += 1
        dtm = tx - tm
        if dtm <= 0:
            continue
        acc[reg][0] += dtm * (ts - tm)
        acc[reg][1] += dtm * dtm
    out = {("decode" if reg == "pure" else "mixed"): round(num_ / den, 4) for reg, (num_, den) in acc.items() if den > 0}
    return out, counts


def _rec(path: Path, root: Path) -> dict:
    sha = sha256_of(path)
    up = ({"repo": REPO, "commit": COMMIT, "path": KNOWN[sha], "licence": LICENCE} if sha in KNOWN
          else {"note": "bytes not among the LLMServingSim files this importer knows; origin unverified"})
    return file_record(path, root, up)
