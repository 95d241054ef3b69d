"""Behaviour does not change: every golden run (tests/golden/runs.py) writes, byte for byte, what it wrote
when tests/golden/manifest.json was recorded, wall-clock values aside. A difference names the files; to
see it, run ``python -m tests.golden.runs --out DIR NAME`` here and on the commit that recorded the
manifest, and diff the two folders."""

from __future__ import annotations

import json

import pytest

from golden.runs import MANIFEST, RUNS, SHARED, needs_shared, run_one

WANT = json.loads(MANIFEST.read_text())


def test_manifest_covers_every_run():
    assert sorted(WANT) == sorted(RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_golden(name, tmp_path):
    if needs_shared(RUNS[name]) and not SHARED.is_dir():
        pytest.skip(f"{SHARED} absent")
    got = run_one(name, tmp_path)
    want = WANT[name]
    assert sorted(got) == sorted(want), "files written differ"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"{name}: outputs differ from the recorded ones: {differ}"
