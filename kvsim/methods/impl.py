"""Implementations: a method's cost is the cost of the kernels some engine runs for it.

The same method name runs different kernels in different engines (LMDeploy's fused int4 paged kernel,
KIVI's reference CUDA kernels, vLLM's fp8 path), so a method spec names the implementation whose
costs it uses (``kivi:bits=4,impl=lmdeploy``). Each implementation says which engine and code it
models and what its cost terms rest on:

- ``measured``: terms fitted on real measurements of that engine (``terms`` below; the fit is
  :mod:`kvsim.cost.method_fit`, the data and the fitted values in ``data/method_terms.yaml``);
- ``composed``: no measurement of this method, its costs built from measured terms it shares with
  others (a score pass, a dequantising read, a block copy), named in ``source``;
- ``first principles``: FLOPs and bytes counted from the paper's algorithm, turned into time by the
  roofline's efficiencies (the model kvsim had before measurements).

The measured terms are physical quantities that carry over to other GPUs and engines: operations per
KV element a dequantising kernel runs on the CUDA cores, host seconds a method's prefill hook holds the
step for per layer and per sequence, bytes a score pass moves per prompt token. The engine-and-GPU
baseline the fit needed (LMDeploy's FP16 step on the 48 GB Ampere card) is kept apart, in the same file
under ``engines``, so that it never leaks into the method terms.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml

from kvsim.errors import ConfigError

TERMS_FILE = "data/method_terms.yaml"
SCHEMA = "kvsim-method-terms"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Implementation:
    name: str
    #: the engine and kernels whose costs these are
    engine: str
    #: "measured", "composed" or "first principles"
    basis: str
    #: where the terms come from: code modelled, data fitted on, terms borrowed
    source: str
    #: key of this implementation's fitted terms in ``method_terms.yaml`` (measured ones)
    terms_key: str | None = None
    #: keys of other implementations' fitted terms this one borrows (composed ones)
    borrows: tuple[str, ...] = field(default=())

    def terms(self) -> dict[str, float]:
        """The fitted terms this implementation uses: its own, else those it borrows."""
        out: dict[str, float] = {}
        for key in (self.terms_key, *self.borrows):
            if key:
                out.update(fitted_terms(key))
        return out

    def describe(self) -> str:
        return f"{self.name} ({self.basis}): {self.engine}. {self.source}"


@lru_cache(maxsize=1)
def load_terms_file() -> dict:
    """The committed fit: ``{"schema", "schema_version", "data", "engines", "implementations", ...}``."""
    where = f"kvsim/methods/{TERMS_FILE}"
    try:
        text = resources.files("kvsim.methods").joinpath(TERMS_FILE).read_text()
    except (FileNotFoundError, OSError):
        raise ConfigError(f"{where} is missing: the measured method terms ship with kvsim "
                          "(regenerate with: kvsim fit-methods --out DIR, then copy DIR/method_terms.yaml)") from None
    data = yaml.safe_load(text) or {}
    if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{where}: schema {data.get('schema')!r} version {data.get('schema_version')!r}; "
                          f"this kvsim reads {SCHEMA} version {SCHEMA_VERSION}")
    return data


#: terms being fitted (kvsim.cost.method_fit evaluates trial values through the same method code)
_TRIAL: dict[str, dict[str, float]] = {}


@contextmanager
def trial_terms(terms: dict[str, dict[str, float]]):
    """Use these terms (implementation key -> {term: value}) instead of the committed ones inside the
    block; the fit's way of running trial values through the methods' own cost code."""
    saved = dict(_TRIAL)
    _TRIAL.update(terms)
    try:
        yield
    finally:
        _TRIAL.clear()
        _TRIAL.update(saved)


def fitted_terms(key: str) -> dict[str, float]:
    if key in _TRIAL:
        return dict(_TRIAL[key])
    entry = (load_terms_file().get("implementations") or {}).get(key)
    if entry is None:
        raise ConfigError(f"kvsim/methods/{TERMS_FILE}: no fitted terms for implementation {key!r}")
    return {k: float(v) for k, v in (entry.get("terms") or {}).items()}


def engine_entry(name: str) -> dict:
    """An engine-and-GPU baseline fitted beside the method terms (``lmdeploy-0.6``)."""
    engines = load_terms_file().get("engines") or {}
    if name not in engines:
        raise ConfigError(f"unknown engine {name!r}; known: {', '.join(sorted(engines)) or '(none)'} "
                          f"(vllm, the default, needs no entry)")
    return engines[name]


__all__ = ["Implementation", "fitted_terms", "engine_entry", "load_terms_file", "trial_terms"]
