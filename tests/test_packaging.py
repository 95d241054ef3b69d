"""Committed profiles and data ship inside the wheel and are found through importlib.resources: every
package-data pattern in pyproject.toml matches files and every committed data file is matched; the built
wheel, installed into a fresh virtual environment, replays with a committed profile from outside the
checkout."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".csv")


def package_data() -> list[str]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return cfg["tool"]["setuptools"]["package-data"]["kvsim"]


def committed(prefix: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", prefix], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_package_data_patterns_cover_the_data_and_only_exist():
    files = [f.removeprefix("kvsim/") for f in committed("kvsim")]
    pats = package_data()
    for p in pats:
        assert any(fnmatch.fnmatch(f, p) for f in files), f"package-data pattern {p!r} matches no file"
    data = [f for f in files if f.endswith(DATA_SUFFIXES)]
    missed = [f for f in data if not any(fnmatch.fnmatch(f, p) for p in pats)]
    assert not missed, f"committed data files the wheel would not ship: {missed}"


def test_data_is_found_through_the_package_not_the_checkout():
    """No module finds data by walking up from its own file to the checkout (``parents[2] / "profiles"``)."""
    offenders = []
    for p in (REPO / "kvsim").rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "parents[" in line and "__file__" in line and p.name != "resources.py":
                offenders.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_replays_with_a_profile(tmp_path):
    src = tmp_path / "src"
    for f in committed("pyproject.toml") + committed("README.md") + committed("kvsim") + committed("profiler"):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("kvsim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [f for f in committed("kvsim") if f.endswith(DATA_SUFFIXES)]
    assert not [f for f in shipped if f not in names], "data missing from the wheel"

    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        py = venv / "bin" / "python"
        # dependencies from the configured (local) package index
        inst = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot build a fresh venv here: {e}")
    if inst.returncode != 0:
        pytest.skip(f"cannot install the wheel's dependencies here: {inst.stderr.strip()[-500:]}")
    run_dir = tmp_path / "elsewhere"  # not the checkout: only the installed package can supply the profile
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = run_dir / "out"
    r = subprocess.run([str(venv / "bin" / "kvsim"), "replay", str(REPO / "traces" / "sample.jsonl"), "--limit", "20",
                        "--hardware", "rtx-4090", "--out", str(out), "--quiet"], cwd=run_dir, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost_model"] == "profile rtx-4090-llama-3.1-8b-tp1-llmservingsim"
    assert summary["completed"] == 20
    where = subprocess.run([str(py), "-c", "import kvsim.resources as r; print(r.profiles_dir())"], cwd=run_dir,
                           env=env, capture_output=True, text=True, timeout=60).stdout.strip()
    assert Path(where).is_relative_to(venv) and (Path(where) / "imported").is_dir()
