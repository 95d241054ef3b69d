"""``kvprof kernels``: kernel microbenchmarks over a grid, appended to ``DIR/raw.jsonl``.

This module holds only the raw-file format (no torch, so ``kvprof fit`` runs anywhere):

- line 1, ``{"record": "header", "format": "kvprof-raw", "format_version": 1, device, driver, torch,
  cuda, dtype, date, command, model, model_spec, tensor_parallel_size, methods, grid, ...}``;
- ``{"record": "session", ...}`` for every later run that resumed the file (date, command, methods);
- ``{"record": "point", "table": T, "axes": {...}, "median_s": .., "min_s": .., "max_s": ..,
  "repeats": n, "rotation": r, "divisor": k, "oom": false}`` per finished point, or
  ``{"record": "point", "table": T, "axes": {...}, "oom": true, "error": "..."}``.

The ops are in ``profiler.kernels.ops``, the grid and runner in ``profiler.kernels.grid``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RAW_FORMAT = "kvprof-raw"
RAW_FORMAT_VERSION = 1
RAW_NAME = "raw.jsonl"


class RawError(ValueError):
    """A raw file that cannot be read or resumed; the message names the file (and line)."""


def point_key(table: str, axes: dict) -> str:
    return table + "|" + ",".join(f"{k}={axes[k]}" for k in axes)


def raw_path(path) -> Path:
    """``DIR`` or ``DIR/raw.jsonl`` -> the raw file."""
    p = Path(path)
    return p / RAW_NAME if p.is_dir() or p.suffix != ".jsonl" else p


def read_raw(path, repair: bool = False):
    """Read a raw file: (header, sessions, points) with ``points`` key -> last record for that key.

    A last line without its newline is what a kill during a write leaves: it is ignored, and with
    ``repair=True`` cut off the file so appending goes on cleanly. Any other bad line is an error.
    """
    p = Path(path)
    data = p.read_bytes()
    end = len(data)
    if data and not data.endswith(b"\n"):
        end = data.rfind(b"\n") + 1
        if repair:
            with open(p, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    header, sessions, points = None, [], {}
    for lineno, raw in enumerate(data[:end].split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RawError(f"{p}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RawError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise RawError(f"{p}:{lineno}: a record must be a JSON object, got {type(rec).__name__}")
        kind = rec.get("record")
        if lineno == 1:
            if kind != "header" or rec.get("format") != RAW_FORMAT:
                raise RawError(f"{p}:1: not a kvprof raw file (first line must be the header record)")
            if rec.get("format_version") != RAW_FORMAT_VERSION:
                raise RawError(f"{p}:1: raw format_version {rec.get('format_version')!r} is not supported "
                               f"(supported: {RAW_FORMAT_VERSION})")
            header = rec
        elif kind == "session":
            sessions.append(rec)
        elif kind == "point":
            try:
                points[point_key(rec["table"], rec["axes"])] = rec
            except (KeyError, TypeError):
                raise RawError(f"{p}:{lineno}: point record without 'table' and 'axes'") from None
        else:
            raise RawError(f"{p}:{lineno}: unknown record type {kind!r}")
    if header is None:
        raise RawError(f"{p}: empty raw file (no header)")
    return header, sessions, points


def append_record(f, rec: dict) -> None:
    """One JSON line, flushed and fsynced: a finished point survives a kill right after."""
    f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())
