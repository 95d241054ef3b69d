"""A user's first hour (issue 16): every option honoured or refused, output lengths a server could
produce, one definition of KV bytes saved, commands that talk back, vLLM-shaped results. Mostly at the
command line, where the user meets them."""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvsim.cli import build_parser, main

from conftest import FakeCost, make_engine, make_request, run_sim

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "traces" / "sample.jsonl"
LENGTHS_PROFILE = REPO / "kvsim" / "profiles" / "lengths" / "smollm2-135m-instruct.json"


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def rows(out_dir) -> list[dict]:
    with open(Path(out_dir) / "requests.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_trace(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# -- 1. --config: every key honoured (flags win) or refused --------------------------------------------------
def test_config_file_run_keys_are_honoured(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: meta-llama/Llama-3.1-8B-Instruct\nhardware: a100\nmethod: kivi:bits=2\n"
                   "dtype: bfloat16\nmax_num_seqs: 8\n")
    out = tmp_path / "out"
    rc, _, err = run(capsys, "replay", SAMPLE, "--limit", 20, "--quiet", "--out", out, "--config", cfg)
    assert rc == 0, err
    s = summary(out)
    assert (s["model"], s["hardware"], s["dtype"]) == ("llama-3.1-8b", "a100", "bfloat16")
    assert s["method"] == "kivi:bits=2,group_size=32,residual_length=128,impl=lmdeploy"
    assert s["engine"]["max_num_seqs"] == 8


def test_config_file_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("hardware: a100\nmethod: kivi:bits=2\nmax_num_seqs: 8\n")
    out = tmp_path / "out"
    rc, _, err = run(capsys, "replay", SAMPLE, "--limit", 10, "--quiet", "--out", out, "--config", cfg,
                     "--hardware", "l40s", "--method", "fp8", "--max-num-seqs", 4)
    assert rc == 0, err
    s = summary(out)
    assert (s["hardware"], s["method"], s["engine"]["max_num_seqs"]) == ("l40s", "fp8:impl=auto", 4)


@pytest.mark.parametrize("text,named", [
    ("gpu: {sku: H100}\n", "'gpu'"),                         # describes a measured run; means nothing here
    ("max_num_seq: 8\n", "'max_num_seq'"),                     # a typo
    ("dtype: float32\n", "float32"),                           # not modelled: refused, not run as bf16
])
def test_config_file_refuses_what_it_cannot_honour(tmp_path, capsys, text, named):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    rc, _, err = run(capsys, "replay", SAMPLE, "--quiet", "--out", tmp_path / "out", "--config", cfg)
    assert rc == 2
    assert str(cfg) in err and named in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_config_file_method_list_feeds_compare_and_plan(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: [none, 'h2o:budget=128']\nhardware: l40s\n")
    out = tmp_path / "cmp"
    rc, _, err = run(capsys, "compare", SAMPLE, "--limit", 10, "--quiet", "--out", out, "--config", cfg)
    assert rc == 0, err
    with open(out / "compare.csv") as f:
        methods = [r["method"] for r in csv.DictReader(f)]
    assert methods == ["none", "h2o:budget=128,window=32,impl=lmdeploy"]
    rc, _, err = run(capsys, "replay", SAMPLE, "--quiet", "--out", tmp_path / "r", "--config", cfg)
    assert rc == 2 and "one method" in err


def test_bench_takes_the_config_file_too(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("hardware: a100\nmethod: fp8\n")
    rc, out, err = run(capsys, "bench", "--config", cfg, "--json", "--batch-size", 2, "--prompt-len", 64,
                       "--output-len", 4)
    assert rc == 0, err
    r = json.loads(out)
    assert (r["hardware"], r["method"]) == ("a100", "fp8:impl=software")


# -- 2. output lengths a server could produce ------------------------------------------------------------------
def test_length_source_measured_only_on_its_model(tmp_path, capsys):
    got = {}
    for model, extra in (("llama-3.1-8b", []), ("smollm2-135m", []),
                         ("llama-3.1-8b", ["--lengths", LENGTHS_PROFILE]), ("llama-3.1-8b", ["--lengths", "trace"])):
        out = tmp_path / f"{model}-{len(extra)}-{extra[-1] if extra else ''}".replace("/", "_")
        rc, _, err = run(capsys, "replay", SAMPLE, "--limit", 30, "--quiet", "--out", out, "--model", model,
                         "--method", "kivi:bits=2", "--hardware", "h100", *extra)
        assert rc == 0, err
        got[(model, str(extra[-1]) if extra else "")] = summary(out)
    assert got[("llama-3.1-8b", "")]["output_length_source_kind"] == "published"        # SmolLM2's ratios stay home
    assert got[("smollm2-135m", "")]["output_length_source_kind"] == "measured"
    assert "smollm2-135m-instruct" in got[("smollm2-135m", "")]["output_length_source"]
    assert got[("llama-3.1-8b", str(LENGTHS_PROFILE))]["output_length_source_kind"] == "measured"  # asked for
    t = got[("llama-3.1-8b", "trace")]
    assert t["output_length_source_kind"] == "unchanged" and t["mean_output_length_change"] == 0.0


def test_methods_listing_says_which_source_a_model_gets(capsys):
    rc, out, _ = run(capsys, "methods", "--model", "llama-3.1-8b")
    assert rc == 0
    block = out.split("\nkivi\n", 1)[1].split("\n\n", 1)[0]
    assert "for llama-3.1-8b: published default, mean x1.62" in block
    rc, out, _ = run(capsys, "methods", "--model", "smollm2-135m")
    block = out.split("\nkivi\n", 1)[1].split("\n\n", 1)[0]
    assert "for smollm2-135m: measured on smollm2-135m-instruct: mean x1.26" in block
    assert "max x19.69" in out  # the tail is shown, not hidden behind a mean


def test_no_generated_length_exceeds_the_servers_bound(tmp_path, capsys):
    # long answers near the context limit under KIVI's published +62 % (lognormal tail to ~10x)
    trace = write_trace(tmp_path / "t.jsonl", [
        {"arrival_time_s": 0.05 * i, "prompt_tokens": 200 + 5 * i, "output_tokens": 300 + 10 * i,
         **({"max_tokens": 400 + 10 * i} if i % 3 == 0 else {})} for i in range(60)])
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "replay", trace, "--quiet", "--out", out, "--method", "kivi:bits=2",
                          "--max-model-len", 1536)
    assert rc == 0, err
    s = summary(out)
    by_id = {str(i): i for i in range(60)}
    capped_seen = 0
    for r in rows(out):
        assert r["status"] == "completed"
        i = by_id[r["request_id"]]
        bound = 1536 - int(r["prompt_tokens"])
        if i % 3 == 0:
            bound = min(bound, 400 + 10 * i)
        assert int(r["output_tokens"]) <= bound
        capped_seen += int(r["output_tokens"]) == bound
    assert 0 < s["num_output_length_capped"] <= capped_seen
    assert f"{s['num_output_length_capped']} cut at max_tokens / max_model_len" in stdout


def test_trace_max_tokens_below_output_tokens_is_a_bad_line(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl", [{"arrival_time_s": 0, "prompt_tokens": 10, "output_tokens": 50,
                                                "max_tokens": 20}])
    rc, _, err = run(capsys, "replay", trace, "--quiet", "--out", tmp_path / "out")
    assert rc == 2 and f"{trace}:1: field 'output_tokens'" in err and "max_tokens=20" in err


