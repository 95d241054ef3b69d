"""Where kvsim's shipped data lives, and where the public reference data beside a checkout is.

Committed data ships inside the package (and so inside the wheel: pyproject.toml's package-data) and is
found through :mod:`importlib.resources`, never through the source tree's layout: specs
(``kvsim/specs/data``), the roofline calibration (``kvsim/cost/calibration.yaml``), the fitted method
terms (``kvsim/methods/data``) and the committed profiles (``kvsim/profiles``: ``imported/`` kernel
profiles from real serving-engine timings, ``kvprof/`` kvprof kernel grids and their raw timings,
``lengths/`` kvprof lengths measurements).

The public reference data (traces, published timings, measured validation cases) is not shipped: it is
the ``shared/`` folder beside a checkout (``../shared`` from the repository root), or wherever
``$KVSIM_SHARED`` points. Commands that read it take explicit paths as well.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def package_path(*parts: str) -> Path:
    """A file or folder shipped inside the kvsim package, as a path (kvsim is installed as files, from a
    wheel or a checkout, never zipped)."""
    return Path(str(resources.files("kvsim").joinpath(*parts)))


def read_mapping(*parts: str) -> dict:
    """A shipped YAML file whose top level must be a mapping (an empty file is an empty one)."""
    import yaml

    from kvsim.errors import ConfigError

    table = yaml.safe_load(package_path(*parts).read_text()) or {}
    if not isinstance(table, dict):
        raise ConfigError(f"{'/'.join(parts)}: top level must be a mapping of names, got {type(table).__name__}")
    return table


def profiles_dir() -> Path:
    """The committed profiles (``imported/``, ``kvprof/``, ``lengths/``)."""
    return package_path("profiles")


def shared_dir() -> Path:
    """The public reference data: ``$KVSIM_SHARED``, else ``shared/`` beside the repository the package
    sits in (it need not exist: callers say what is missing)."""
    env = os.environ.get("KVSIM_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared"


__all__ = ["package_path", "profiles_dir", "read_mapping", "shared_dir"]
