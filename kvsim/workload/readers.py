"""Streaming trace readers (kvsim JSONL, Azure LLM 2023 CSV, Mooncake JSONL) and the kvsim JSONL writer.

Every reader goes through the file once, line by line, so memory stays constant however long the
trace is. Each line is checked; a bad line raises :class:`~kvsim.errors.TraceError` naming the file,
the 1-based line and the field, or, with ``skip_invalid=True``, is yielded as an
:class:`~kvsim.workload.request.InvalidRecord` (so it can be counted as rejected) and reading goes on.

The format is described in ``docs/trace-format.md``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import sys
import zlib
from datetime import date
from typing import Iterable, Iterator

from kvsim.errors import ConfigError, TraceError
from kvsim.workload.request import InvalidRecord, Request

__all__ = [
    "FORMATS",
    "KVSIM_HASH_BLOCK_TOKENS",
    "MOONCAKE_HASH_BLOCK_TOKENS",
    "detect_format",
    "read_trace",
    "write_trace",
]

#: the trace formats :func:`read_trace` knows
FORMATS = ("kvsim", "azure", "mooncake")
#: tokens covered by one prefix hash in the kvsim format unless a line says otherwise (vLLM's block size)
KVSIM_HASH_BLOCK_TOKENS = 16
#: tokens covered by one Mooncake ``hash_ids`` entry
MOONCAKE_HASH_BLOCK_TOKENS = 512

#: the largest prefix hash accepted (hashes are unsigned 64-bit values)
MAX_PREFIX_HASH = 2**64 - 1
_MAX_FLOAT = sys.float_info.max
#: how many non-empty lines :func:`detect_format` looks at before giving up
_DETECT_LINES = 1000
#: the Azure CSV columns, in the order the reader maps them: time, prompt, output
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_NS_PER_S = 1_000_000_000
_FRAC_SCALE = tuple(10 ** (9 - k) for k in range(10))  # nanoseconds per unit of a k-digit fraction


class _Bad(Exception):
    """Internal: one line is invalid. Turned into TraceError or InvalidRecord by the read loop."""

    def __init__(self, field: str, reason: str, code: str, arrival: float | None = None):
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.code = code
        self.arrival = arrival


# ----------------------------------------------------------------------------------------------
# file opening and format detection


def _open_binary(path) -> io.BufferedIOBase:
    p = os.fspath(path)
    if str(p).endswith(".gz"):
        return _CheckedLines(gzip.open(p, "rb"), str(p))
    return open(p, "rb")


def _open_text(path, newline: str | None = "") -> io.TextIOBase:
    # utf-8-sig drops a byte-order mark; undecodable bytes become U+FFFD and then fail the field checks
    p = os.fspath(path)
    if str(p).endswith(".gz"):
        return _CheckedLines(gzip.open(p, "rt", encoding="utf-8-sig", errors="replace", newline=newline), str(p))
    return open(p, "rt", encoding="utf-8-sig", errors="replace", newline=newline)


class _CheckedLines:
    """The lines of a .gz file; a truncated or corrupt one becomes a TraceError naming the line it broke
    at instead of a zlib/EOF traceback. (Plain files need no wrapper and keep C-speed iteration.)"""

    def __init__(self, f, spath: str):
        self._f, self._next, self._spath, self._n = f, f.__next__, spath, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return self

    def __next__(self):
        try:
            line = self._next()
        except (OSError, EOFError, zlib.error) as e:
            why = ("the compressed data ends early (a truncated .gz)" if isinstance(e, EOFError)
                   else f"not a valid gzip file ({e})")
            raise TraceError(self._spath, self._n + 1, "<file>", f"{why}; {self._n} lines read before it",
                             "bad_gzip") from None
        self._n += 1
        return line


def _is_azure_header(line: str) -> bool:
    return "TIMESTAMP" in (c.strip().strip('"').upper() for c in line.split(","))


def detect_format(path) -> str | None:
    """Detect the format of the trace at *path* from its content; None for a file with no data.

    Rules, on the first non-empty line (header lines count as data here):

    * a CSV header that has a ``TIMESTAMP`` column -> ``"azure"``;
    * a JSON object with ``prompt_tokens`` -> ``"kvsim"``;
    * a JSON object with ``input_length`` -> ``"mooncake"``.

    If the first non-empty line is not a JSON object (e.g. a corrupt first line), the next non-empty
    lines are tried, up to 1,000. Raises :class:`TraceError` (code ``unknown_format``) when nothing
    matches.
    """
    spath = os.fspath(path)
    first_line = None
    first_text = ""
    with _open_text(path, newline=None) as f:
        seen = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen += 1
            if first_line is None:
                first_line, first_text = lineno, line.strip()
                if _is_azure_header(line):
                    return "azure"
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                if "prompt_tokens" in obj:
                    return "kvsim"
                if "input_length" in obj:
                    return "mooncake"
            if seen >= _DETECT_LINES:
                break
    if first_line is None:
        return None
    shown = first_text if len(first_text) <= 80 else first_text[:77] + "..."
    raise TraceError(
        spath,
        first_line,
        "<line>",
        f"cannot detect the trace format from {shown!r}: expected a CSV header with TIMESTAMP (azure), "
        f"or JSON lines with prompt_tokens (kvsim) or input_length (mooncake); "
        f"pass --format (fmt= in the Python API) one of {', '.join(FORMATS)}",
        "unknown_format",
    )


# ----------------------------------------------------------------------------------------------
# field checks shared by the JSONL formats


def _describe(v) -> str:
    """A value as the user wrote it in JSON, with its type, for error messages."""
    if v is None:
        return "null"
    if v is True or v is False:
        return f"{'true' if v else 'false'} (a boolean)"
    if isinstance(v, str):
        s = v if len(v) <= 40 else v[:37] + "..."
        return f"the string {s!r}"
    if isinstance(v, float):
        return f"{v!r} (a float)"
    if isinstance(v, (list, dict)):
        return "a JSON " + ("array" if isinstance(v, list) else "object")
    return repr(v)


def _pos_int(d: dict, key: str, arrival) -> int:
    v = d.get(key)
    if type(v) is int and v > 0:
        return v
    if v is None:
        raise _Bad(key, "is missing" if key not in d else "is null", "missing_field", arrival)
    if type(v) is int:
        raise _Bad(key, f"must be a positive integer, got {v}", "non_positive", arrival)
    raise _Bad(key, f"must be an integer, got {_describe(v)}", "non_integer", arrival)


def _time(d: dict, key: str, divisor: int):
    """Seconds from field *key* (a JSON number, >= 0, finite), divided by *divisor*."""
    v = d.get(key)
    tv = type(v)
    if (tv is float or tv is int) and 0 <= v <= _MAX_FLOAT:
        return v / divisor if divisor != 1 else float(v)
    if v is None:
        raise _Bad(key, "is missing" if key not in d else "is null", "missing_field")
    if tv is float or tv is int:
        raise _Bad(key, f"must be a finite number >= 0, got {v!r}", "bad_time")
    raise _Bad(key, f"must be a number, got {_describe(v)}", "bad_time")


def _hashes(v, key: str, prompt: int, block: int, arrival) -> tuple[int, ...] | None:
    if v is None:
        return None
    if type(v) is not list:
        raise _Bad(key, f"must be a list of non-negative integers, got {_describe(v)}", "bad_hashes", arrival)
    if v:
        if {*map(type, v)} != {int}:
            i = next(i for i, h in enumerate(v) if type(h) is not int)
            raise _Bad(key, f"entry {i} must be an integer, got {_describe(v[i])}", "bad_hashes", arrival)
        if min(v) < 0 or max(v) > MAX_PREFIX_HASH:
            i = next(i for i, h in enumerate(v) if not 0 <= h <= MAX_PREFIX_HASH)
            raise _Bad(key, f"entry {i} must be in [0, 2^64-1], got {v[i]}", "bad_hashes", arrival)
        blocks = -(-prompt // block)
        if len(v) > blocks:
            raise _Bad(
                key,
                f"has {len(v)} hashes, but a prompt of {prompt} tokens has only {blocks} blocks of {block} tokens",
                "bad_hashes",
                arrival,
            )
    return tuple(v)


def _parse_kvsim(d: dict, lineno: int, source) -> Request:
    t = d.get("arrival_time_s")
    p = d.get("prompt_tokens")
    o = d.get("output_tokens")
    tt = type(t)
    if (tt is float or tt is int) and 0 <= t <= _MAX_FLOAT and type(p) is int and p > 0 and type(o) is int and o > 0:
        t = float(t)
    else:  # find the first bad field
        t = _time(d, "arrival_time_s", 1)
        p = _pos_int(d, "prompt_tokens", t)
        o = _pos_int(d, "output_tokens", t)
    rid = d.get("request_id")
    if rid is None:
        rid = str(lineno - 1)
    elif type(rid) is not str:
        if type(rid) is int:
            rid = str(rid)
        else:
            raise _Bad("request_id", f"must be a string or an integer, got {_describe(rid)}", "bad_id", t)
    block = d.get("hash_block_tokens")
    if block is None:
        block = KVSIM_HASH_BLOCK_TOKENS
    else:
        block = _pos_int(d, "hash_block_tokens", t)
    hashes = d.get("prefix_hashes")
    if hashes is not None:
        hashes = _hashes(hashes, "prefix_hashes", p, block, t)
    mt = d.get("max_tokens")
    if mt is not None:
        mt = _pos_int(d, "max_tokens", t)
        if o > mt:
            raise _Bad("output_tokens", f"{o} tokens is more than the request's max_tokens={mt}", "over_max_tokens", t)
    return Request(rid, t, p, o, hashes, block, source, mt)


def _parse_mooncake(d: dict, lineno: int, source) -> Request:
    t = _time(d, "timestamp", 1000)
    p = _pos_int(d, "input_length", t)
    o = _pos_int(d, "output_length", t)
    hashes = d.get("hash_ids")
    if hashes is not None:
        hashes = _hashes(hashes, "hash_ids", p, MOONCAKE_HASH_BLOCK_TOKENS, t)
    return Request(str(lineno - 1), t, p, o, hashes, MOONCAKE_HASH_BLOCK_TOKENS, source)


_JSONL_FIELDS = {  # format -> (parser, time field, prompt field)
    "kvsim": (_parse_kvsim, "arrival_time_s", "prompt_tokens"),
    "mooncake": (_parse_mooncake, "timestamp", "input_length"),
}


def _slow_json(raw: bytes, lineno: int):
    """Parse a line the fast path refused (leading space, BOM, or bad): the value, or _Bad with the reason."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("<line>", f"not valid UTF-8 (byte {e.start + 1} of the line)", "bad_json") from None
    if lineno == 1 and s.startswith("\ufeff"):
        s = s[1:]
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise _Bad("<line>", f"not valid JSON: {e.msg} at column {e.colno}", "bad_json") from None


