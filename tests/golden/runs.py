"""Golden outputs: kvsim's commands on fixed inputs, recorded before issue 17's redesign, so that any later
change to how a run is wired, parsed or reported can be shown not to change a single output byte.

    python -m tests.golden.runs --out /tmp/golden              # run everything, write the outputs
    python -m tests.golden.runs --out /tmp/golden --record     # ... and rewrite tests/golden/manifest.json

Each run is a ``kvsim`` command line, executed in-process through ``kvsim.cli.main``; its stdout is kept
as ``stdout.txt``. The manifest holds the sha256 of every output file after :func:`normalise` removes what
a clock decides (``sim.wall_s``, a sweep cell's ``elapsed_s``, vLLM's result ``date``, the wall time a
command prints); everything else must match byte for byte (tests/test_golden.py). Pictures (.png) are
not compared, nor is results.parquet (results.csv holds the same rows). Runs that read ../shared are skipped where it is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
MANIFEST = Path(__file__).resolve().parent / "manifest.json"
SAMPLE = "traces/sample.jsonl"
MOONCAKE = "{shared}/traces/mooncake_fast25/conversation_trace.jsonl"
AZURE = "{shared}/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
VALIDATION = "{shared}/validation"
CASES = ["ist_h100_llama-2-7b-tp1-codegen", "ist_h100_llama-2-7b-tp1-general", "ist_h100_llama-2-7b-tp1-roleplay",
         "ist_h100_mixtral-8x7b-v0-1-tp2-codegen", "ist_h100_mixtral-8x7b-v0-1-tp2-general",
         "ist_h100_mixtral-8x7b-v0-1-tp2-roleplay", "lss_rtx4090_llama31-8b_tp1_mns128",
         "lss_rtx4090_llama31-8b_tp1_mns256", "lss_rtxpro6000_llama31-8b_tp1",
         "lss_rtxpro6000_qwen3-30b-a3b_dp2ep2", "lss_rtxpro6000_qwen3-32b_tp2"]

#: every method at its default implementation, then the other implementations
METHODS = ["none", "fp8", "kivi", "kivi:bits=4", "gear", "h2o", "h2o_kivi", "streamingllm", "snapkv", "pyramidkv",
           "kivi:impl=reference", "h2o:impl=reference", "streamingllm:impl=sliding", "snapkv:impl=reference",
           "gear:impl=reference", "h2o_kivi:impl=reference", "pyramidkv:impl=reference", "fp8:impl=software",
           "fp8:impl=triton"]


def _replay(trace, *args):
    return ["replay", trace, "--out", "{out}", "--quiet", *args]


#: name -> kvsim argv ({out}: the run's output folder, {shared}: ../shared, {tmp}: a scratch folder, {profiles}: the
#: committed profiles)
RUNS: dict[str, list[str]] = {
    # every method, one table and one replay folder each, on the same trace and seed
    "compare_methods": ["compare", SAMPLE, "--limit", "120", "--methods", ",".join(METHODS), "--out", "{out}", "--quiet"],
    # the same methods under memory pressure (preemption by recompute; contiguous reservations)
    "compare_methods_preempt": ["compare", SAMPLE, "--limit", "100", "--methods", ",".join(METHODS),
                                "--num-gpu-blocks-override", "300", "--out", "{out}", "--quiet"],
    "replay_default": _replay(SAMPLE, "--result-format", "vllm"),
    "replay_preempt": _replay(SAMPLE, "--limit", "150", "--num-gpu-blocks-override", "400"),
    "replay_preempt_prefill_first": _replay(SAMPLE, "--limit", "150", "--num-gpu-blocks-override", "400",
                                            "--scheduler", "prefill-first"),
    "replay_unchunked": _replay(SAMPLE, "--limit", "150", "--no-enable-chunked-prefill", "--max-model-len", "8192"),
    # --config: kvsim had no --async-scheduling flag when these were recorded
    "replay_async": _replay(SAMPLE, "--limit", "150", "--config", "{tmp}/async.yaml", "--method", "kivi"),
    "replay_tp4_70b": _replay(SAMPLE, "--limit", "150", "--model", "llama-3.1-70b", "--tensor-parallel-size", "4",
                              "--method", "h2o"),
    "replay_tp2_profile": _replay(SAMPLE, "--limit", "150", "--model", "llama-2-7b", "--hardware", "a100",
                                  "--tensor-parallel-size", "2"),
    "replay_profile_4090": _replay(SAMPLE, "--limit", "150", "--hardware", "rtx-4090", "--method", "snapkv"),
    "replay_profile_h200_kvprof": _replay(SAMPLE, "--limit", "150", "--hardware", "h200", "--method", "kivi:bits=4",
                                          "--profile", "{profiles}/kvprof/h200__llama-3.1-8b__tp1.json"),
    "replay_replicas_rr": _replay(SAMPLE, "--num-replicas", "3", "--router", "round-robin", "--rate-scale", "4"),
    "replay_replicas_lot": _replay(SAMPLE, "--num-replicas", "2", "--rate-scale", "4", "--method", "streamingllm"),
    "replay_dp_ep_lockstep": _replay(SAMPLE, "--limit", "200", "--model", "qwen3-30b-a3b", "--hardware",
                                     "rtx-pro-6000", "--data-parallel-size", "2", "--enable-expert-parallel",
                                     "--rate-scale", "3"),
    "replay_dp_ep_lockstep_vllm_dp": _replay(SAMPLE, "--limit", "200", "--model", "qwen3-30b-a3b", "--hardware",
                                             "h100", "--data-parallel-size", "2", "--tensor-parallel-size", "2",
                                             "--enable-expert-parallel", "--router", "vllm-dp", "--num-replicas", "2",
                                             "--rate-scale", "5"),
    "replay_dp_dense": _replay(SAMPLE, "--limit", "200", "--data-parallel-size", "2", "--rate-scale", "3"),
    "replay_engine_lmdeploy": _replay(SAMPLE, "--limit", "150", "--engine", "lmdeploy-0.6", "--model", "llama-2-7b",
                                      "--hardware", "rtx-a6000", "--method", "kivi"),
    "replay_prefix_mooncake": _replay(MOONCAKE, "--limit", "300"),
    "replay_prefix_mooncake_async": _replay(MOONCAKE, "--limit", "200", "--config", "{tmp}/async.yaml",
                                           "--num-replicas", "2"),
    "replay_prefix_mooncake_h2o": _replay(MOONCAKE, "--limit", "200", "--method", "h2o"),
    "replay_azure": _replay(AZURE, "--limit", "2000", "--lengths", "published", "--method", "gear"),
    "replay_lengths_trace": _replay(SAMPLE, "--limit", "100", "--lengths", "trace", "--method", "h2o",
                                    "--slo", "ttft_ms=500,tpot_ms=50"),
    # disaggregated prefill/decode and the CPU KV tier (issue 19): recorded on main when it landed there
    "replay_pd_whole": _replay(SAMPLE, "--limit", "120", "--num-prefill-instances", "1", "--num-decode-instances", "2",
                               "--kv-transfer-link", "rdma-100g", "--method", "kivi"),
    "replay_pd_layerwise": _replay(SAMPLE, "--limit", "120", "--num-prefill-instances", "2", "--num-decode-instances",
                                   "1", "--kv-transfer-link", "pcie-gen5-x16", "--kv-transfer-mode", "layerwise",
                                   "--decode-tensor-parallel-size", "2"),
    "replay_cpu_tier": _replay(MOONCAKE, "--limit", "200", "--kv-offloading-size", "8", "--num-gpu-blocks-override",
                               "3000"),
    "validate_all": ["validate", *(f"{VALIDATION}/{c}" for c in CASES), "--out", "{out}", "--quiet", "--no-plot"],
    "validate_roofline": ["validate", f"{VALIDATION}/lss_rtx4090_llama31-8b_tp1_mns128",
                          f"{VALIDATION}/ist_h100_llama-2-7b-tp1-roleplay", "--no-profile", "--arrivals", "workload",
                          "--out", "{out}", "--quiet", "--no-plot"],
    "bench_sweep": ["bench", "--method", ",".join(METHODS), "--batch-size", "1,8,32", "--prompt-len", "512,2048",
                    "--output-len", "64", "--out", "{out}", "--quiet"],
    "bench_lmdeploy": ["bench", "--engine", "lmdeploy-0.6", "--model", "llama-2-7b", "--hardware", "rtx-a6000",
                       "--method", "none,kivi,gear,h2o,streamingllm", "--batch-size", "1,16", "--prompt-len",
                       "1024", "--out", "{out}", "--quiet"],
    "fit_methods": ["fit-methods", "--no-plot", "--quiet", "--out", "{out}"],
    "plan": ["plan", SAMPLE, "--limit", "100", "--slo", "ttft_ms:p99=3000,tpot_ms:p99=80", "--methods", "none,kivi",
             "--max-replicas", "4", "--out", "{out}", "--quiet"],
    "sweep": ["sweep", "{tmp}/grid.yaml", "--out", "{out}", "--jobs", "1", "--quiet"],
    "methods": ["methods", "--model", "llama-3.1-8b"],
    "models": ["models"],
    "hardware": ["hardware"],
    "trace_stats": ["trace", "stats", SAMPLE],
}

GRID_YAML = """\
trace: traces/sample.jsonl   # relative: found from the repository root, the runs' working folder
limit: 60
slo: ttft_ms:p99=2000
method: [none, "h2o:budget=128"]
max_num_seqs: [8, 64]
"""


def needs_shared(argv: list[str]) -> bool:
    return any("{shared}" in a for a in argv) or argv[0] in ("validate", "fit-methods")


#: what a clock decides, dropped before comparing
WALL_KEYS = {"wall_s", "sim_wall_s", "elapsed_s", "date"}
WALL_COLUMNS = {"sim_wall_s", "elapsed_s", "wall_s"}
_WALL_TEXT = [(re.compile(r"in [0-9.]+ s wall"), "in <wall> s wall"),
              (re.compile(r"replays in [0-9.]+ s"), "replays in <wall> s")]


def _drop(x):
    if isinstance(x, dict):
        return {k: _drop(v) for k, v in x.items() if k not in WALL_KEYS}
    if isinstance(x, list):
        return [_drop(v) for v in x]
    return x


def normalise(path: Path) -> bytes:
    """A file's bytes with wall-clock values taken out."""
    data = path.read_bytes()
    if path.suffix == ".json":
        return json.dumps(_drop(json.loads(data)), indent=1, sort_keys=True).encode()
    if path.suffix == ".jsonl":
        return b"".join(json.dumps(_drop(json.loads(line)), sort_keys=True).encode() + b"\n"
                        for line in data.splitlines() if line.strip())
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(data.decode())))
        if rows and WALL_COLUMNS & set(rows[0]):
            keep = [i for i, c in enumerate(rows[0]) if c not in WALL_COLUMNS]
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows([[r[i] for i in keep if i < len(r)] for r in rows])
            return buf.getvalue().encode()
        return data
    if path.suffix in (".txt", ".md"):
        text = data.decode()
        for pat, rep in _WALL_TEXT:
            text = pat.sub(rep, text)
        return text.encode()
    return data


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix not in (".png", ".parquet"):
            out[str(p.relative_to(folder))] = hashlib.sha256(normalise(p)).hexdigest()
    return out


