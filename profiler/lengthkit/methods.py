"""Method settings measured by ``kvprof lengths``: kvsim's registry parses them (one registry for the
simulator and the profiler), :mod:`profiler.methods` checks that ``kvprof lengths`` runs them. A setting's
key in the profile's ``lengths`` section is kvsim's ``Method.algorithm_spec()`` (every knob but ``impl``, in
kvsim's declaration order), exactly what ``kvsim replay --method ...`` looks up.
"""

from __future__ import annotations

#: the default ``--methods`` list, chosen for SmolLM2 + 200 AlpacaEval prompts at the 256-token cap (chat
#: prompts 35-425 tokens, median 51; answers up to 256): KIVI-2/4 and fp8 at their only settings; H2O and
#: StreamingLLM at kvsim's default budget 256 (which the context passes on most long answers, so kvsim's
#: default knobs get a measured distribution) and at 128 (evicting through most of the answer); SnapKV at 48,
#: which 110 of the 200 prompts exceed. SnapKV at its default 256 is left out: only 3 prompts exceed it, so it
#: would measure "no change" (and kvsim ignores a setting that never compressed anything)
DEFAULT_METHODS = (
    "none",
    "kivi:bits=2",
    "kivi:bits=4",
    "fp8",
    "h2o:budget=256,window=32",
    "streamingllm:sink=4,window=252",
    "h2o:budget=128,window=32",
    "streamingllm:sink=4,window=124",
    "snapkv:budget=48,window=16,kernel_size=7",
)


def parse_method(text):
    """One setting (kvsim's spec syntax), checked against what ``kvprof lengths`` runs."""
    from profiler.methods import parse

    return parse(text, "lengths")


def parse_methods(text: str) -> list:
    """Comma-separated settings; duplicates dropped, the full cache (the reference for every ratio) first."""
    from profiler.methods import parse_list

    out, seen = [], set()
    for m in parse_list(text, "lengths"):
        if m.algorithm_spec() not in seen:
            seen.add(m.algorithm_spec())
            out.append(m)
    if not any(m.name == "none" for m in out):
        out.insert(0, parse_method("none"))
    else:  # the reference runs first so agreement can be computed as soon as a batch is done
        out.sort(key=lambda m: m.name != "none")
    return out


def exact_context(m, prompt_len: int) -> int | None:
    """Largest context length C such that every query whose context (prompt + generated so far, itself
    included) is at most C sees exactly the full cache under ``m``; None when ``m`` never changes anything
    (each method's module in profiler.methods says). ``kvprof lengths`` uses it to reuse the full-cache
    answer: its first ``C - prompt_len`` tokens are teacher-forced (or the whole answer copied when it ends
    within C), which is exact, not an estimate."""
    from profiler.methods import support

    return support(m.name, "lengths").exact_context(m, prompt_len)