def _read_jsonl(path, fmt: str, skip_invalid: bool, max_model_len: int | None) -> Iterator[Request | InvalidRecord]:
    parse, time_field, prompt_field = _JSONL_FIELDS[fmt]
    spath = os.fspath(path)
    raw_decode = json.JSONDecoder().raw_decode
    prev_t = -math.inf
    prev_line = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if raw.isspace():
                continue
            try:
                try:  # fast path: about twice as fast as json.loads(raw)
                    s = raw.decode()
                    d, end = raw_decode(s)
                    if end != len(s) and not s[end:].isspace():
                        raise ValueError("extra data")
                except ValueError:  # JSONDecodeError, UnicodeDecodeError
                    d = _slow_json(raw, lineno)
                if type(d) is not dict:
                    raise _Bad("<line>", f"must be a JSON object, got {_describe(d)}", "bad_json")
                req = parse(d, lineno, (spath, lineno))
                t = req.arrival_time_s
                if t < prev_t:
                    raise _Bad(
                        time_field,
                        f"arrival {t!r} s is earlier than {prev_t!r} s on line {prev_line} (the previous valid line)",
                        "time_backwards",
                        t,
                    )
                if max_model_len is not None and req.prompt_tokens > max_model_len:
                    raise _Bad(
                        prompt_field,
                        f"prompt of {req.prompt_tokens} tokens is longer than max_model_len={max_model_len}",
                        "too_long",
                        t,
                    )
            except _Bad as b:
                if not skip_invalid:
                    raise TraceError(spath, lineno, b.field, b.reason, b.code) from None
                yield InvalidRecord(spath, lineno, b.field, b.reason, b.code, b.arrival)
                continue
            prev_t = t
            prev_line = lineno
            yield req