# -- 3. one definition of KV bytes saved ------------------------------------------------------------------------
@pytest.mark.parametrize("fast_forward", [False, True])
def test_kv_bytes_saved_hand_computed(fast_forward):
    """streamingllm sink 4 + window 4, one request of 8 prompt and 6 output tokens, FakeCost step times:
    prefill 1/64 + 8/1024 s holding 8 tokens; five decode steps of 1/64 + 1/1024 + 8/16384 s, each holding
    8 kept tokens while the full cache holds 9..13."""
    e = make_engine(method="streamingllm:sink=4,window=4,impl=sliding", fast_forward=fast_forward)
    run_sim([e], [make_request("a", 0.0, 8, 6)])
    assert e.rec.completed == 1
    unit = 256 / 16384  # TINY's bytes per token x the time unit 1/16384 s
    held = (8 * 384 + 5 * 8 * 280) * unit
    full = (8 * 384 + (9 + 10 + 11 + 12 + 13) * 280) * unit
    assert e.replica.kv_held_byte_s == held and e.replica.kv_full_byte_s == full
    assert (e.replica.peak_kv_held_bytes, e.replica.peak_kv_full_bytes) == (8 * 256, 13 * 256)


@pytest.mark.parametrize("method,lo,hi", [("none", 0.0, 0.0), ("fp8", 0.5, 0.5), ("h2o:budget=128", 0.5, 1.0),
                                          ("streamingllm", 0.5, 1.0), ("snapkv:budget=256", 0.3, 1.0)])
