"""Step time from a measured profile, operation by operation, with the roofline for whatever the
profile does not cover (absent table, point outside the grid, or next to a missing point)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from kvsim.cost.base import CostModel, StepShape
from kvsim.cost.roofline import RooflineCost

PROFILES_ROOT = Path(__file__).resolve().parents[2] / "profiles"


def profile_candidates(model: str, hardware: str, tp: int, root: Path | None = None) -> list[Path]:
    """Committed kernel profiles are named ``<hardware>__<model>__tp<N>.json``; a kvprof GPU run
    (anywhere but ``imported/``) ranks before an imported one."""
    root = root or PROFILES_ROOT
    if not root.is_dir():
        return []
    found = sorted(root.rglob(f"{hardware}__{model}__tp{tp}.json"))
    return sorted(found, key=lambda p: ("imported" in p.parts, str(p)))


def find_profile(model: str, hardware: str, tp: int):
    """The committed profile for this (model, hardware, TP), or None (then the roofline is used)."""
    from kvsim.cost.profile import load_profile

    for p in profile_candidates(model, hardware, tp):
        return load_profile(p)
    return None


@lru_cache(maxsize=1)
def _length_profiles():
    from kvsim.cost.profile import load_profile

    d = PROFILES_ROOT / "lengths"
    return [(p, load_profile(p)) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def measured_lengths(method_spec: str):
    """A measured length-ratio distribution for this exact method setting (``profiles/lengths/``)."""
    from kvsim.methods.base import LengthRatio

    for p, prof in _length_profiles():
        entry = (prof.lengths or {}).get(method_spec)
        if entry and entry.get("ratios"):
            return LengthRatio(source=f"measured: {prof.name} ({p.name})", samples=tuple(entry["ratios"]))
    return None


class ProfiledCost(CostModel):
    def __init__(self, profile, fallback: RooflineCost):
        raise NotImplementedError("profile-based cost model: being written")