# ----------------------------------------------------------------------------------------------
# Azure LLM inference trace 2023 (CSV)


def _minute_seconds(s: str) -> int:
    """Seconds from 0001-01-01 to the minute ``YYYY-MM-DD HH:MM`` (16 characters; ``T`` also accepted)."""
    if len(s) != 16 or s[4] != "-" or s[7] != "-" or s[10] not in " T" or s[13] != ":":
        raise ValueError("expected YYYY-MM-DD HH:MM:SS[.fffffff]")
    digits = s[:4] + s[5:7] + s[8:10] + s[11:13] + s[14:16]
    if not (digits.isdigit() and digits.isascii()):
        raise ValueError("expected YYYY-MM-DD HH:MM:SS[.fffffff]")
    days = date.fromisoformat(s[:10]).toordinal()  # ValueError on e.g. month 13
    h, m = int(s[11:13]), int(s[14:16])
    if h > 23 or m > 59:
        raise ValueError("time of day out of range")
    return days * 86400 + h * 3600 + m * 60


def _parse_timestamp_ns(s: str, minute_cache: dict) -> int:
    """``YYYY-MM-DD HH:MM:SS[.f...]`` (0-9 fractional digits; ``T`` also accepted) to integer nanoseconds.

    Exact: no float is involved, so 7-digit (100 ns) timestamps keep every digit. The minute part is
    parsed once per distinct minute (*minute_cache*).
    """
    minute = minute_cache.get(s[:16])
    if minute is None:
        s = s.strip()
        minute = _minute_seconds(s[:16])
        if len(minute_cache) > 65536:
            minute_cache.clear()
        minute_cache[s[:16]] = minute
    n = len(s)
    if n < 19 or s[16] != ":" or not (s[17:19].isdigit() and s[17:19].isascii()):
        s = s.strip()
        n = len(s)
        if n < 19 or s[16] != ":" or not (s[17:19].isdigit() and s[17:19].isascii()):
            raise ValueError("expected YYYY-MM-DD HH:MM:SS[.fffffff]")
    sec = int(s[17:19])
    if sec > 59:
        raise ValueError("seconds out of range")
    if n == 19:
        return (minute + sec) * _NS_PER_S
    frac = s[20:]
    k = n - 20
    if s[19] != "." or not 1 <= k <= 9 or not (frac.isdigit() and frac.isascii()):
        raise ValueError("fraction of a second must be '.' and 1 to 9 digits")
    return (minute + sec) * _NS_PER_S + int(frac) * _FRAC_SCALE[k]