def test_kv_bytes_saved_reported_for_every_kind_of_method(tmp_path, capsys, method, lo, hi):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "replay", SAMPLE, "--limit", 40, "--quiet", "--out", out, "--method", method)
    assert rc == 0, err
    s = summary(out)
    for k in ("kv_bytes_saved_fraction", "kv_bytes_saved_fraction_peak"):
        assert lo <= s[k] <= hi, (k, s[k])
    assert s["peak_kv_held_bytes"] <= s["peak_kv_full_bytes"]
    assert "time-averaged" in stdout and "at peak" in stdout


# -- 5. kvprof replay: checks first, says what it validates, its CPU case validates -----------------------------
def test_kvprof_replay_refuses_what_cannot_fit_and_says_what_it_needs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from profiler.replay import cli as rcli

    monkeypatch.setattr(rcli, "available_cpu_bytes", lambda: 8 * 10**9)
    rc = rcli.main([str(SAMPLE), "--model", "llama-3.1-8b", "--device", "cpu", "--limit", "2", "--quiet",
                    "--out", str(tmp_path / "case")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "32.1 GB" in err and "8.0 GB available" in err and "--tiny" in err
    assert not (tmp_path / "case").exists()
    help_text = rcli.build_parser().format_help()
    assert "not the scheduler" in " ".join(help_text.split())


def test_kvprof_tiny_case_is_readable_by_kvsim_validate(tmp_path, capsys):
    pytest.importorskip("torch")
    from profiler.replay import cli as rcli

    case = tmp_path / "tiny-case"
    assert rcli.main([str(SAMPLE), "--tiny", "--limit", "6", "--quiet", "--out", str(case)]) == 0
    capsys.readouterr()
    moved = tmp_path / "moved"
    case.rename(moved)  # the case names its model config relative to run.yaml
    rc, _, err = run(capsys, "validate", moved, "--quiet", "--no-plot", "--out", tmp_path / "v")
    assert rc == 2 and "--hardware" in err and "CPU" in err
    rc, out, err = run(capsys, "validate", moved, "--hardware", "h100", "--quiet", "--no-plot", "--out", tmp_path / "v")
    assert rc == 0, err
    assert (tmp_path / "v" / "errors.csv").is_file()


# -- 6. progress on long commands ---------------------------------------------------------------------------------
class FakeBar:
    made: list = []

    def __init__(self, *a, **kw):
        self.kw = kw
        self.n = 0
        FakeBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, *a, **kw):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("argv", [
    ["plan", SAMPLE, "--slo", "ttft_ms:p99=5000", "--limit", 20, "--max-replicas", 2],
    ["compare", SAMPLE, "--methods", "none,fp8", "--limit", 10],
    ["validate", "CASE", "--hardware", "h100", "--no-plot"],
    ["sweep", "GRID", "--jobs", 1],
])
def test_long_commands_show_progress_off_when_not_a_terminal(tmp_path, capsys, monkeypatch, argv):
    import tqdm

    if "GRID" in argv:
        grid = tmp_path / "grid.yaml"
        grid.write_text(f"trace: {SAMPLE}\nlimit: 5\nmethod: [none, fp8]\n")
        argv = [grid if a == "GRID" else a for a in argv]
    if "CASE" in argv:
        pytest.importorskip("torch")
        from profiler.replay import cli as rcli

        assert rcli.main([str(SAMPLE), "--tiny", "--limit", "4", "--quiet", "--out", str(tmp_path / "c")]) == 0
        argv = [tmp_path / "c" if a == "CASE" else a for a in argv]
    FakeBar.made = []
    monkeypatch.setattr(tqdm, "tqdm", FakeBar)
    rc, _, err = run(capsys, *argv, "--out", tmp_path / "out")
    assert rc == 0, err
    assert FakeBar.made and all(b.kw.get("disable", False) is None for b in FakeBar.made)  # None: tty only
    assert any(b.n > 0 for b in FakeBar.made)
    FakeBar.made = []
    rc, _, _ = run(capsys, *argv, "--out", tmp_path / "out2", "--quiet")
    assert rc == 0 and not FakeBar.made


def test_calibrate_shows_progress(monkeypatch):
    import tqdm

    from kvsim.cost.calibrate import fitting
    from kvsim.cost.roofline import RooflineParams

    FakeBar.made = []
    monkeypatch.setattr(tqdm, "tqdm", FakeBar)
    tables = fitting.load_tables(None)
    # the fits themselves are calibrate's business (tests/test_calibrate.py); here only the bar is looked at
    monkeypatch.setattr(fitting, "fit_all", lambda t: (RooflineParams(), {"a40": (RooflineParams(), [])}))
    monkeypatch.setattr(fitting, "apply_skew", lambda d, p, l, s: (d, p, l))
    monkeypatch.setattr(fitting, "load_tables", lambda paths: [t for t in tables if t.hardware == "a40"][:2])
    monkeypatch.setattr(fitting, "_errors", lambda t, p, legacy=False: __import__("numpy").zeros(1))
    fitting.run(None, None, loo=True, progress=True)
    (bar,) = FakeBar.made
    assert bar.kw["disable"] is None and bar.n == bar.kw["total"] >= 2


# -- 7. help for every option, listings with sources --------------------------------------------------------------
def _walk(parser, path):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _walk(sub, [*path, name])
        elif not isinstance(a, argparse._HelpAction):
            yield " ".join(path), a


def test_every_option_has_help_and_states_its_default_once():
    parser = build_parser()
    for cmd, a in _walk(parser, ["kvsim"]):
        assert a.help, f"{cmd} {a.option_strings or a.dest} has no help"
    helps = []
    for sub in parser._subparsers._group_actions[0].choices.values():
        helps.append(sub.format_help())
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps += [s.format_help() for s in action.choices.values()]
    for text in helps:
        assert "hardware list" not in text  # no pointer to a command that does not exist
        flat = " ".join(text.split())
        assert "(default: None)" not in flat
        for entry in re.split(r"\n  (?=-)", text):  # one option's entry
            assert " ".join(entry.split()).count("(default") <= 1, entry


def test_models_and_hardware_listings_name_their_sources(capsys):
    from kvsim.specs.hardware import known_hardware
    from kvsim.specs.model import known_models

    rc, out, _ = run(capsys, "models")
    assert rc == 0
    for name in known_models():
        assert f"\n{name} " in out
    assert "meta-llama/Llama-3.1-8B" in out and "kvsim/specs/data/README.md" in out
    rc, out, _ = run(capsys, "hardware")
    assert rc == 0
    for name in known_hardware():
        assert f"\n{name} " in out
    rc, out, _ = run(capsys, "hardware", "h100")
    assert rc == 0 and "source: NVIDIA H100" in out
    rc, out, _ = run(capsys, "models", "meta-llama/Llama-3.1-8B-Instruct")
    assert rc == 0 and "llama-3.1-8b" in out
    rc, _, err = run(capsys, "replay", SAMPLE, "--hardware", "tpu", "--quiet")
    assert rc == 2 and "`kvsim hardware`" in err


# -- 8. one trace argument style ----------------------------------------------------------------------------------
def test_every_trace_reading_command_takes_the_trace_as_first_argument(tmp_path, capsys):
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    for cmd in ("replay", "compare", "plan"):
        pos = [a.dest for a in subs[cmd]._actions if not a.option_strings]
        assert pos[0] == "trace", cmd
    trace_sub = subs["trace"]._subparsers._group_actions[0].choices["stats"]
    assert [a.dest for a in trace_sub._actions if not a.option_strings] == ["trace"]
    rc, out, err = run(capsys, "plan", SAMPLE, "--slo", "ttft_ms:p99=5000", "--limit", 10, "--max-replicas", 2,
                       "--quiet", "--out", tmp_path / "plan")
    assert rc == 0, err
    assert (tmp_path / "plan" / "plan.csv").is_file()


# -- 9. compare output people can read ----------------------------------------------------------------------------
def test_compare_labels_distinct_and_numbers_plain(tmp_path, capsys):
    from kvsim.compare import _fmt, short_label

    specs = ["none", "kivi", "kivi:bits=4", "h2o:budget=128", "h2o:budget=512", "streamingllm:window=124"]
    labels = [short_label(s) for s in specs]
    assert len(set(labels)) == len(labels)
    assert labels[:3] == ["none", "kivi", "kivi:bits=4"]
    assert _fmt(11160.4) == "11,160" and _fmt(0.01234) == "0.0123" and _fmt(45.27) == "45.3"
    out = tmp_path / "cmp"
    rc, stdout, err = run(capsys, "compare", SAMPLE, "--methods", "none,h2o:budget=128,h2o:budget=512",
                          "--limit", 40, "--quiet", "--out", out)
    assert rc == 0, err
    md = (out / "compare.md").read_text()
    assert not re.search(r"\de[+-]\d", md)
    assert "%" in md and "KV saved" in md
    assert (out / "compare.png").stat().st_size > 0


# -- 10. papercuts ----------------------------------------------------------------------------------------------
def test_output_piped_into_a_closed_reader_ends_quietly(monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["methods"]) == 1  # no traceback: the reader left, so the command stops
    # and as a user sees it: `kvsim methods | true` (the reader exits before Python writes)
    p = subprocess.run(["bash", "-c", f"{sys.executable} -m kvsim.cli methods | true; echo rc=${{PIPESTATUS[0]}}"],
                       capture_output=True, text=True, cwd=REPO)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr and "Exception ignored" not in p.stderr
    assert p.stdout.strip() in ("rc=0", "rc=1")


def test_empty_trace_warns(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = run(capsys, "replay", empty, "--quiet", "--out", tmp_path / "out")
    assert rc == 0 and "warning" in err and "no requests" in err


def test_format_detection_error_names_the_flag(tmp_path, capsys):
    bad = tmp_path / "t.txt"
    bad.write_text("hello\n")
    rc, _, err = run(capsys, "replay", bad, "--quiet", "--out", tmp_path / "out")
    assert rc == 2 and "pass --format" in err


def test_progress_total_counts_a_last_line_without_newline(tmp_path):
    from kvsim.replay import _count_lines

    p = tmp_path / "t.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}')
    assert _count_lines(p) == 2
    p.write_text('{"a": 1}\n{"a": 2}\n')
    assert _count_lines(p) == 2


# -- 11. vLLM-shaped results --------------------------------------------------------------------------------------
#: the keys vLLM's benchmarks/benchmark_serving.py writes with --save-result (setup, totals, and
#: mean_/median_/std_/pNN_ per metric with --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 90,99)
VLLM_KEYS = {"date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
             "max_concurrency", "duration", "completed", "total_input_tokens", "total_output_tokens",
             "request_throughput", "request_goodput", "output_throughput", "total_token_throughput"} | {
    f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p90", "p99")}


def test_vllm_result_format(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "replay", SAMPLE, "--limit", 30, "--quiet", "--out", out, "--result-format", "vllm",
                     "--slo", "ttft_ms=500")
    assert rc == 0, err
    s, v = summary(out), json.loads((out / "vllm_result.json").read_text())
    assert VLLM_KEYS <= set(v)
    assert v["duration"] == s["duration_s"] and v["completed"] == s["completed"] == 30
    assert v["mean_ttft_ms"] == s["ttft_ms"]["mean"] and v["p99_itl_ms"] == s["itl_ms"]["p99"]
    assert v["median_e2el_ms"] == s["e2el_ms"]["median"] and v["request_goodput"] == s["goodput"]
    assert v["std_tpot_ms"] > 0
    rc, _, _ = run(capsys, "replay", SAMPLE, "--limit", 5, "--quiet", "--out", tmp_path / "plain")
    assert rc == 0 and (tmp_path / "plain" / "summary.json").is_file()
    assert not (tmp_path / "plain" / "vllm_result.json").exists()  # kvsim's own format unless asked


# -- 12. notebooks and install notes in the README ----------------------------------------------------------------
def test_readme_names_the_notebooks_and_their_extra():
    import tomllib

    readme = (REPO / "README.md").read_text()
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.name}" in readme, nb.name
    assert 'pip install -e ".[notebooks]"' in readme and "jupyter nbconvert --to notebook --execute" in readme
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["notebooks"]
    assert any(d.startswith("nbconvert") for d in extra)
    assert "download.pytorch.org/whl/cpu" in readme
