"""Per-request output length under a compression method: the trace's length times a sampled ratio,
bounded the way a server bounds an answer.

Where the ratio comes from is decided here, in one place (:func:`choose_length_ratio`):

* ``auto`` (the default): a ``kvprof lengths`` measurement of this exact method setting when it was made
  on this model (same family and size: ``smollm2-135m-instruct`` measures ``smollm2-135m``), else the
  method's published default (``Method.default_length_ratio``). A measurement on a 135M model says
  little about a 70B one: its ratios come from a model that falls into repetition loops (docs/lengths.md).
* ``published``: always the method's published default.
* ``trace``: the trace's output lengths, unchanged.
* a path: that ``kvprof lengths`` profile, for any model (the user asked for it).

The bound: a server stops an answer at the request's ``max_tokens`` (when the trace records it) and in
any case where prompt + answer reaches ``max_model_len``. A sampled length past the bound is cut to it,
and the run counts how many were cut (``num_output_length_capped`` in summary.json).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from kvsim.methods.base import LengthRatio

#: ``--lengths`` keywords; anything else is a path to a profile with a ``lengths`` section
LENGTH_SOURCES = ("auto", "published", "trace")

_SUFFIXES = re.compile(r"(-(instruct|chat|hf|base|it))+$")


def model_key(name: str) -> str:
    """Family and size of a model name: Hugging Face org and chat/instruct suffixes dropped, shipped
    aliases resolved (``meta-llama/Llama-3.1-8B-Instruct`` and ``llama-3.1-8b`` give the same key)."""
    from kvsim.specs.model import hf_model_name

    n = str(name).strip().lower()
    n = hf_model_name(n) or n
    n = n.rsplit("/", 1)[-1]
    return _SUFFIXES.sub("", n)


def same_model(a: str, b: str) -> bool:
    return model_key(a) == model_key(b)


def _measured(entry: dict | None) -> bool:
    if not entry or not entry.get("ratios"):
        return False
    # a setting whose answers all equal the full cache's never compressed anything on that prompt set
    # (a budget above every prompt + answer): it says nothing about longer contexts
    return not (all(r == 1.0 for r in entry["ratios"]) and entry.get("mean_rouge_l", 0.0) >= 0.999)


def _from_profile(prof, spec: str, where: str) -> LengthRatio | None:
    entry = (prof.lengths or {}).get(spec)
    if not _measured(entry):
        return None
    return LengthRatio(source=f"measured: {prof.name} on {prof.model} ({where})", samples=tuple(entry["ratios"]),
                       kind="measured", measured_on=prof.model)


def measured_entries(method_spec: str) -> list[tuple[Path, object]]:
    """The committed ``kvsim/profiles/lengths/`` profiles that measured this exact method setting."""
    from kvsim.cost.profiled import length_profiles

    return [(p, prof) for p, prof in length_profiles() if _measured((prof.lengths or {}).get(method_spec))]


def choose_length_ratio(model_name: str, method, profile=None, lengths: str | None = "auto") -> LengthRatio:
    """The output-length ratio distribution a run applies (see the module docstring for the rules)."""
    spec = method.algorithm_spec()  # lengths follow the tokens kept, not whose kernels keep them
    choice = (lengths or "auto").strip() if isinstance(lengths, str) else lengths
    if choice == "trace":
        return LengthRatio(source="trace: output lengths as in the trace (--lengths trace)", kind="unchanged")
    if choice == "published":
        return _published(method)
    if choice != "auto":
        from kvsim.cost.profile import load_profile
        from kvsim.errors import ConfigError

        prof = choice if not isinstance(choice, (str, Path)) else load_profile(choice)
        found = _from_profile(prof, spec, getattr(prof, "path", str(choice)))
        if found is None:
            have = ", ".join(sorted(prof.lengths)) or "none"
            raise ConfigError(f"--lengths {getattr(prof, 'path', choice)}: no measured lengths for method {spec!r} "
                              f"(settings it has: {have})")
        return found
    if profile is not None and same_model(profile.model, model_name):
        found = _from_profile(profile, spec, "the kernel profile")
        if found is not None:
            return found
    for p, prof in measured_entries(spec):
        if same_model(prof.model, model_name):
            return _from_profile(prof, spec, str(p.name))
    return _published(method)


def _published(method) -> LengthRatio:
    r = method.default_length_ratio()
    identity = not r.samples and r.sigma == 0.0 and r.mean_ratio == 1.0
    kind = "unchanged" if identity else "published"
    return r if r.kind == kind else LengthRatio(r.source, r.mean_ratio, r.sigma, r.samples, kind=kind)


class LengthSampler:
    """Draws one ratio per request, in arrival order, from the run's seed (deterministic), and bounds the
    result by the request's ``max_tokens`` and by ``max_model_len - prompt_tokens``."""

    def __init__(self, dist: LengthRatio, seed: int, max_model_len: int | None = None):
        self.dist = dist
        self.max_model_len = max_model_len
        #: requests whose sampled length was cut to their bound
        self.num_capped = 0
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6C656E]))
        self._identity = not dist.samples and dist.sigma == 0.0 and dist.mean_ratio == 1.0
        self._samples = np.asarray(dist.samples, dtype=float) if dist.samples else None
        self._mu = math.log(dist.mean_ratio) - dist.sigma**2 / 2 if dist.mean_ratio > 0 else 0.0

    def output_tokens(self, trace_output_tokens: int, prompt_tokens: int | None = None,
                      max_tokens: int | None = None) -> int:
        if self._identity:
            return trace_output_tokens
        if self._samples is not None:
            r = float(self._samples[self._rng.integers(len(self._samples))])
        else:
            r = float(self._rng.lognormal(self._mu, self.dist.sigma)) if self.dist.sigma else self.dist.mean_ratio
        n = max(1, round(trace_output_tokens * r))
        bound = self.bound(prompt_tokens, max_tokens)
        # a bound below the trace's own length is the trace's problem (rejected as exceeding
        # max_model_len), not the method's: never shorten past the trace
        if bound is not None and n > bound and n > trace_output_tokens:
            n = max(bound, trace_output_tokens)
            self.num_capped += 1
        return n

    def bound(self, prompt_tokens: int | None, max_tokens: int | None) -> int | None:
        """The most tokens a server lets this answer have: max_tokens, and what max_model_len leaves."""
        b = max_tokens
        if self.max_model_len is not None and prompt_tokens is not None:
            room = max(1, self.max_model_len - prompt_tokens)
            b = room if b is None else min(b, room)
        return b
