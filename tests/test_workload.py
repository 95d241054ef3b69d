"""Tests of kvsim.workload: trace readers/writer, synthetic generator, trace statistics."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsim.errors import ConfigError, TraceError
from kvsim.workload.readers import FORMATS, detect_format, read_trace, write_trace
from kvsim.workload.request import InvalidRecord, Request
from kvsim.workload.stats import format_stats, trace_stats
from kvsim.workload.synthetic import (
    CHUNK,
    FixedLengths,
    LengthStats,
    QuantileLengths,
    UniformLengths,
    head,
    rescale_arrivals,
    synthetic_requests,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRACES = SHARED / "traces"
AZURE_CONV = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
MOONCAKE_CONV = TRACES / "mooncake_fast25" / "conversation_trace.jsonl"
MOONCAKE_SYN = TRACES / "mooncake_fast25" / "synthetic_trace.jsonl"
SHAREGPT = TRACES / "sarathi_processed" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared trace not available: {path}")
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def kv(t=0.0, p=10, o=5, **extra) -> str:
    d = {"arrival_time_s": t, "prompt_tokens": p, "output_tokens": o}
    d.update(extra)
    return json.dumps(d)


def strip_source(r: Request) -> Request:
    return Request(r.request_id, r.arrival_time_s, r.prompt_tokens, r.output_tokens, r.prefix_hashes, r.hash_block_tokens)


def raises_at(path: Path, line: int, field: str, code: str, **kw) -> TraceError:
    with pytest.raises(TraceError) as ei:
        list(read_trace(path, **kw))
    e = ei.value
    assert (e.path, e.line, e.field, e.code) == (str(path), line, field, code), str(e)
    assert str(e).startswith(f"{path}:{line}: field '{field}': ")
    return e


# ------------------------------------------------------------------------------------------------
# kvsim JSONL: valid lines


def test_kvsim_basic_fields_and_defaults(tmp_path):
    p = write(
        tmp_path,
        "t.jsonl",
        kv(0.5, 100, 20) + "\n\n"
        + kv(1.0, 33, 4, request_id="abc", prefix_hashes=[1, 2**64 - 1]) + "\n"
        + kv(1.0, 1, 1, request_id=7, prefix_hashes=None) + "\n",
    )
    rs = list(read_trace(p))
    assert [r.request_id for r in rs] == ["0", "abc", "7"]
    assert rs[0] == Request("0", 0.5, 100, 20, None, 16, (str(p), 1))
    assert rs[1].prefix_hashes == (1, 2**64 - 1) and rs[1].source == (str(p), 3)
    assert rs[2].prefix_hashes is None
    assert all(type(r.arrival_time_s) is float for r in rs)


def test_kvsim_hash_block_tokens_field(tmp_path):
    p = write(tmp_path, "t.jsonl", kv(0, 1024, 1, hash_block_tokens=512, prefix_hashes=[5, 6]) + "\n")
    (r,) = read_trace(p)
    assert r.hash_block_tokens == 512 and r.prefix_hashes == (5, 6)


def test_read_trace_is_lazy(tmp_path):
    p = write(tmp_path, "t.jsonl", kv(0) + "\n" + kv(1) + "\n" + "{oops\n")
    it = read_trace(p)
    assert next(it).arrival_time_s == 0.0
    assert next(it).arrival_time_s == 1.0
    with pytest.raises(TraceError):
        next(it)


# ------------------------------------------------------------------------------------------------
# kvsim JSONL: each error code, with the exact line and field

KVSIM_ERRORS = [
    ("{not json", "<line>", "bad_json"),
    (kv(3) + " x", "<line>", "bad_json"),
    (kv(3) + kv(4), "<line>", "bad_json"),
    ("[1, 2, 3]", "<line>", "bad_json"),
    ('"a string"', "<line>", "bad_json"),
    (json.dumps({"prompt_tokens": 1, "output_tokens": 1}), "arrival_time_s", "missing_field"),
    (json.dumps({"arrival_time_s": 3, "output_tokens": 1}), "prompt_tokens", "missing_field"),
    (json.dumps({"arrival_time_s": 3, "prompt_tokens": None, "output_tokens": 1}), "prompt_tokens", "missing_field"),
    (json.dumps({"arrival_time_s": 3, "prompt_tokens": 1}), "output_tokens", "missing_field"),
    (kv(3, 0, 5), "prompt_tokens", "non_positive"),
    (kv(3, 5, -1), "output_tokens", "non_positive"),
    (kv(3, 3.5, 5), "prompt_tokens", "non_integer"),
    (kv(3, 12.0, 5), "prompt_tokens", "non_integer"),
    (kv(3, "12", 5), "prompt_tokens", "non_integer"),
    (kv(3, True, 5), "prompt_tokens", "non_integer"),
    (kv(3, 5, [1]), "output_tokens", "non_integer"),
    (kv("3", 5, 5), "arrival_time_s", "bad_time"),
    (kv(-1.0, 5, 5), "arrival_time_s", "bad_time"),
    (kv(True, 5, 5), "arrival_time_s", "bad_time"),
    ('{"arrival_time_s": NaN, "prompt_tokens": 5, "output_tokens": 5}', "arrival_time_s", "bad_time"),
    ('{"arrival_time_s": Infinity, "prompt_tokens": 5, "output_tokens": 5}', "arrival_time_s", "bad_time"),
    ('{"arrival_time_s": 1e400, "prompt_tokens": 5, "output_tokens": 5}', "arrival_time_s", "bad_time"),
    (kv(3, 5, 5, request_id=[1]), "request_id", "bad_id"),
    (kv(3, 5, 5, request_id=1.5), "request_id", "bad_id"),
    (kv(3, 64, 5, prefix_hashes="abc"), "prefix_hashes", "bad_hashes"),
    (kv(3, 64, 5, prefix_hashes=[1, -2]), "prefix_hashes", "bad_hashes"),
    (kv(3, 64, 5, prefix_hashes=[1, 2**64]), "prefix_hashes", "bad_hashes"),
    (kv(3, 64, 5, prefix_hashes=[1, 2.0]), "prefix_hashes", "bad_hashes"),
    (kv(3, 64, 5, prefix_hashes=[1, True]), "prefix_hashes", "bad_hashes"),
    (kv(3, 32, 5, prefix_hashes=[1, 2, 3]), "prefix_hashes", "bad_hashes"),  # 32 tokens = 2 blocks of 16
    (kv(3, 5, 5, hash_block_tokens=0), "hash_block_tokens", "non_positive"),
    (kv(1.5, 5, 5), "arrival_time_s", "time_backwards"),  # line 3 arrives at 2.0
]


@pytest.mark.parametrize("bad,field,code", KVSIM_ERRORS)
def test_kvsim_error_codes(tmp_path, bad, field, code):
    # line 1: valid, line 2: blank, line 3: valid at t=2.0, line 4: the bad line, line 5: valid
    p = write(tmp_path, "bad.jsonl", kv(0.0) + "\n\n" + kv(2.0) + "\n" + bad + "\n" + kv(9.0) + "\n")
    raises_at(p, 4, field, code, fmt="kvsim")


def test_too_long(tmp_path):
    p = write(tmp_path, "t.jsonl", kv(0, 100) + "\n" + kv(1, 101) + "\n")
    assert len(list(read_trace(p))) == 2
    assert len(list(read_trace(p, max_model_len=101))) == 2
    e = raises_at(p, 2, "prompt_tokens", "too_long", max_model_len=100)
    assert "101" in e.reason and "max_model_len=100" in e.reason
    with pytest.raises(ConfigError):
        read_trace(p, max_model_len=0)


def test_error_message_names_value(tmp_path):
    p = write(tmp_path, "t.jsonl", kv(0, 3.5, 5) + "\n")
    e = raises_at(p, 1, "prompt_tokens", "non_integer")
    assert "3.5" in str(e) and "float" in str(e)
    p = write(tmp_path, "u.jsonl", kv(0, "12", 5) + "\n")
    assert "'12'" in str(raises_at(p, 1, "prompt_tokens", "non_integer"))


def test_whitespace_bom_and_crlf_are_fine(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + kv(0.0).encode() + b"\r\n   " + kv(1.0).encode() + b"  \t\r\n \r\n" + kv(2.0).encode())
    assert detect_format(p) == "kvsim"
    assert [(r.arrival_time_s, r.source[1]) for r in read_trace(p)] == [(0.0, 1), (1.0, 2), (2.0, 4)]


def test_invalid_utf8_is_bad_json(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(kv(0).encode() + b"\n" + b'{"arrival_time_s": 1, "prompt_tokens": 5, "output_tokens": 5, "x": "\xff"}\n')
    raises_at(p, 2, "<line>", "bad_json")


# ------------------------------------------------------------------------------------------------
# skip_invalid


def test_skip_invalid_yields_records_and_continues(tmp_path):
    lines = [
        kv(0.0, 10, 1),  # 1 ok
        "{broken",  # 2 bad_json
        kv(5.0, 10, 1),  # 3 ok
        kv(4.0, 10, 1),  # 4 time_backwards (vs 5.0 on line 3)
        kv(5.5, 0, 1),  # 5 non_positive
        kv(6.0, 10, 1),  # 6 ok: compared with line 3, the last valid one
        kv(7.0, 999, 1),  # 7 too_long
        kv(8.0, 10, 1),  # 8 ok
    ]
    p = write(tmp_path, "t.jsonl", "\n".join(lines) + "\n")
    out = list(read_trace(p, skip_invalid=True, max_model_len=100))
    kinds = [(type(x).__name__, x.line if isinstance(x, InvalidRecord) else x.source[1]) for x in out]
    assert kinds == [
        ("Request", 1),
        ("InvalidRecord", 2),
        ("Request", 3),
        ("InvalidRecord", 4),
        ("InvalidRecord", 5),
        ("Request", 6),
        ("InvalidRecord", 7),
        ("Request", 8),
    ]
    bad = [x for x in out if isinstance(x, InvalidRecord)]
    assert [b.code for b in bad] == ["bad_json", "time_backwards", "non_positive", "too_long"]
    assert [b.arrival_time_s for b in bad] == [None, 4.0, 5.5, 7.0]
    assert all(b.path == str(p) for b in bad)
    assert bad[1].field == "arrival_time_s" and "line 3" in bad[1].reason
    stats = trace_stats(out)
    assert stats["count"] == 4 and stats["rejected_total"] == 4
    assert stats["rejected"] == {"bad_json": 1, "non_positive": 1, "time_backwards": 1, "too_long": 1}


# ------------------------------------------------------------------------------------------------
# format detection


def test_detection(tmp_path):
    a = write(tmp_path, "a.csv", AZURE_HEADER + "\n2023-11-16 18:15:46.6805900,374,44\n")
    m = write(tmp_path, "m.jsonl", '{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [7, 8]}\n')
    k = write(tmp_path, "k.txt", "\n  \n" + kv(1.0) + "\n")
    assert (detect_format(a), detect_format(m), detect_format(k)) == ("azure", "mooncake", "kvsim")
    (r,) = read_trace(m)
    assert r == Request("0", 0.005, 600, 3, (7, 8), 512, (str(m), 1))
    assert next(iter(read_trace(a))).prompt_tokens == 374
    assert next(iter(read_trace(k))).arrival_time_s == 1.0


def test_detection_prefers_kvsim_and_skips_a_corrupt_first_line(tmp_path):
    both = write(tmp_path, "b.jsonl", kv(0, 5, 5, input_length=3) + "\n")
    assert detect_format(both) == "kvsim"
    p = write(tmp_path, "c.jsonl", "{corrupt\n" + kv(1.0) + "\n")
    assert detect_format(p) == "kvsim"
    out = list(read_trace(p, skip_invalid=True))
    assert isinstance(out[0], InvalidRecord) and out[0].code == "bad_json" and out[1].arrival_time_s == 1.0


def test_detection_failure_and_forced_format(tmp_path):
    p = write(tmp_path, "x.txt", "\nhello world\n")
    with pytest.raises(TraceError) as ei:
        read_trace(p)
    assert ei.value.code == "unknown_format" and ei.value.line == 2
    assert all(f in str(ei.value) for f in FORMATS)
    # a kvsim line forced as mooncake: its fields are missing
    k = write(tmp_path, "k.jsonl", kv(1.0) + "\n")
    raises_at(k, 1, "timestamp", "missing_field", fmt="mooncake")
    assert len(list(read_trace(k, fmt="KVSIM"))) == 1


def test_unknown_fmt_lists_known(tmp_path):
    k = write(tmp_path, "k.jsonl", kv(1.0) + "\n")
    with pytest.raises(ConfigError) as ei:
        read_trace(k, fmt="parquet")
    assert "parquet" in str(ei.value) and all(f in str(ei.value) for f in FORMATS)


def test_empty_and_missing_file(tmp_path):
    assert list(read_trace(write(tmp_path, "e.jsonl", ""))) == []
    assert list(read_trace(write(tmp_path, "e2.jsonl", "\n\n"))) == []
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "nope.jsonl", fmt="kvsim")


def test_gzip(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(kv(0.0) + "\n" + kv(1.0) + "\n")
    assert [r.arrival_time_s for r in read_trace(p)] == [0.0, 1.0]
    out = tmp_path / "o.jsonl.gz"
    assert write_trace(read_trace(p), out) == 2
    assert [r.arrival_time_s for r in read_trace(out)] == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Azure CSV


def test_azure_seven_digit_timestamps_are_exact(tmp_path):
    rows = [
        "2023-11-16 18:15:46.6805900,374,44",
        "2023-11-16 18:15:46.6805901,396,109",  # 100 ns later
        "2023-11-16 18:15:46.9999999,1,1",
        "2023-11-16 18:15:47.0000000,1,1",
        "2023-11-16 23:59:59.9999999,1,1",
        "2023-11-17 00:00:00.0000001,1,1",  # across midnight
        "2023-11-17 00:00:01,1,1",  # no fraction
    ]
    p = write(tmp_path, "a.csv", AZURE_HEADER + "\n" + "\n".join(rows) + "\n")
    rs = list(read_trace(p))
    assert rs[1].arrival_time_s == 1e-7
    assert rs[1].arrival_time_s - rs[0].arrival_time_s == 1e-7

    def exact(ts: str) -> Fraction:
        d, t = ts.split(" ")
        day = int(d[-2:])
        h, m, s = t.split(":")
        return day * 86400 + int(h) * 3600 + int(m) * 60 + Fraction(s)

    t0 = exact(rows[0].split(",")[0])
    for row, r in zip(rows, rs):
        assert r.arrival_time_s == float(exact(row.split(",")[0]) - t0)  # float(Fraction) is correctly rounded
    assert rs[3].arrival_time_s - rs[2].arrival_time_s == pytest.approx(1e-7, abs=1e-12)
    assert [r.request_id for r in rs] == [str(i) for i in range(len(rows))]
    assert rs[0].source == (str(p), 2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=3 * 86400 * 10**7), min_size=1, max_size=20))
def test_azure_timestamps_exact_property(tmp_path, ticks):
    """Any 100 ns timestamps: arrival == the correctly rounded exact difference from the first row."""
    ticks = sorted(ticks)
    base = datetime(2023, 12, 31, 0, 0, 0)  # crosses a year end
    stamps = [f"{base + timedelta(seconds=t // 10**7):%Y-%m-%d %H:%M:%S}.{t % 10**7:07d}" for t in ticks]
    p = tmp_path / "prop.csv"
    p.write_text(AZURE_HEADER + "\n" + "".join(f"{ts},5,6\n" for ts in stamps))
    got = [r.arrival_time_s for r in read_trace(p)]
    assert got == [float(Fraction(t - ticks[0], 10**7)) for t in ticks]


def test_azure_lenient_spacing_and_t_separator(tmp_path):
    text = AZURE_HEADER + "\n 2023-11-16 18:15:46.5 , 10 ,2\n2023-11-16T18:15:47,10, 3\n"
    rs = list(read_trace(write(tmp_path, "a.csv", text)))
    assert [(r.arrival_time_s, r.prompt_tokens, r.output_tokens) for r in rs] == [(0.0, 10, 2), (0.5, 10, 3)]


def test_azure_crlf_bom_and_column_order(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes(
        "\ufeffGeneratedTokens,TIMESTAMP,ContextTokens\r\n44,2023-11-16 18:15:46.6805900,374\r\n7,2023-11-16 18:15:47.0,8".encode()
    )
    rs = list(read_trace(p))
    assert [(r.arrival_time_s, r.prompt_tokens, r.output_tokens) for r in rs] == [(0.0, 374, 44), (0.31941, 8, 7)]


AZURE_ERRORS = [
    ("2023-11-16 18:15:47.0,5", "<line>", "bad_csv"),
    ("2023-11-16 18:15:47.0,5,6,7", "<line>", "bad_csv"),
    ("2023-11-16 18:15:xx.0,5,6", "TIMESTAMP", "bad_csv"),
    ("2023-13-16 18:15:47.0,5,6", "TIMESTAMP", "bad_csv"),
    ("2023-11-16 25:15:47.0,5,6", "TIMESTAMP", "bad_csv"),
    ("2023-11-16 18:15:47.0123456789,5,6", "TIMESTAMP", "bad_csv"),
    ("yesterday,5,6", "TIMESTAMP", "bad_csv"),
    ("2023-11-16 18:15:47.0,abc,6", "ContextTokens", "bad_csv"),
    ("2023-11-16 18:15:47.0,,6", "ContextTokens", "bad_csv"),
    ("2023-11-16 18:15:47.0,5,1_0", "GeneratedTokens", "bad_csv"),
    ("2023-11-16 18:15:47.0,3.5,6", "ContextTokens", "non_integer"),
    ("2023-11-16 18:15:47.0,5,0", "GeneratedTokens", "non_positive"),
    ("2023-11-16 18:15:47.0,-5,6", "ContextTokens", "non_positive"),
    ("2023-11-16 18:15:46.0,5,6", "TIMESTAMP", "time_backwards"),
    ("2023-11-16 18:15:47.0,5000,6", "ContextTokens", "too_long"),
]


@pytest.mark.parametrize("bad,field,code", AZURE_ERRORS)
def test_azure_error_codes(tmp_path, bad, field, code):
    # line 1 header, 2 valid at t=0, 3 valid at t=0.5, 4 the bad row, 5 valid
    text = "\n".join([AZURE_HEADER, "2023-11-16 18:15:46.5,10,2", "2023-11-16 18:15:47.0,10,2", bad, "2023-11-16 18:15:48,1,1"])
    p = write(tmp_path, "a.csv", text + "\n")
    raises_at(p, 4, field, code, max_model_len=4096)
    out = list(read_trace(p, skip_invalid=True, max_model_len=4096))
    assert [type(x).__name__ for x in out] == ["Request", "Request", "InvalidRecord", "Request"]
    assert out[2].code == code and out[2].line == 4


def test_azure_header_missing_column(tmp_path):
    p = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.5,10\n")
    raises_at(p, 1, "GeneratedTokens", "missing_field")
    with pytest.raises(TraceError):  # even with skip_invalid: no row can be read
        list(read_trace(p, skip_invalid=True))


# ------------------------------------------------------------------------------------------------
# Mooncake


def test_mooncake_errors(tmp_path):
    good = '{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}'
    p = write(tmp_path, "m.jsonl", good + "\n" + '{"timestamp": 10, "input_length": 600, "output_length": 3, "hash_ids": [0, 1, 2]}\n')
    e = raises_at(p, 2, "hash_ids", "bad_hashes")
    assert "512" in e.reason
    p = write(tmp_path, "m2.jsonl", good + "\n" + '{"timestamp": 10, "input_length": 600}\n')
    raises_at(p, 2, "output_length", "missing_field")
    p = write(tmp_path, "m3.jsonl", good + "\n" + '{"timestamp": 10, "input_length": 6.5, "output_length": 3}\n')
    raises_at(p, 2, "input_length", "non_integer")
    p = write(tmp_path, "m4.jsonl", '{"timestamp": 10, "input_length": 600, "output_length": 3}\n' + good + "\n")
    raises_at(p, 2, "timestamp", "time_backwards")
    p = write(tmp_path, "m5.jsonl", '{"timestamp": 1500, "input_length": 600, "output_length": 3}\n')
    (r,) = read_trace(p)
    assert r.arrival_time_s == 1.5 and r.prefix_hashes is None and r.hash_block_tokens == 512


# ------------------------------------------------------------------------------------------------
# writer and round trip


def test_round_trip(tmp_path):
    reqs = [
        Request("a", 0.0, 1, 1),
        Request("b\n\"quoted\" é", 0.1 + 0.2, 4096, 7, (0, 2**64 - 1), 16),
        Request("c", 0.30000000000000004, 1024, 1, (1, 2), 512),
        Request("d", 1.0 + 2**-52, 33, 2, ()),
    ]
    p = tmp_path / "rt.jsonl"
    assert write_trace(reqs + [InvalidRecord("x", 1, "f", "r", "bad_json")], p) == 4
    back = list(read_trace(p))
    assert [strip_source(r) for r in back] == reqs
    assert [r.source for r in back] == [(str(p), i) for i in range(1, 5)]
    first = json.loads(p.read_text().splitlines()[0])
    assert list(first) == ["request_id", "arrival_time_s", "prompt_tokens", "output_tokens"]


def test_write_rejects_bad_requests(tmp_path):
    p = tmp_path / "w.jsonl"
    for bad in (
        [Request("a", math.nan, 1, 1)],
        [Request("a", -1.0, 1, 1)],
        [Request("a", 2.0, 1, 1), Request("b", 1.0, 1, 1)],
        [Request("a", 0.0, 0, 1)],
        [Request("a", 0.0, 1, 1.5)],
        [Request("a", 0.0, 16, 1, (1, 2))],
        [Request("a", 0.0, 16, 1, (-1,))],
    ):
        with pytest.raises(ValueError, match="request 'a'|request 'b'"):
            write_trace(bad, p)


def test_mooncake_to_kvsim_round_trip(tmp_path):
    m = write(tmp_path, "m.jsonl", '{"timestamp": 7, "input_length": 1025, "output_length": 3, "hash_ids": [4, 5, 6]}\n')
    out = tmp_path / "k.jsonl"
    write_trace(read_trace(m), out)
    assert "hash_block_tokens" in out.read_text()
    assert [strip_source(r) for r in read_trace(out)] == [strip_source(r) for r in read_trace(m)]


request_lists = st.lists(
    st.tuples(
        st.text(max_size=12),
        st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
        st.integers(min_value=0, max_value=100_000),
        st.integers(min_value=1, max_value=100_000),
        st.one_of(st.none(), st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=6)),
        st.sampled_from([1, 16, 512, 1000]),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_lists)
def test_kvsim_round_trip_property(tmp_path, rows):
    reqs = []
    t = 0.0
    for rid, gap, extra, out_tokens, hashes, block in rows:
        t += gap
        prompt = max(1, len(hashes or ()) * block) + extra
        reqs.append(Request(rid, t, prompt, out_tokens, None if hashes is None else tuple(hashes), block))
    p = tmp_path / "prop.jsonl"
    assert write_trace(iter(reqs), p) == len(reqs)
    assert [strip_source(r) for r in read_trace(p)] == reqs
    assert [strip_source(r) for r in read_trace(p, fmt="kvsim")] == reqs


def test_reading_is_streaming(tmp_path):
    p = tmp_path / "big.jsonl"
    n = 50_000
    write_trace(synthetic_requests(n, 100.0, seed=1), p)
    tracemalloc.start()
    try:
        count = 0
        for _ in read_trace(p):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert p.stat().st_size > 4_000_000
    assert peak < 1_000_000, f"peak {peak} bytes while reading a {p.stat().st_size}-byte file"


# ------------------------------------------------------------------------------------------------
# synthetic generator


def test_synthetic_is_a_generator_and_deterministic():
    g = synthetic_requests(10, 5.0, seed=3)
    assert iter(g) is g
    a = list(synthetic_requests(1000, 5.0, seed=3, lengths=UniformLengths(1, 100, 1, 50)))
    b = list(synthetic_requests(1000, 5.0, seed=3, lengths=UniformLengths(1, 100, 1, 50)))
    c = list(synthetic_requests(1000, 5.0, seed=4, lengths=UniformLengths(1, 100, 1, 50)))
    assert a == b and a != c
    assert [r.request_id for r in a[:3]] == ["0", "1", "2"]
    # the first k requests do not depend on num_requests; arrivals do not depend on the length sampler
    assert list(synthetic_requests(10, 5.0, seed=3, lengths=UniformLengths(1, 100, 1, 50))) == a[:10]
    d = list(synthetic_requests(1000, 5.0, seed=3, lengths=FixedLengths(7, 8)))
    assert [r.arrival_time_s for r in d] == [r.arrival_time_s for r in a]
    assert all((r.prompt_tokens, r.output_tokens) == (7, 8) for r in d)
    assert all(1 <= r.prompt_tokens <= 100 and 1 <= r.output_tokens <= 50 for r in a)
    assert {r.prompt_tokens for r in a} >= {1, 100}
    assert all(x.arrival_time_s < y.arrival_time_s for x, y in zip(a, a[1:]))


def test_synthetic_across_chunks():
    n = CHUNK + 10
    rs = list(synthetic_requests(n, 1000.0, seed=1, id_prefix="r"))
    assert len(rs) == n and rs[-1].request_id == f"r{n - 1}"
    t = np.array([r.arrival_time_s for r in rs])
    assert np.all(np.diff(t) > 0)
    assert list(head(synthetic_requests(None, 1000.0, seed=1, id_prefix="r"), n)) == rs


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 1.0), ("gamma", 0.5), ("gamma", 2.0)])
def test_synthetic_rate_and_cv(arrival, cv):
    n = 100_000
    t = np.fromiter((r.arrival_time_s for r in synthetic_requests(n, 20.0, seed=11, arrival=arrival, cv=cv)), float, n)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    stats = trace_stats(synthetic_requests(n, 20.0, seed=11, arrival=arrival, cv=cv))
    assert stats["request_rate_per_s"] == pytest.approx(20.0, rel=0.02)
    assert stats["interarrival_cv"] == pytest.approx(cv, rel=0.05)


def test_constant_arrivals_and_start_time():
    rs = list(synthetic_requests(5, 4.0, arrival="constant", start_time_s=10.0))
    assert [r.arrival_time_s for r in rs] == [10.25, 10.5, 10.75, 11.0, 11.25]


def test_synthetic_speed():
    n = 200_000
    t0 = time.perf_counter()
    for _ in synthetic_requests(n, 10.0, seed=0, lengths=UniformLengths(1, 4096, 1, 1024)):
        pass
    rate = n / (time.perf_counter() - t0)
    assert rate > 100_000, f"{rate:.0f} requests/s"  # ~2M/s on a dev machine; loose bound for slow CI


def test_synthetic_config_errors():
    for kw in (
        dict(num_requests=-1, rate_per_s=1.0),
        dict(num_requests=10, rate_per_s=0.0),
        dict(num_requests=10, rate_per_s=math.inf),
        dict(num_requests=10, rate_per_s=1.0, arrival="weird"),
        dict(num_requests=10, rate_per_s=1.0, arrival="gamma", cv=0.0),
        dict(num_requests=10, rate_per_s=1.0, lengths=object()),
        dict(num_requests=10, rate_per_s=1.0, seed=1.5),
    ):
        with pytest.raises(ConfigError):
            synthetic_requests(**kw)
    with pytest.raises(ConfigError):
        UniformLengths(10, 5, 1, 1)
    with pytest.raises(ConfigError):
        FixedLengths(0, 1)
    with pytest.raises(ConfigError):
        QuantileLengths([1], [1, 2])
    with pytest.raises(ConfigError):
        rescale_arrivals([], 0.0)


def test_length_stats_from_csv_samples_pairs(tmp_path):
    p = write(tmp_path, "s.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n10,1,11,10\n20,2,22,10\n4000,200,4200,20\n")
    ls = LengthStats.from_csv(p)
    assert len(ls) == 3
    pairs = {(r.prompt_tokens, r.output_tokens) for r in synthetic_requests(300, 1.0, lengths=ls)}
    assert pairs == {(10, 1), (20, 2), (4000, 200)}  # jointly: never (10, 2)
    capped = LengthStats.from_csv(p, max_total_tokens=4096)
    assert len(capped) == 2
    bad = write(tmp_path, "b.csv", "num_prefill_tokens,num_decode_tokens\n10,1\n5,x\n")
    with pytest.raises(TraceError) as ei:
        LengthStats.from_csv(bad)
    assert (ei.value.line, ei.value.field) == (3, "num_decode_tokens")
    with pytest.raises(TraceError):
        LengthStats.from_csv(write(tmp_path, "c.csv", "a,b\n1,2\n"))


def test_quantile_lengths_cap():
    q = QuantileLengths([1, 100, 3000], [1, 50, 2000], max_total_tokens=3000)
    p, o = q.sample(np.random.default_rng(0), 50_000)
    assert p.shape == o.shape == (50_000,)
    assert p.min() >= 1 and o.min() >= 1 and (p + o).max() <= 3000
    assert np.median(p) == pytest.approx(100, rel=0.1)


def test_rescale_and_head():
    rs = list(synthetic_requests(100, 2.0, seed=5))
    fast = list(rescale_arrivals(rs, 2.0))
    assert [f.arrival_time_s for f in fast] == [r.arrival_time_s / 2.0 for r in rs]
    assert [(f.request_id, f.prompt_tokens) for f in fast] == [(r.request_id, r.prompt_tokens) for r in rs]
    assert rs[0].arrival_time_s != fast[0].arrival_time_s  # copies, the originals are unchanged
    inv = InvalidRecord("p", 3, "f", "r", "bad_json", 4.0)
    assert list(rescale_arrivals([inv], 4.0))[0].arrival_time_s == 1.0
    assert len(list(head(rs, 7))) == 7


# ------------------------------------------------------------------------------------------------
# statistics


def test_trace_stats_values():
    reqs = [
        Request("0", 0.0, 10, 1),
        Request("1", 1.0, 20, 2, (1, 2)),
        Request("2", 2.0, 30, 3, (1, 3)),
        Request("3", 4.0, 40, 4),
        InvalidRecord("p", 9, "prompt_tokens", "r", "too_long", 5.0),
    ]
    d = trace_stats(iter(reqs), prefix_reuse=True)
    assert d["count"] == 4 and d["rejected"] == {"too_long": 1}
    assert d["duration_s"] == 4.0 and d["request_rate_per_s"] == 0.75
    assert d["prompt_tokens"]["mean"] == 25 and d["prompt_tokens"]["p50"] == 25 and d["prompt_tokens"]["max"] == 40
    assert d["output_tokens"]["p90"] == pytest.approx(3.7)
    assert d["total_tokens"] == 110 and d["total_prompt_tokens"] == 100
    assert d["prefix_hash_share"] == 0.5 and d["prefix_block_reuse"] == 0.25
    text = format_stats(d)
    assert "requests" in text and "too_long 1" in text and len(text.splitlines()) <= 12
    empty = trace_stats([])
    assert empty["count"] == 0 and empty["request_rate_per_s"] is None
    format_stats(empty)
    big = trace_stats([Request("0", 0.0, 2**40, 1)])
    assert big["prompt_tokens"]["max"] == 2**40


# ------------------------------------------------------------------------------------------------
# the sample trace that ships with the repository


def test_sample_trace():
    p = REPO / "traces" / "sample.jsonl"
    d = trace_stats(read_trace(p))
    assert d["count"] == 300 and 45 <= d["duration_s"] <= 75
    assert all(r.prompt_tokens + r.output_tokens <= 4096 for r in read_trace(p))
    res = subprocess.run([sys.executable, str(REPO / "traces" / "make_sample.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_sample_quantiles_match_sharegpt():
    need(SHAREGPT)
    sys.path.insert(0, str(REPO / "traces"))
    try:
        import make_sample
    finally:
        sys.path.pop(0)
    p, o = LengthStats.from_csv(SHAREGPT, max_total_tokens=make_sample.MAX_TOTAL_TOKENS).quantiles(20)
    assert p == make_sample.SHAREGPT_PROMPT_QUANTILES and o == make_sample.SHAREGPT_OUTPUT_QUANTILES


# ------------------------------------------------------------------------------------------------
# the real public traces in ../shared (skipped when absent)


def test_real_azure_conv():
    p = need(AZURE_CONV)
    assert detect_format(p) == "azure"
    t0 = time.perf_counter()
    rs = list(read_trace(p))
    elapsed = time.perf_counter() - t0
    assert len(rs) == 19_366
    assert elapsed < 1.5, f"{elapsed:.3f} s"  # ~0.06 s on a dev machine
    assert (rs[0].arrival_time_s, rs[0].prompt_tokens, rs[0].output_tokens) == (0.0, 374, 44)
    # 18:15:50.9951690 - 18:15:46.6805900
    assert rs[1].arrival_time_s == float(Fraction("4.3145790")) and (rs[1].prompt_tokens, rs[1].output_tokens) == (396, 109)
    assert rs[-1].source == (str(p), 19_367)
    assert all(a.arrival_time_s <= b.arrival_time_s for a, b in zip(rs, rs[1:]))


def test_real_azure_code():
    p = need(AZURE_CODE)
    rs = list(read_trace(p))
    assert len(rs) == 8_819
    assert (rs[0].arrival_time_s, rs[0].prompt_tokens, rs[0].output_tokens) == (0.0, 4808, 10)
    assert rs[1].arrival_time_s == float(Fraction("0.052")) and rs[1].prompt_tokens == 3180


def test_real_mooncake():
    p = need(MOONCAKE_CONV)
    assert detect_format(p) == "mooncake"
    it = read_trace(p)
    first = [next(it) for _ in range(4)]
    assert [(r.arrival_time_s, r.prompt_tokens, r.output_tokens) for r in first] == [
        (0.0, 6758, 500),
        (0.0, 7322, 490),
        (0.0, 7236, 794),
        (0.0, 2290, 316),
    ]
    assert first[0].prefix_hashes == tuple(range(14)) and first[0].hash_block_tokens == 512
    assert first[3].prefix_hashes == (0, 42, 43, 44, 45)
    d = trace_stats(read_trace(p))
    assert d["count"] == 12_031 and d["prefix_hash_share"] == 1.0 and d["rejected_total"] == 0
    assert d["last_arrival_s"] == 3536.999
    assert trace_stats(read_trace(need(MOONCAKE_SYN)))["count"] == 3_993


def test_real_sharegpt_length_stats():
    ls = LengthStats.from_csv(need(SHAREGPT))
    assert len(ls) == 30_731
    assert len(LengthStats.from_csv(SHAREGPT, max_total_tokens=4096)) == 22_776
