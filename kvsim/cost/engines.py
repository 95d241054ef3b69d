"""Serving engines whose step costs differ from vLLM's: a full set of roofline parameters per engine.

kvsim models vLLM V1 by default (CUDA graphs, asynchronous scheduling: ``kvsim.cost.calibration``'s
parameters per GPU). Another engine is a named parameter set fitted on that engine's own FP16
measurements, stored with the method terms it was fitted beside (``kvsim/methods/data/method_terms.yaml``,
``engines``) and kept apart from them: the engine carries the baseline, the implementations carry what a
method adds. ``lmdeploy-0.6`` is LMDeploy 0.6's PyTorch engine on the 48 GB Ampere card of the seed
paper, where the host path (an eager engine launching Triton kernels from Python) floors every step.
"""

from __future__ import annotations

from kvsim.cost.roofline import RooflineParams, params_from_entry
from kvsim.errors import ConfigError

#: the default engine: vLLM V1, whose parameters come from calibration.yaml per GPU
DEFAULT_ENGINE = "vllm"


def known_engines() -> list[str]:
    from kvsim.methods.impl import load_terms_file

    return [DEFAULT_ENGINE, *sorted(load_terms_file().get("engines") or {})]


def engine_params(name: str | None) -> RooflineParams | None:
    """The roofline parameters of engine ``name``; None for vLLM (kvsim's per-GPU calibration)."""
    if name in (None, DEFAULT_ENGINE):
        return None
    from kvsim.methods.impl import engine_entry

    entry = engine_entry(name)
    params = entry.get("params")
    if not isinstance(params, dict):
        raise ConfigError(f"engine {name!r}: its entry has no params mapping")
    return params_from_entry(params, f"engine {name} (fitted on {entry.get('fitted_on', '?')})")


def engine_hardware(name: str | None) -> str | None:
    """The GPU an engine's parameters were fitted on (None for vLLM: calibrated per GPU)."""
    if name in (None, DEFAULT_ENGINE):
        return None
    from kvsim.methods.impl import engine_entry

    return engine_entry(name).get("hardware")


__all__ = ["DEFAULT_ENGINE", "engine_params", "engine_hardware", "known_engines"]