def _csv_int(s: str, field: str, arrival) -> int:
    if s.isdigit() and s.isascii():
        v = int(s)
        if v > 0:
            return v
        raise _Bad(field, f"must be a positive integer, got {v}", "non_positive", arrival)
    s2 = s.strip()
    if s2 and "_" not in s2:
        try:
            v = int(s2)
        except ValueError:
            pass
        else:
            if v > 0:
                return v
            raise _Bad(field, f"must be a positive integer, got {v}", "non_positive", arrival)
        try:
            x = float(s2)
        except ValueError:
            pass
        else:
            if math.isfinite(x):
                raise _Bad(field, f"must be an integer, got {s2!r}", "non_integer", arrival)
    raise _Bad(field, f"not a number: {s!r}", "bad_csv", arrival)


def _read_azure(path, skip_invalid: bool, max_model_len: int | None) -> Iterator[Request | InvalidRecord]:
    spath = os.fspath(path)
    minute_cache: dict = {}
    prev_t = -math.inf
    prev_line = 0
    t0 = None  # nanoseconds of the first row whose timestamp parses
    idx = None  # column indices (time, prompt, output)
    names = _AZURE_COLUMNS
    header_line = 0
    ncols = 0
    with _open_text(path) as f:
        rows = csv.reader(f)
        for row in rows:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            lineno = rows.line_num
            if idx is None:
                cols = [c.strip().upper() for c in row]
                missing = [n for n in _AZURE_COLUMNS if n.upper() not in cols]
                if missing:
                    raise TraceError(
                        spath,
                        lineno,
                        missing[0],
                        f"CSV header {','.join(row)!r} lacks column(s) {', '.join(missing)}; "
                        f"expected {','.join(_AZURE_COLUMNS)}",
                        "missing_field",
                    )
                idx = tuple(cols.index(n.upper()) for n in _AZURE_COLUMNS)
                names = tuple(row[i].strip() for i in idx)
                ncols = len(row)
                header_line = lineno
                it, ip, io_ = idx
                continue
            try:
                if len(row) != ncols:
                    raise _Bad(
                        "<line>",
                        f"expected {ncols} columns as in the header on line {header_line}, got {len(row)}",
                        "bad_csv",
                    )
                try:
                    ns = _parse_timestamp_ns(row[it], minute_cache)
                except ValueError as e:
                    raise _Bad(names[0], f"bad timestamp {row[it]!r}: {e}", "bad_csv") from None
                if t0 is None:
                    t0 = ns
                t = (ns - t0) / _NS_PER_S  # int / int: correctly rounded
                p = _csv_int(row[ip], names[1], t)
                o = _csv_int(row[io_], names[2], t)
                if t < prev_t:
                    raise _Bad(
                        names[0],
                        f"{row[it].strip()} ({t!r} s) is earlier than {prev_t!r} s on line {prev_line} "
                        f"(the previous valid line)",
                        "time_backwards",
                        t,
                    )
                if max_model_len is not None and p > max_model_len:
                    raise _Bad(
                        names[1], f"prompt of {p} tokens is longer than max_model_len={max_model_len}", "too_long", t
                    )
            except _Bad as b:
                if not skip_invalid:
                    raise TraceError(spath, lineno, b.field, b.reason, b.code) from None
                yield InvalidRecord(spath, lineno, b.field, b.reason, b.code, b.arrival)
                continue
            prev_t = t
            prev_line = lineno
            yield Request(str(lineno - 2), t, p, o, None, KVSIM_HASH_BLOCK_TOKENS, (spath, lineno))


