"""kvsim.cost.profile: schema checks, exact and log-space interpolation, None outside / next to null.

No torch here: kvsim reads profiles without it.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from kvsim.cost.profile import SCHEMA, SCHEMA_VERSION, Table, load_profile, validate_profile, write_profile
from kvsim.errors import ConfigError


def _profile(**over):
    d = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": "test-profile",
        "model": "llama-3.1-8b",
        "hardware": "h100",
        "tensor_parallel_size": 1,
        "dtype": "bfloat16",
        "step_overhead_s": 2.5e-4,
        "tables": {
            "linear.qkv": {"axes": {"num_tokens": [1, 4, 16, 64]}, "time_s": [1e-5, 2e-5, 8e-5, 3.2e-4]},
            "attention.decode.none": {
                "axes": {"batch_size": [1, 2, 4], "kv_tokens": [128, 256, 512]},
                "time_s": [[1e-5, 2e-5, 4e-5], [2e-5, 4e-5, None], [4e-5, 8e-5, 1.6e-4]],
            },
        },
        "lengths": {"h2o:budget=256,window=32": {"ratios": [1.0, 1.1, 0.9], "num_prompts": 3, "source": "test"}},
        "loo_error": {"linear.qkv": {"median_abs_pct": 1.0, "p90_abs_pct": 2.0}},
    }
    d.update(over)
    return d


def _write(tmp_path, data, name="p.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_roundtrip_and_accessors(tmp_path):
    path = write_profile(tmp_path / "sub" / "prof.json", _profile())
    prof = load_profile(path)
    assert prof.name == "test-profile" and prof.model == "llama-3.1-8b" and prof.hardware == "h100"
    assert prof.tensor_parallel_size == 1 and prof.step_overhead_s == 2.5e-4 and prof.dtype == "bfloat16"
    assert prof.lengths["h2o:budget=256,window=32"]["ratios"] == [1.0, 1.1, 0.9]
    assert prof.table("linear.qkv") is not None and prof.table("linear.moe") is None
    assert prof.lookup("linear.moe", num_tokens=4) is None
    assert prof.table("attention.decode.none").to_dict() == _profile()["tables"]["attention.decode.none"]
    assert "test-profile" in repr(prof) and "linear.qkv" in repr(prof.table("linear.qkv"))


def test_write_profile_fills_schema_and_validates(tmp_path):
    d = _profile()
    del d["schema"], d["schema_version"]
    prof = load_profile(write_profile(tmp_path / "x.json", d))
    assert prof.name == "test-profile"
    bad = _profile()
    bad["tables"]["linear.qkv"]["time_s"] = [1e-5]
    with pytest.raises(ConfigError, match="linear.qkv"):
        write_profile(tmp_path / "bad.json", bad)
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.0])
def test_refuses_unknown_schema_version(tmp_path, version):
    d = _profile(schema_version=version)
    if version is None:
        del d["schema_version"]
    p = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        load_profile(p)
    msg = str(e.value)
    assert str(p) in msg and "schema_version" in msg and repr(version) in msg and "supported: 1" in msg


def test_refuses_other_schema(tmp_path):
    p = _write(tmp_path, _profile(schema="vidur-profile"))
    with pytest.raises(ConfigError, match=r"not a kvsim profile.*'vidur-profile'") as e:
        load_profile(p)
    assert str(p) in str(e.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="nope.json"):
        load_profile(tmp_path / "nope.json")
    p = tmp_path / "broken.json"
    p.write_text('{"schema": "kvsim-profile",\n "schema_version": 1,,}')
    with pytest.raises(ConfigError, match=r"broken.json:2: not valid JSON"):
        load_profile(p)


@pytest.mark.parametrize("table, why", [
    ({"axes": {"num_tokens": [1, 2]}, "time_s": [1e-5]}, "expected a list of 2"),
    ({"axes": {"num_tokens": [2, 1]}, "time_s": [1e-5, 2e-5]}, "strictly increasing"),
    ({"axes": {"num_tokens": [1, 1]}, "time_s": [1e-5, 2e-5]}, "strictly increasing"),
    ({"axes": {"num_tokens": [-1, 1]}, "time_s": [1e-5, 2e-5]}, "finite positive"),
    ({"axes": {"num_tokens": [1, 0]}, "time_s": [1e-5, 2e-5]}, "0 only as the first value"),
    ({"axes": {"num_tokens": []}, "time_s": []}, "non-empty"),
    ({"axes": {}, "time_s": []}, "non-empty mapping"),
    ({"axes": {"num_tokens": [1, 2]}, "time_s": [1e-5, -1.0]}, r"time_s\[1\]"),
    ({"axes": {"num_tokens": [1, 2]}, "time_s": [1e-5, "fast"]}, r"time_s\[1\]"),
    ({"axes": {"num_tokens": [1, 2]}}, "missing 'time_s'"),
    ({"axes": {"a": [1, 2], "b": [1, 2, 3]}, "time_s": [[1, 2, 3], [1, 2]]}, r"time_s\[1\]: expected a list of 3"),
    ({"axes": {"a": [1, 2], "b": [1, 2]}, "time_s": [1, 2]}, r"time_s\[0\]: expected a list of 2"),
    ([1, 2], "must be a mapping"),
])
def test_bad_table_shapes(tmp_path, table, why):
    d = _profile()
    d["tables"]["linear.bad"] = table
    p = _write(tmp_path, d)
    with pytest.raises(ConfigError, match=why) as e:
        load_profile(p)
    assert str(p) in str(e.value) and "'linear.bad'" in str(e.value)


@pytest.mark.parametrize("key, value", [("name", ""), ("model", None), ("tensor_parallel_size", 0),
                                        ("step_overhead_s", -1.0), ("tables", []), ("lengths", {"x": {"ratios": [0]}})])
def test_bad_top_level(key, value):
    with pytest.raises(ConfigError, match=key if key != "lengths" else "ratios"):
        validate_profile(_profile(**{key: value}), "mem.json")


def test_exact_at_grid_points():
    d = _profile()["tables"]
    t1 = Table("linear.qkv", **d["linear.qkv"])
    for x, v in zip(d["linear.qkv"]["axes"]["num_tokens"], d["linear.qkv"]["time_s"]):
        assert t1.lookup(num_tokens=x) == v  # the stored float itself, not exp(log(v))
    t2 = Table("d", **d["attention.decode.none"])
    ax = d["attention.decode.none"]["axes"]
    for i, b in enumerate(ax["batch_size"]):
        for j, k in enumerate(ax["kv_tokens"]):
            assert t2.lookup(batch_size=b, kv_tokens=k) == d["attention.decode.none"]["time_s"][i][j]
            assert t2.value_at(i, j) == d["attention.decode.none"]["time_s"][i][j]


def test_log_space_interpolation_is_exact_for_power_laws():
    xs = [1, 4, 16, 64, 1000]
    t = Table("t", {"n": xs}, [3e-6 * x ** 0.7 for x in xs])
    for x in (1.5, 2, 10, 37.3, 500, 999):
        assert t.lookup(n=x) == pytest.approx(3e-6 * x ** 0.7, rel=1e-12)
    # halfway in log axis -> geometric mean in time
    t = Table("t", {"n": [10, 1000]}, [1e-3, 4e-3])
    assert t.lookup(n=100) == pytest.approx(2e-3, rel=1e-12)
    assert t.lookup_at(100) == pytest.approx(2e-3, rel=1e-12)
    bs, kv = [1, 3, 8, 64], [128, 300, 1024, 32768]
    t2 = Table("t2", {"batch_size": bs, "kv_tokens": kv}, [[2e-7 * b ** 0.3 * k ** 0.9 for k in kv] for b in bs])
    for b, k in [(2, 200), (1, 1000), (5, 128), (64, 5000), (33, 32768), (7.5, 777)]:
        assert t2.lookup(batch_size=b, kv_tokens=k) == pytest.approx(2e-7 * b ** 0.3 * k ** 0.9, rel=1e-12)
        assert t2.lookup_at(b, k) == pytest.approx(2e-7 * b ** 0.3 * k ** 0.9, rel=1e-12)


def test_three_axes_generic_path():
    a, b, c = [1, 2, 4], [10, 100], [3, 9, 27]

    def f(x, y, z):
        return 1e-6 * x ** 0.5 * y ** 1.2 * z ** 0.8

    t = Table("t3", {"a": a, "b": b, "c": c}, [[[f(x, y, z) for z in c] for y in b] for x in a])
    assert t.lookup(a=2, b=100, c=9) == f(2, 100, 9)
    for pt in [(1.5, 30, 5), (3, 10, 20), (4, 50, 27)]:
        assert t.lookup(a=pt[0], b=pt[1], c=pt[2]) == pytest.approx(f(*pt), rel=1e-12)
    assert t.lookup(a=5, b=50, c=5) is None


def test_an_axis_may_start_at_zero_and_interpolates_linearly_above_it():
    # a history of 0 cached tokens is a measured point (LLMServingSim's mixed rows); log(0) is not
    t1 = Table("t", {"h": [0, 16, 64]}, [1e-4, 2e-4, 8e-4])
    assert t1.lookup(h=0) == 1e-4
    assert t1.lookup(h=4) == pytest.approx(1e-4 * 2 ** 0.25, rel=1e-12)   # weight 4/16, in log time
    assert t1.lookup(h=32) == pytest.approx(4e-4, rel=1e-12)              # log axis beyond the first step
    assert t1.lookup(h=-1) is None
    t2 = Table("t2", {"h": [0, 10], "b": [1, 4]}, [[1e-5, 4e-5], [4e-5, 16e-5]])
    assert t2.lookup(h=5, b=1) == pytest.approx(2e-5, rel=1e-12)
    assert t2.lookup(h=5, b=2) == pytest.approx(4e-5, rel=1e-12)
    t3 = Table("t3", {"c": [1, 2], "h": [0, 10], "b": [1, 4]}, [[[1e-5, 4e-5], [4e-5, 16e-5]]] * 2)
    assert t3.lookup(c=1.5, h=5, b=2) == pytest.approx(4e-5, rel=1e-12)
    d = _profile()
    d["tables"]["attention.mixed.flash"] = {"axes": {"h": [0, 10]}, "time_s": [1e-5, 2e-5]}
    validate_profile(d, "mem.json")


def test_none_outside_and_next_to_null():
    d = _profile()["tables"]
    t1 = Table("linear.qkv", **d["linear.qkv"])
    for x in (0.5, 65, 1e9, 0, -1, math.nan, math.inf):
        assert t1.lookup(num_tokens=x) is None
    t2 = Table("d", **d["attention.decode.none"])  # (batch 2, kv 512) is null
    assert t2.lookup(batch_size=2, kv_tokens=512) is None
    assert t2.lookup(batch_size=3, kv_tokens=400) is None      # null among the four corners
    assert t2.lookup(batch_size=2, kv_tokens=400) is None      # on the row of the null, between it and a value
    assert t2.lookup(batch_size=3, kv_tokens=512) is None      # on the column of the null
    assert t2.lookup(batch_size=2, kv_tokens=256) == 4e-5       # a measured point next to the null
    assert t2.lookup(batch_size=1.5, kv_tokens=200) is not None  # away from the null
    assert t2.lookup(batch_size=3, kv_tokens=200) is not None
    assert t2.lookup(batch_size=8, kv_tokens=256) is None
    assert t2.lookup(batch_size=2, kv_tokens=100) is None


def test_wrong_axis_names():
    t2 = Table("d", **_profile()["tables"]["attention.decode.none"])
    with pytest.raises(TypeError, match="batch_size"):
        t2.lookup(batch=2, kv_tokens=256)
    with pytest.raises(TypeError):
        t2.lookup(batch_size=2)


def test_reader_does_not_import_torch():
    import subprocess

    code = "import sys, kvsim.cost.profile; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
