"""Output folders that are never left half-written.

A replay writes its files into a hidden staging folder inside ``--out`` and moves them into place only
when the run has finished, ``summary.json`` last: a run that fails or is killed leaves the previous
outputs as they were (plus, after a hard kill, a ``.partial-<pid>-*`` folder that the next run into the
same folder removes once that process is gone), and a folder with a ``summary.json`` holds one run's
complete set. Each move is an ``os.replace`` within one file system, so a reader never sees a torn file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from kvsim.errors import ConfigError

STAGING_PREFIX = ".partial-"


def ensure_out_dir(path, what: str = "--out") -> Path:
    """Create the output folder (and its parents); a clear error when the path is a file."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise ConfigError(f"{what} {str(p)!r}: {str(q)!r} is a file, not a folder")
        if q.exists():
            break
    p.mkdir(parents=True, exist_ok=True)
    return p


def refuse_overwriting_inputs(out: Path, names, inputs, what: str = "--out") -> None:
    """An input (trace, profile, ...) that is one of the files a run writes into ``out`` would be replaced
    by that output: refuse before running."""
    targets = {(out / n).resolve() for n in names}
    for x in inputs:
        if isinstance(x, (str, os.PathLike)) and Path(x).resolve() in targets:
            raise ConfigError(f"{what} {str(out)!r}: the input {str(x)!r} would be overwritten by an output of "
                              "the same name; choose another output folder")


class StagedDir:
    """``with StagedDir(out) as tmp: write files into tmp; ...publish(names)``: files move into ``out`` on
    ``publish``; if the block ends without it (an error, Ctrl-C), ``out`` is untouched."""

    def __init__(self, out, what: str = "--out"):
        self.out = ensure_out_dir(out, what)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        _remove_orphaned_staging(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out))
        return self.tmp

    def publish(self, names, last: str | None = None) -> None:
        """Move ``names`` (those written; a name not written removes the old file of that name, which
        belongs to an earlier run) into ``out``. ``last`` is removed first and moved in last, so a folder
        that has it has the complete set."""
        assert self.tmp is not None
        order = [n for n in names if n != last] + ([last] if last else [])
        if last:
            _unlink(self.out / last)
        for n in order:
            src = self.tmp / n
            if src.exists():
                os.replace(src, self.out / n)
            else:
                _unlink(self.out / n)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and move it into place."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        _unlink(Path(tmp))
        raise
    return p


def json_lines(f, where: str, error=ConfigError, hint: str = ""):
    """(line number, value) for each non-blank line of a binary file of JSON lines that a run appends to
    and a rerun resumes from; the value is None for a line cut short by a kill. Bytes that are not UTF-8
    were not written by kvsim (it writes ASCII JSON): ``error`` naming ``where`` and the line."""
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise error(f"{where}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line){hint}") from None
        if not line:
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError:
            yield lineno, None


def _remove_orphaned_staging(out: Path) -> None:
    """Staging folders left by runs that were killed (their process is gone); a live run's stays."""
    for d in out.glob(STAGING_PREFIX + "*"):
        pid = d.name[len(STAGING_PREFIX):].partition("-")[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: leave its folder alone
    return True


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