def run_one(name: str, out_root: Path) -> dict[str, str]:
    """Run one golden command into ``out_root/name``; the digests of what it wrote."""
    from kvsim.cli import main

    out = out_root / name
    tmp = out_root / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "grid.yaml").write_text(GRID_YAML)
    (tmp / "async.yaml").write_text("async_scheduling: true\n")
    # the committed profiles' folder (kvsim/profiles since issue 17; profiles/ before, for the "before" runs)
    profiles = "kvsim/profiles" if (REPO / "kvsim" / "profiles").is_dir() else "profiles"
    argv = [a.format(out=out, shared=SHARED, tmp=tmp, profiles=profiles) for a in RUNS[name]]
    buf = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"golden run {name}: kvsim {' '.join(argv)} exited {rc}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stdout.txt").write_text(buf.getvalue().replace(str(out), "{out}").replace(str(SHARED), "{shared}")
                                    .replace(str(tmp), "{tmp}").replace(str(REPO), "{repo}"))
    return digests(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for every run's outputs")
    p.add_argument("--record", action="store_true", help="rewrite tests/golden/manifest.json from this run")
    p.add_argument("runs", nargs="*", help="run only these (default: all)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    names = a.runs or list(RUNS)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    bad = 0
    for name in names:
        if needs_shared(RUNS[name]) and not SHARED.is_dir():
            print(f"{name}: skipped ({SHARED} absent)")
            continue
        got = run_one(name, out)
        if a.record:
            manifest[name] = got
            print(f"{name}: recorded {len(got)} files")
            continue
        want = manifest.get(name)
        diff = sorted(k for k in set(got) | set(want or {}) if (want or {}).get(k) != got.get(k))
        bad += bool(diff)
        print(f"{name}: {'identical' if not diff else 'DIFFERS: ' + ', '.join(diff[:8])} ({len(got)} files)")
    if a.record:
        MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
