"""Import Vidur's published profiles (``data/profiling/`` of microsoft/vidur) as a kvsim profile.

Source layout (``DIR`` is the folder holding ``profiling/``)::

    profiling/compute/<device>/<org>/<model>/mlp.csv         per-op times (ms), rows per (num_tokens, TP)
    profiling/compute/<device>/<org>/<model>/attention.csv   attention times (ms), TP=1 rows only here
    profiling/network/<device>_<node>/all_reduce.csv         NCCL all_reduce (ms) per (size bytes, group)

Mapping (every source time is the ``time_stats.<op>.median`` column, converted ms -> s; rows that
repeat a (num_tokens, TP) or (size, group) key are combined by the median of their medians):

    linear.qkv          attn_pre_proj                                  axis num_tokens
    linear.o            attn_post_proj                                 axis num_tokens
    linear.mlp          mlp_up_proj + mlp_act + mlp_down_proj          axis num_tokens
    linear.other        input_layernorm + post_attention_layernorm + attn_rope + add
    step.embedding      emb (once per step, not per layer)             axis num_tokens
    attention.prefill.flash   attn_prefill of (prefill_chunk_size, kv_cache_size) rows;
                              axes chunk_tokens = prefill_chunk_size,
                                   kv_tokens = prefill_chunk_size + kv_cache_size
    attention.decode.none     attn_decode of (batch_size, kv_cache_size) rows;
                              axes batch_size, kv_tokens = kv_cache_size + 1 (the new token included)
    comm.all_reduce     all_reduce rows with num_workers == devices_per_node == TP    axis num_bytes

Vidur has no LM head, no final norm and no sampler in these files: those tables stay absent. See
``docs/reference-data.md`` for what each op covers.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from profiler.importers import (
    SCHEMA,
    SCHEMA_VERSION,
    SourceDataError,
    check_model_shape,
    file_record,
    median,
    num,
    resample_rows,
    sha256_of,
    table_1d,
    table_2d,
)

REPO = "https://github.com/microsoft/vidur"
COMMIT = "7d47513363ec447a741ac5e47241580b47724fbf"
LICENCE = "MIT (microsoft/vidur LICENSE, Copyright (c) Microsoft Corporation)"
ATTN_REPO = "https://github.com/LLMkvsys/rethink-kv-compression"
ATTN_COMMIT = "7cb1dd9712073b3ff283f8c118e565e39f961795"
ATTN_LICENCE = "MIT (1_thr_predictor/LICENSE, Copyright (c) Microsoft Corporation; a fork of Vidur)"

#: files whose bytes we know, with where they came from (sha256 -> upstream path at COMMIT)
KNOWN = {
    "2cfacca979f32e83257753cf6fd815a71af8ba9a7a9d0643b18d9f54e8a37688": "data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv",
    "98c26488298e324e89db7349e213f75c856ae83dc6b17548a68636d2cb5efff0": "data/profiling/compute/a100/meta-llama/Meta-Llama-3-8B/mlp.csv",
    "b1a2def08857d10e5f66c3b5b2d046b6e8caed5c30b2bc920a0462598e3b2a59": "data/profiling/compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv",
    "f8d0f455d0b72b7975be0ed8e1951dcbf2eabc083001b27f6ef8203c0a96962c": "data/profiling/compute/a40/meta-llama/Llama-2-7b-hf/mlp.csv",
    "5ea3f3c229fee1ef70ea308881fff420d60ab6f30e86edda1ed6146b12eb28ef": "data/profiling/network/a100_dgx/all_reduce.csv",
    "27428d884ae095800e81366c7517af93fd7476633cfe5e55bdd155e004485dab": "data/profiling/network/a100_pairwise_nvlink/all_reduce.csv",
    "7bc107da2ca2790ab5aa6585eba71603bf7359dd7e7cba1b586f885cae8bcb81": "data/profiling/network/h100_dgx/all_reduce.csv",
    "8d68ee6979682726cd7c1d06b8a3656dea5bf53d074d62b3e080ed306b03c155": "data/profiling/network/h100_pairwise_nvlink/all_reduce.csv",
}
KNOWN_ATTN = {
    "1c311fd30b18c1837d82a966b59ac1c76dcc13376ed8852cebfb1a16ce9bdcc8": "1_thr_predictor/data/profiling/compute/a6000/meta-llama/Llama-2-7b-fp16/attention.csv",
}

#: kvsim hardware name -> Vidur device folder
HARDWARE = {"a100": "a100", "h100": "h100", "a40": "a40"}
#: kvsim model -> (Vidur model folder, expected shape columns of mlp.csv, note)
MODELS = {
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", {"n_head": 32, "n_kv_head": 32, "n_embd": 4096, "n_expanded_embd": 11008}, None),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", {"n_head": 32, "n_kv_head": 8, "n_embd": 4096, "n_expanded_embd": 14336}, None),
    "llama-3.1-8b": (
        "meta-llama/Meta-Llama-3-8B",
        {"n_head": 32, "n_kv_head": 8, "n_embd": 4096, "n_expanded_embd": 14336},
        "shape alias: these are Vidur's Meta-Llama-3-8B timings. Llama-3.1-8B has the same layer shapes "
        "(hidden 4096, 32 q / 8 kv heads, head_dim 128, intermediate 14336, vocab 128256), so the linear, "
        "norm, embedding and all-reduce timings carry over; only the RoPE scaling differs (rotary cost unchanged). "
        "Attention tables are never aliased.",
    ),
}

MLP_MAP = {
    "linear.qkv": ["attn_pre_proj"],
    "linear.o": ["attn_post_proj"],
    "linear.mlp": ["mlp_up_proj", "mlp_act", "mlp_down_proj"],
    "linear.other": ["input_layernorm", "post_attention_layernorm", "attn_rope", "add"],
    "step.embedding": ["emb"],
}
SHAPE_COLS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd")
MS = 1e-3


def _profiling(root: Path) -> Path:
    if not root.exists():
        raise SourceDataError(f"directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise SourceDataError(f"{str(root)!r} is not a directory")
    for cand in (root / "profiling", root / "data" / "profiling"):
        if (cand / "compute").is_dir():
            return cand
    raise SourceDataError(
        f"{str(root)!r} does not look like Vidur's data directory: expected "
        f"'profiling/compute/<device>/<org>/<model>/mlp.csv' under it (or under data/)"
    )


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SourceDataError(f"cannot read {path}: {e.strerror}") from None
    if not rows:
        raise SourceDataError(f"{path}: no data rows")
    return rows


def _need_cols(path: Path, rows: list[dict], cols) -> None:
    missing = [c for c in cols if c not in rows[0]]
    if missing:
        raise SourceDataError(f"{path}: missing column(s) {missing}; is this a Vidur file of that kind?")


def available(root: Path) -> list[tuple[str, str, int, str]]:
    """(hardware, model, tp, what) for every importable combination under ``root``."""
    prof = _profiling(root)
    by_folder = defaultdict(list)
    for m, (folder, _, _) in MODELS.items():
        by_folder[folder].append(m)
    out = []
    for dev in sorted(p.name for p in (prof / "compute").iterdir() if p.is_dir()):
        hw = next((h for h, d in HARDWARE.items() if d == dev), dev)
        for mlp in sorted((prof / "compute" / dev).glob("*/*/mlp.csv")):
            folder = mlp.parent.relative_to(prof / "compute" / dev).as_posix()
            tps = sorted({int(r["num_tensor_parallel_workers"]) for r in _read_csv(mlp)})
            attn = mlp.parent / "attention.csv"
            attn_tps = sorted({int(r["num_tensor_parallel_workers"]) for r in _read_csv(attn)}) if attn.exists() else []
            for m in by_folder.get(folder, [folder]):
                for tp in tps:
                    net = _network_dir(prof, dev, tp, None)[0] if tp > 1 else None
                    what = "linear" + (" + attention" if tp in attn_tps and MODELS.get(m, (0, 0, None))[2] is None else "")
                    what += (f" + comm ({net.name})" if net else " (no all_reduce data)") if tp > 1 else ""
                    out.append((hw, m, tp, what))
    return out


def _network_dir(prof: Path, device: str, tp: int, network: str | None) -> tuple[Path | None, str]:
    """The network folder whose all_reduce.csv has a group of ``tp`` GPUs in one node."""
    if network == "none":
        return None, "left out on request (--network none)"
    cands = [network] if network else [f"{device}_dgx", f"{device}_pairwise_nvlink"]
    for c in cands:
        f = prof / "network" / c / "all_reduce.csv"
        if f.is_file():
            rows = _read_csv(f)
            if any(int(r["num_workers"]) == tp and int(r["devices_per_node"]) == tp for r in rows):
                return f.parent, ""
            if network:
                raise SourceDataError(f"{f}: no all_reduce rows with num_workers = devices_per_node = {tp}")
        elif network:
            have = sorted(p.parent.name for p in (prof / "network").glob("*/all_reduce.csv"))
            raise SourceDataError(f"no {f}; network folders with all_reduce.csv: {', '.join(have) or 'none'}")
    have = sorted(p.parent.name for p in (prof / "network").glob("*/all_reduce.csv"))
    return None, (f"no all_reduce data for a group of {tp} {device} GPUs in one node "
                  f"(network folders with all_reduce.csv: {', '.join(have) or 'none'})")


def _dedup(points: dict) -> dict:
    return {k: median(v) for k, v in points.items()}


def build_profile(root: Path, model: str, hardware: str, tp: int = 1, *, source_model: str | None = None,
                  network: str | None = None) -> dict:
    prof = _profiling(root)
    root = prof.parent
    hw = hardware.lower()
    devices = sorted(p.name for p in (prof / "compute").iterdir() if p.is_dir())
    if hw not in HARDWARE:
        raise SourceDataError(
            f"unknown hardware {hardware!r} for Vidur; known: {', '.join(sorted(HARDWARE))} "
            f"(device folders under {prof / 'compute'}: {', '.join(devices)})"
        )
    device = HARDWARE[hw]
    if device not in devices:
        raise SourceDataError(f"no Vidur compute profile for {hw!r}: {prof / 'compute' / device} does not exist; "
                              f"device folders: {', '.join(devices)}")
    if source_model:
        folder, shape, alias = source_model, None, None
    elif model in MODELS:
        folder, shape, alias = MODELS[model]
    else:
        raise SourceDataError(f"unknown model {model!r} for Vidur; known: {', '.join(sorted(MODELS))} "
                              f"(or name the source folder with --source-model <org>/<name>)")
    mdir = prof / "compute" / device / folder
    mlp_path = mdir / "mlp.csv"
    if not mlp_path.is_file():
        have = sorted(p.parent.relative_to(prof / "compute" / device).as_posix()
                      for p in (prof / "compute" / device).glob("*/*/mlp.csv"))
        raise SourceDataError(f"no {mlp_path}; models profiled on {device}: {', '.join(have) or 'none'}")

    notes: list[str] = []
    files: list[dict] = []
    tables: dict[str, dict] = {}

    # ---- linear ops ------------------------------------------------------------------------------
    rows = _read_csv(mlp_path)
    cols = [f"time_stats.{op}.median" for ops in MLP_MAP.values() for op in ops]
    _need_cols(mlp_path, rows, cols + ["num_tokens", "num_tensor_parallel_workers", *SHAPE_COLS])
    tps = sorted({int(r["num_tensor_parallel_workers"]) for r in rows})
    if tp not in tps:
        raise SourceDataError(f"{mlp_path}: no rows for TP {tp}; TP degrees present: {tps}")
    sel = [(i + 2, r) for i, r in enumerate(rows) if int(r["num_tensor_parallel_workers"]) == tp]
    src_shape = {c: int(sel[0][1][c]) for c in SHAPE_COLS}
    if shape is not None and src_shape != shape:
        raise SourceDataError(f"{mlp_path}: shape {src_shape} is not the expected {shape} for {model!r}")
    notes.append(check_model_shape(model, {
        "hidden_size": src_shape["n_embd"], "num_attention_heads": src_shape["n_head"],
        "num_kv_heads": src_shape["n_kv_head"], "intermediate_size": src_shape["n_expanded_embd"],
    }, str(mlp_path)))
    per_op: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line, r in sel:
        n = int(num(r["num_tokens"], mlp_path, line, "num_tokens"))
        for c in cols:
            per_op[c][n].append(num(r[c], mlp_path, line, c) * MS)
    med = {c: _dedup(v) for c, v in per_op.items()}
    ntoks = sorted(med[cols[0]])
    for t, ops in MLP_MAP.items():
        tables[t] = table_1d("num_tokens", {n: sum(med[f"time_stats.{op}.median"][n] for op in ops) for n in ntoks})
    dups = sum(1 for v in per_op[cols[0]].values() if len(v) > 1)
    files.append(_rec(mlp_path, root))

    # ---- attention (only where the source has it, never under a shape alias) ---------------------
    attn_path = mdir / "attention.csv"
    attn_note = None
    if attn_path.is_file() and alias is None:
        arows = _read_csv(attn_path)
        _need_cols(attn_path, arows, ["num_tensor_parallel_workers", "is_prefill", "batch_size", "prefill_chunk_size",
                                      "kv_cache_size", "time_stats.attn_prefill.median", "time_stats.attn_decode.median",
                                      "n_q_head", "n_kv_head", "n_embd"])
        asel = [(i + 2, r) for i, r in enumerate(arows) if int(r["num_tensor_parallel_workers"]) == tp]
        if asel:
            a0 = asel[0][1]
            if (int(a0["n_q_head"]), int(a0["n_kv_head"]), int(a0["n_embd"])) != (
                    src_shape["n_head"], src_shape["n_kv_head"], src_shape["n_embd"]):
                raise SourceDataError(f"{attn_path}: attention shape differs from {mlp_path}")
            pre: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
            dec: dict[tuple[int, int], list[float]] = defaultdict(list)
            for line, r in asel:
                kv = int(num(r["kv_cache_size"], attn_path, line, "kv_cache_size"))
                if r["is_prefill"] == "True":
                    c = int(num(r["prefill_chunk_size"], attn_path, line, "prefill_chunk_size"))
                    pre[c][c + kv].append(num(r["time_stats.attn_prefill.median"], attn_path, line, "attn_prefill.median") * MS)
                else:
                    b = int(num(r["batch_size"], attn_path, line, "batch_size"))
                    dec[(b, kv + 1)].append(num(r["time_stats.attn_decode.median"], attn_path, line, "attn_decode.median") * MS)
            cells, counts = resample_rows({c: _dedup(row) for c, row in pre.items()})
            tables["attention.prefill.flash"] = table_2d("chunk_tokens", "kv_tokens", cells)
            tables["attention.decode.none"] = table_2d("batch_size", "kv_tokens", _dedup(dec))
            attn_note = (
                f"attention from {attn_path.relative_to(root).as_posix()} (TP {tp} rows, FLASH_ATTENTION backend, "
                f"block 16): prefill cells measured {counts['measured_cells']}, interpolated "
                f"{counts['interpolated_cells']} (log-log along kv_tokens between two measured points of the same "
                f"chunk row, never extrapolated; rows are measured at kv_cache_size steps of 32/64, so chunk rows "
                f"that are not multiples of 32 and the step-64 region need it); cells with kv_tokens < chunk_tokens "
                f"or chunk + kv_cache > 4096 are null. Decode: full batch 1..128 x kv grid, kv_tokens = "
                f"kv_cache_size + 1. Times are attn_prefill / attn_decode medians only (the flash_attn_with_kvcache "
                f"call, which also appends the new K/V to the paged cache); attn_input_reshape / "
                f"attn_output_reshape are left out, as Vidur's own predictor does."
            )
            files.append(_rec(attn_path, root, attn=True))
        else:
            attn_note = f"{attn_path.relative_to(root).as_posix()} has no TP {tp} rows: attention tables absent (roofline)"
    elif alias is not None:
        attn_note = "attention tables absent: never imported under a shape alias"
    else:
        attn_note = f"no attention.csv for {device}/{folder}: attention tables absent (roofline fallback)"
    notes.append(attn_note)

    # ---- communication ---------------------------------------------------------------------------
    net_used = None
    if tp > 1:
        ndir, why = _network_dir(prof, device, tp, network)
        if ndir is None:
            notes.append(f"comm.all_reduce absent: {why}")
        else:
            f = ndir / "all_reduce.csv"
            nrows = _read_csv(f)
            _need_cols(f, nrows, ["num_workers", "devices_per_node", "size", "collective", "time_stats.all_reduce.median"])
            pts: dict[int, list[float]] = defaultdict(list)
            for i, r in enumerate(nrows):
                if r["collective"] == "all_reduce" and int(r["num_workers"]) == tp and int(r["devices_per_node"]) == tp:
                    pts[int(num(r["size"], f, i + 2, "size"))].append(num(r["time_stats.all_reduce.median"], f, i + 2, "median") * MS)
            tables["comm.all_reduce"] = table_1d("num_bytes", _dedup(pts))
            net_used = ndir.name
            notes.append(
                f"comm.all_reduce from {f.relative_to(root).as_posix()}: rows with num_workers = devices_per_node = {tp} "
                f"(one node, as Vidur selects them); size is bytes of an fp16 buffer; each source sample is the "
                f"median NCCL kernel time of 11 back-to-back all_reduces, the column used is the median of 3 such samples"
            )
            files.append(_rec(f, root))
    else:
        notes.append("TP 1: no all-reduce, comm.all_reduce absent")

    notes.append(
        "not in the source, absent here: linear.lm_head, step.final_norm, step.sampler, step_overhead_s "
        "(Vidur times GPU operators only; its CPU-overhead profile is not part of this data)"
    )
    notes.append(
        "linear.other holds one residual add: Vidur's profiled block (post_attn_norm path) times only the "
        "second residual add of the layer (add); the first, same-shaped add after attention is not timed"
    )
    if dups:
        notes.append(f"{dups} num_tokens values appear twice in mlp.csv for TP {tp}; combined by the median of the two medians")
    if alias:
        notes.append(alias)
    if tp > 1:
        notes.append(f"TP {tp}: mlp.csv rows are one rank's operators with heads, MLP width and vocab split {tp} ways "
                     f"(measured on one GPU); the all-reduces are only in comm.all_reduce")

    mapping = {t: [f"time_stats.{op}.median" for op in ops] for t, ops in MLP_MAP.items()}
    if "attention.prefill.flash" in tables:
        mapping["attention.prefill.flash"] = ["time_stats.attn_prefill.median"]
        mapping["attention.decode.none"] = ["time_stats.attn_decode.median"]
    if "comm.all_reduce" in tables:
        mapping["comm.all_reduce"] = ["time_stats.all_reduce.median"]
    name_model = model
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": f"{hw}-{name_model}-tp{tp}-vidur",
        "model": model,
        "hardware": hw,
        "tensor_parallel_size": tp,
        "dtype": "float16",
        "provenance": {
            "source": "imported: vidur",
            "importer": "kvprof import vidur",
            "source_repo": REPO,
            "source_commit": COMMIT,
            "source_model": folder,
            "source_device": device,
            "source_network": net_used,
            "licence": LICENCE,
            "files": files,
            "statistic": "median (time_stats.<op>.median); mlp ops: median of 20 timed runs (torch profiler "
                         "record_function CUDA time), attention: of 5 (kineto), all_reduce: of 3",
            "units": "source milliseconds converted to seconds (x 1e-3), rounded to 6 significant digits",
            "mapping": mapping,
            "notes": notes,
            "command": None,
        },
        "tables": tables,
    }


def _rec(path: Path, root: Path, attn: bool = False) -> dict:
    sha = sha256_of(path)
    if attn and sha in KNOWN_ATTN:
        up = {"repo": ATTN_REPO, "commit": ATTN_COMMIT, "path": KNOWN_ATTN[sha], "licence": ATTN_LICENCE,
              "note": "the TP-1 rows of Vidur's A40 Llama-2-7b-hf attention profile, as re-dumped by that fork's "
                      "predictor (4 derived columns appended); see the source folder's PROVENANCE.md"}
    elif sha in KNOWN:
        up = {"repo": REPO, "commit": COMMIT, "path": KNOWN[sha], "licence": LICENCE}
    else:
        up = {"note": "bytes not among the Vidur files this importer knows; origin unverified"}
    return file_record(path, root, up)
