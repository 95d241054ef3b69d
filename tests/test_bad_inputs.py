"""Every CLI entry point on a corpus of bad inputs (``tests/data/bad/``): exit code 2, a message that names
the file, line and field where there is one, and never a traceback.

Each case is (entry point, arguments, fragments the error message must contain). ``{bad}`` is the corpus
folder, ``{tmp}`` a fresh folder, ``{copy}`` a copy of the corpus entry named by ``copy=`` (for commands that
write into their input folder). Grow the corpus whenever a new class of bad input is found: a file in
``tests/data/bad/`` that no case uses, or an entry point with options and no case, fails
``test_corpus_covers_every_file_and_entry_point``.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import profiler.cli
from kvsim.cli import build_parser
from kvsim.cli import main as kvsim_main

BAD = Path(__file__).resolve().parent / "data" / "bad"
REPO = Path(__file__).resolve().parents[1]
SAMPLE = str(REPO / "traces" / "sample.jsonl")
PROFILE_4090 = str(REPO / "kvsim" / "profiles" / "imported" / "rtx-4090__llama-3.1-8b__tp1.json")


@dataclass
class Case:
    prog: str  # "kvsim" or "kvprof"
    argv: list
    expect: list = field(default_factory=list)
    copy: str | None = None  # corpus entry copied to {copy} first

    @property
    def id(self) -> str:
        words = [a for a in self.argv if not a.startswith("{tmp}")]
        return f"{self.prog} " + " ".join(w.replace("{bad}/", "") for w in words)[:90]


def replay(*args, expect):
    return Case("kvsim", ["replay", *args, "--out", "{tmp}/out", "--quiet"], expect)


def run_args(*args, expect):
    """Bad options on a good trace."""
    return replay(SAMPLE, "--limit", "5", *args, expect=expect)


CASES = [
    # -- traces: file, line and field --------------------------------------------------------------------------
    replay("{bad}/traces/bad_field.jsonl", expect=["bad_field.jsonl:2:", "field 'prompt_tokens'"]),
    replay("{bad}/traces/bad_json.jsonl", expect=["bad_json.jsonl:3:", "not valid JSON"]),
    replay("{bad}/traces/non_utf8.jsonl", expect=["non_utf8.jsonl:2:", "UTF-8"]),
    replay("{bad}/traces/not_gzip.jsonl.gz", expect=["not_gzip.jsonl.gz:1:", "not a valid gzip file"]),
    replay("{bad}/traces/truncated.jsonl.gz", "--format", "kvsim",
           expect=["truncated.jsonl.gz:", "truncated .gz"]),
    replay("{bad}/traces/azure_bad_header.csv", "--format", "azure",
           expect=["azure_bad_header.csv:1:", "field 'TIMESTAMP'"]),
    replay("{bad}/traces/azure_bad_row.csv", expect=["azure_bad_row.csv:3:", "field 'TIMESTAMP'"]),
    replay("{bad}/traces/mooncake_bad.jsonl", expect=["mooncake_bad.jsonl:2:", "field 'hash_ids'"]),
    replay("{bad}/traces/unknown_format.txt", expect=["unknown_format.txt:1:", "cannot detect the trace format"]),
    replay("{bad}/traces/time_backwards.jsonl", expect=["time_backwards.jsonl:2:", "field 'arrival_time_s'"]),
    replay("{bad}/traces/negative_output.jsonl", expect=["negative_output.jsonl:2:", "field 'output_tokens'"]),
    replay("{bad}/traces", expect=["traces", "is a folder"]),
    Case("kvsim", ["replay", SAMPLE, "--out", "{bad}/configs/bad_value.yaml", "--quiet"],
         ["bad_value.yaml", "is a file, not a folder"]),
    # -- model config.json, engine YAML, profile: file and field ---------------------------------------------------
    run_args("--model", "{bad}/models/moe_experts_not_int.json",
             expect=["moe_experts_not_int.json", "num_local_experts", "'eight'"]),
    run_args("--model", "{bad}/models/sliding_window_not_int.json",
             expect=["sliding_window_not_int.json", "sliding_window", "4096.5"]),
    run_args("--model", "{bad}/models/max_position_not_int.json",
             expect=["max_position_not_int.json", "max_position_embeddings", "'long'"]),
    run_args("--model", "{bad}/models/not_json.json", expect=["not_json.json:", "not valid JSON"]),
    run_args("--config", "{bad}/configs/unknown_key.yaml", expect=["unknown_key.yaml", "'max_num_seq'"]),
    run_args("--config", "{bad}/configs/bad_value.yaml", expect=["bad_value.yaml", "'max_num_seqs'", "'many'"]),
    run_args("--config", "{bad}/configs/seed_negative.yaml", expect=["seed_negative.yaml", "seed=-1"]),
    run_args("--config", "{bad}/configs/not_mapping.yaml", expect=["not_mapping.yaml", "mapping"]),
    run_args("--config", "{bad}/configs/bad_yaml.yaml", expect=["bad_yaml.yaml", "not valid YAML", "line"]),
    run_args("--profile", "{bad}/profiles/bad_schema.json", expect=["bad_schema.json", "'schema'"]),
    run_args("--profile", "{bad}/profiles/bad_table.json", expect=["bad_table.json", "'linear.qkv'"]),
    run_args("--model", "qwen3-32b", "--profile", PROFILE_4090,
             expect=["rtx-4090__llama-3.1-8b__tp1.json", "measured for another setup", "model 'llama-3.1-8b'",
                     "hardware 'rtx-4090'", "--allow-profile-mismatch"]),
    # -- nonsense options: the option and its value --------------------------------------------------------------
    run_args("--rate-scale", "nan", expect=["rate_scale=nan"]),
    run_args("--rate-scale", "inf", expect=["rate_scale=inf"]),
    run_args("--rate-scale", "0", expect=["rate_scale=0"]),
    run_args("--tensor-parallel-size", "3", expect=["tensor_parallel_size=3", "32 attention heads"]),
    replay(SAMPLE, "--limit", "-1", expect=["limit=-1"]),
    run_args("--slo", "ttft_ms=-5", expect=["ttft_ms=-5"]),
    run_args("--method", "h2o:budget=256,budget=512", expect=["'budget' is given twice"]),
    run_args("--seed", "-1", expect=["seed=-1"]),
    # -- disaggregated prefill/decode and the CPU tier (kvsim.transfer) ---------------------------------------
    run_args("--config", "{bad}/configs/pd_bad_value.yaml", expect=["pd_bad_value.yaml", "'num_decode_instances'", "'two'"]),
    run_args("--num-prefill-instances", "2", expect=["num_decode_instances=0", "both sides"]),
    run_args("--num-prefill-instances", "1", "--num-decode-instances", "1", "--kv-transfer-link", "rdma-9000g",
             expect=["unknown link 'rdma-9000g'", "rdma-400g"]),
    run_args("--kv-transfer-mode", "layerwise", expect=["need --num-prefill-instances"]),
    run_args("--kv-offloading-size", "-4", expect=["kv_offloading_size=-4.0", "GiB"]),
    run_args("--kv-offload-gib", "2", "--no-enable-prefix-caching", expect=["kv_offloading_size=2.0", "enable_prefix_caching"]),
    run_args("--num-prefill-instances", "1", "--num-decode-instances", "1", "--decode-tensor-parallel-size", "3",
             expect=["tensor_parallel_size=3", "attention heads"]),
    run_args("--num-prefill-instances", "1", "--num-decode-instances", "1", "--num-replicas", "2",
             expect=["num_replicas=2", "instance counts"]),
    run_args("--scheduler", "prefill-first", "--max-num-batched-tokens", "1024",
             expect=["max_num_batched_tokens=1024", "prefill-first", "raise max_num_batched_tokens"]),
    run_args("--hardware", "rtx-4090", "--no-enable-chunked-prefill",
             expect=["does not fit", "max_num_batched_tokens=131072", "lower max_model_len"]),
    # -- the other kvsim commands ---------------------------------------------------------------------------------
    Case("kvsim", ["trace", "stats", "{bad}/traces/truncated.jsonl.gz"], ["truncated.jsonl.gz:", "truncated"]),
    Case("kvsim", ["trace", "stats", "{bad}/traces"], ["is a folder"]),
    Case("kvsim", ["trace", "gen", "--out", "{bad}/traces", "--num-requests", "3"], ["traces", "is a folder"]),
    Case("kvsim", ["trace", "gen", "--out", "{tmp}/t.jsonl", "--lengths-csv", "{bad}/lengths_bad.csv"],
         ["lengths_bad.csv:3:", "num_decode_tokens"]),
    Case("kvsim", ["compare", SAMPLE, "--methods", "", "--out", "{tmp}/c", "--quiet"], ["give the methods to compare with --methods"]),
    Case("kvsim", ["compare", "{bad}/traces/bad_field.jsonl", "--methods", "none,fp8", "--out", "{tmp}/c",
                   "--quiet"], ["bad_field.jsonl:2:", "field 'prompt_tokens'"]),
    Case("kvsim", ["bench", "--model", "{bad}/models/moe_experts_not_int.json"], ["num_local_experts"]),
    Case("kvsim", ["bench", "--method", "kivi:bits=2,bits=4"], ["'bits' is given twice"]),
    Case("kvsim", ["bench", "--grid", "{bad}/grids/bench_unknown_key.yaml"], ["bench_unknown_key.yaml", "'batchsize'"]),
    Case("kvsim", ["bench", "--engine", "sglang"], ["unknown engine 'sglang'", "lmdeploy-0.6"]),
    Case("kvsim", ["bench", "--method", "kivi:impl=hf"], ["impl='hf'", "lmdeploy, reference"]),
    Case("kvsim", ["fit-methods", "--data", "{bad}/seed_bad_bsz.csv", "--out", "{tmp}/f", "--quiet"],
         ["seed_bad_bsz.csv:2"]),
    Case("kvsim", ["hardware", "h900"], ["unknown hardware 'h900'", "h100"]),
    Case("kvsim", ["models", "bogus-model"], ["unknown model 'bogus-model'", "llama-2-7b"]),
    Case("kvsim", ["methods", "--model", "bogus-model"], ["unknown model 'bogus-model'"]),
    Case("kvsim", ["validate", "{bad}/case_bad_measured", "--no-plot"], ["measured.csv:3", "output_tokens"]),
    Case("kvsim", ["validate", "{bad}/case_bad_run_yaml", "--no-plot"], ["run.yaml", "'max_num_seq'"]),
    Case("kvsim", ["validate", "{bad}/traces"], ["no run.yaml"]),
    Case("kvsim", ["calibrate", "--profiles", "{bad}/profiles/bad_schema.json", "--no-write", "--no-loo",
                   "--out", "{tmp}/cal"], ["bad_schema.json", "'schema'"]),
    Case("kvsim", ["plan", "--trace", "{bad}/traces/bad_field.jsonl", "--slo", "ttft_ms:p99=2000"],
         ["bad_field.jsonl:2:", "field 'prompt_tokens'"]),
    Case("kvsim", ["plan", "--trace", SAMPLE, "--slo", "ttft_ms:p99=-1"], ["limit must be"]),
    Case("kvsim", ["plan", "--trace", SAMPLE, "--slo", "ttft_ms:p99=2000", "--methods", ","], ["names no method"]),
    Case("kvsim", ["plan", "--trace", SAMPLE, "--slo", "ttft_ms:p99=2000", "--rate-scale", "inf"], ["rate_scale=inf"]),
    Case("kvsim", ["sweep", "{bad}/grids/unknown_axis.yaml", "--out", "{tmp}/s"], ["unknown_axis.yaml", "'colour'"]),
    Case("kvsim", ["sweep", "{bad}/grids/no_trace.yaml", "--out", "{tmp}/s"], ["no_trace.yaml", "no 'trace'"]),
    Case("kvsim", ["sweep", "{bad}/grids/bad_method.yaml", "--out", "{tmp}/s"], ["'budget' is given twice"]),
    Case("kvsim", ["sweep", "{bad}/grids/bad_rate.yaml", "--out", "{tmp}/s"], ["bad_rate.yaml", "rate_scale", "nan"]),
    Case("kvsim", ["sweep", "{bad}/grids/bad_engine_value.yaml", "--out", "{tmp}/s"],
         ["bad_engine_value.yaml", "max_num_seqs=-1"]),
    Case("kvsim", ["sweep", str(REPO / "examples" / "grid.yaml"), "--out", "{bad}/lengths_bad.csv"], ["is a file"]),
    Case("kvsim", ["sweep", str(REPO / "examples" / "grid.yaml"), "--out", "{tmp}/s", "--jobs", "0"], ["jobs=0"]),
    Case("kvsim", ["sweep", str(REPO / "examples" / "grid.yaml"), "--out", "{copy}", "--quiet"],
         ["cells.jsonl:2:", "not valid UTF-8"], copy="sweep_cells_non_utf8"),
    # -- kvprof ------------------------------------------------------------------------------------------------------
    Case("kvprof", ["fit", "{bad}/kernels_raw_non_utf8", "--out", "{tmp}/p.json"], ["raw.jsonl:2:", "UTF-8"]),
    Case("kvprof", ["kernels", "--model", "smollm2-135m", "--device", "cpu", "--grid", "tiny", "--no-progress",
                    "--out", "{copy}"], ["raw.jsonl:2:", "UTF-8"], copy="kernels_raw_non_utf8"),
    Case("kvprof", ["kernels", "--model", "{bad}/models/moe_experts_not_int.json", "--dry-run", "--out", "{tmp}/k"],
         ["moe_experts_not_int.json", "num_local_experts"]),
    Case("kvprof", ["step", "--model", "{bad}/models/sliding_window_not_int.json", "--out", "{tmp}/st"],
         ["sliding_window_not_int.json", "sliding_window"]),
    Case("kvprof", ["int4-decode", "--head-dim", "96"], ["--head-dim 96", "power of two"]),
    Case("kvprof", ["lengths", "--summarize-only", "--no-plot", "--out", "{copy}"], ["raw.jsonl:2:", "UTF-8"],
         copy="lengths_raw_non_utf8"),
    Case("kvprof", ["lengths", "--summarize-only", "--no-plot", "--out", "{copy}"],
         ["raw.jsonl:2:", "'output_tokens' is missing"], copy="lengths_raw_missing_field"),
    Case("kvprof", ["lengths", "--seeds", "1,x", "--summarize-only", "--out", "{tmp}/l"], ["--seeds", "'x'"]),
    Case("kvprof", ["import", "vidur", "{bad}/import_empty", "--model", "llama-2-7b", "--hardware", "a100",
                    "--out", "{tmp}/p.json"], ["import_empty"]),
    Case("kvprof", ["replay", "{bad}/traces/bad_field.jsonl", "--tiny", "--device", "cpu", "--out", "{tmp}/r",
                    "--quiet"], ["bad_field.jsonl:2:", "field 'prompt_tokens'"]),
    Case("kvprof", ["replay", "{bad}/traces/truncated.jsonl.gz", "--tiny", "--device", "cpu", "--out", "{tmp}/r",
                    "--quiet"], ["truncated.jsonl.gz:", "truncated .gz"]),
]


def run_entry(prog: str, argv: list) -> int:
    main = kvsim_main if prog == "kvsim" else profiler.cli.main
    try:
        return main(argv)
    except SystemExit as e:  # argparse and a few commands exit directly
        return e.code if isinstance(e.code, int) else 2


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_message_naming_the_place(case, tmp_path, capsys):
    copy = tmp_path / "copy"
    if case.copy:
        shutil.copytree(BAD / case.copy, copy)
    argv = [a.format(bad=BAD, tmp=tmp_path, copy=copy) for a in case.argv]
    rc = run_entry(case.prog, argv)  # an uncaught exception fails the test with its traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc == 2, f"exit code {rc}; stderr: {err}"
    for frag in case.expect:
        assert frag in err, f"{frag!r} not in: {err}"


def _commands_with_options(parser: argparse.ArgumentParser, prefix=()) -> set:
    """Leaf subcommands that take a value (a positional or an option with an argument)."""
    out = set()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out |= _commands_with_options(sub, (*prefix, name))
            return out
    if any(a.nargs != 0 and not isinstance(a, argparse._HelpAction) for a in parser._actions):
        out.add(" ".join(prefix))
    return out


def test_corpus_covers_every_file_and_entry_point():
    used = {a for c in CASES for a in c.argv} | {f"{{bad}}/{c.copy}" for c in CASES if c.copy}
    files = sorted(p.relative_to(BAD).as_posix() for p in BAD.rglob("*") if p.is_file())
    unused = [f for f in files if not any(f"{{bad}}/{f}" == u or f.startswith(u.removeprefix("{bad}/") + "/")
                                          for u in used if u.startswith("{bad}/"))]
    assert not unused, f"corpus files no case uses: {unused}"
    covered = {" ".join(c.argv[:2]) if c.argv[0] == "trace" else c.argv[0] for c in CASES if c.prog == "kvsim"}
    missing = _commands_with_options(build_parser()) - covered
    assert not missing, f"kvsim commands with no bad-input case: {sorted(missing)}"
    missing = set(profiler.cli.SUBCOMMANDS) - {c.argv[0] for c in CASES if c.prog == "kvprof"}
    assert not missing, f"kvprof commands with no bad-input case: {sorted(missing)}"