# ----------------------------------------------------------------------------------------------
# public API


def read_trace(
    path,
    fmt: str | None = None,
    *,
    skip_invalid: bool = False,
    max_model_len: int | None = None,
) -> Iterator[Request | InvalidRecord]:
    """Stream the requests of the trace at *path* (``.gz`` files are decompressed on the fly).

    *fmt* is one of :data:`FORMATS` (``kvsim``, ``azure``, ``mooncake``); None detects it from the
    content (:func:`detect_format`). Lines are checked one by one; the first bad one raises
    :class:`TraceError` ``path:line: field 'x': reason`` with a ``code``, unless *skip_invalid*, in
    which case an :class:`InvalidRecord` is yielded in its place. *max_model_len* rejects prompts
    longer than it (code ``too_long``).

    The format, the option checks and the file's existence are checked now; the lines when iterated.
    """
    if max_model_len is not None and (type(max_model_len) is not int or max_model_len <= 0):
        raise ConfigError(f"max_model_len must be a positive integer, got {max_model_len!r}")
    if os.path.isdir(path):
        raise ConfigError(f"trace {os.fspath(path)!r} is a folder, not a trace file")
    if fmt is None:
        fmt = detect_format(path)  # FileNotFoundError, or TraceError unknown_format
        if fmt is None:
            return iter(())
    else:
        key = str(fmt).strip().lower()
        if key not in FORMATS:
            raise ConfigError(f"unknown trace format {fmt!r}; known formats: {', '.join(FORMATS)}")
        fmt = key
        if not os.path.exists(path):
            raise FileNotFoundError(f"trace file not found: {os.fspath(path)}")
    if fmt == "azure":
        return _read_azure(path, bool(skip_invalid), max_model_len)
    return _read_jsonl(path, fmt, bool(skip_invalid), max_model_len)


def _open_write(path) -> io.TextIOBase:
    p = os.fspath(path)
    if str(p).endswith(".gz"):
        return gzip.open(p, "wt", encoding="utf-8", newline="\n")
    return open(p, "w", encoding="utf-8", newline="\n")


def write_trace(requests: Iterable[Request | InvalidRecord], path) -> int:
    """Write *requests* to *path* as kvsim JSONL (one object per line), streaming; return the count written.

    :class:`InvalidRecord` items are skipped, so ``write_trace(read_trace(p, skip_invalid=True), out)``
    writes a cleaned copy. Each request is checked as the reader would (positive integer token counts,
    finite non-negative arrival, non-decreasing arrivals, prefix hashes in [0, 2^64-1]); a bad one
    raises :class:`ValueError` naming its request_id. ``hash_block_tokens`` is written only when it is
    not 16, so the file reads back to equal requests (all fields but ``source``).
    """
    dumps = json.dumps
    n = 0
    prev_t = -math.inf
    with _open_write(path) as f:
        write = f.write
        for r in requests:
            if isinstance(r, InvalidRecord):
                continue
            rid = r.request_id
            t = r.arrival_time_s
            p = r.prompt_tokens
            o = r.output_tokens
            if not (type(t) is float or type(t) is int) or not 0 <= t <= _MAX_FLOAT:
                raise ValueError(f"request {rid!r}: arrival_time_s must be a finite number >= 0, got {t!r}")
            if t < prev_t:
                raise ValueError(f"request {rid!r}: arrival_time_s {t!r} is earlier than the previous {prev_t!r}")
            if type(p) is not int or p <= 0 or type(o) is not int or o <= 0:
                raise ValueError(f"request {rid!r}: token counts must be positive integers, got {p!r}, {o!r}")
            if type(rid) is not str:
                rid = str(rid)
            line = (
                f'{{"request_id": {dumps(rid)}, "arrival_time_s": {float(t)!r}, '
                f'"prompt_tokens": {p}, "output_tokens": {o}'
            )
            mt = r.max_tokens
            if mt is not None:
                if type(mt) is not int or mt < o:
                    raise ValueError(f"request {rid!r}: max_tokens must be an integer >= output_tokens, got {mt!r}")
                line += f', "max_tokens": {mt}'
            block = r.hash_block_tokens
            if block != KVSIM_HASH_BLOCK_TOKENS:
                if type(block) is not int or block <= 0:
                    raise ValueError(f"request {rid!r}: hash_block_tokens must be a positive integer, got {block!r}")
                line += f', "hash_block_tokens": {block}'
            h = r.prefix_hashes
            if h is not None:
                try:
                    _hashes(list(h), "prefix_hashes", p, block, t)
                except _Bad as b:
                    raise ValueError(f"request {rid!r}: prefix_hashes {b.reason}") from None
                line += f', "prefix_hashes": [{", ".join(map(str, h))}]'
            write(line + "}\n")
            prev_t = t
            n += 1
    return n
